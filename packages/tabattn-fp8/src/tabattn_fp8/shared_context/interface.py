"""FP8 shared-context decode and teacher forcing: checks -> context part -> public functions.

No kernel of its own. Each op is tabattn-core's combinator `context_buffer_op`: its keys
split in two, the parts merged by their LSEs, after tabattn-triton's checks of the op
(`check_decode_inputs`, `check_teacher_forcing_inputs`) and `check_fp8_forward`:

- context (FP8, `fp8_context_attention`): every query row of dataset g sees the same keys,
  its first M_g context rows, whatever its row rule. So the S * Lq rows of its S sample
  paths are one dense attention: q viewed as [G, H, S*Lq, D] over k_ctx, v_ctx
  [G, H_kv, Nc, D], run by tabattn-fp8's FP8 forward (`fp8_attention_launch`). It returns
  out and the true fp32 LSE. The context's K/V are quantised once and reused while the
  same k_ctx, v_ctx come back unchanged (`QuantizedContextCache`): a decode loop passes
  each layer's prefilled context at every step.
- buffer (exact): tabattn-triton's op of the same name with an empty context (Nc = 0
  slices of k_ctx, v_ctx). It runs in the input precision with an fp32 softmax.

`fp8_shared_context_attention` and `fp8_teacher_forcing_attention` are the `fp8` backend's
registry ops of the same names, with the signatures of `tabattn_core.reference`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from tabattn_core.checks import InputError
from tabattn_core.context_buffer import context_buffer_op
from tabattn_core.memo import TensorMemo
from tabattn_fp8.attention.interface import (
    P_FP8_DEFAULT,
    QuantizedKV,
    check_fp8_device,
    fp8_attention_launch,
    fp8_quantize_kv,
)
from tabattn_triton.building_blocks import (
    MASK_CONTEXT,
    PrefixMask,
    capturing,
    check_decode_inputs,
    check_teacher_forcing_inputs,
    needs_grad,
)
from tabattn_triton.building_blocks import shared_context_attention as triton_decode
from tabattn_triton.building_blocks import teacher_forcing_attention as triton_tf

__all__ = [
    "QUANTIZED_CONTEXTS",
    "QuantizedContextCache",
    "check_fp8_forward",
    "fp8_context_attention",
    "fp8_context_fwd",
    "fp8_shared_context_attention",
    "fp8_teacher_forcing_attention",
]


class QuantizedContextCache(TensorMemo):
    """The FP8 K/V of shared contexts, quantised once per context and reused by later calls.

    A `tabattn_core.memo.TensorMemo` on the caller's k_ctx and v_ctx objects, with the rows
    quantised, the dtype, the options (smooth_k, p_fp8, rotate) and whether the stream is
    capturing a CUDA graph as the rest of the key: it keeps no context alive, a new tensor
    at a freed one's address is a new key, and an in-place write to either tensor (its
    `_version`) makes the context quantised again into new buffers. Inference tensors (no
    version counter) are never cached. At most `max_entries` entries, oldest first: far
    more than the contexts in use at once (a model's layers).

    CUDA graphs: a hit only reads the entry's buffers; it never reallocates or writes them,
    and nothing here syncs with the host. Entries made during a capture serve only
    captures. The capture that missed holds the quantisation kernels, so every replay of
    its graph rewrites the entry's buffers in place from the context's current values, and
    a graph captured later that hit reads them: the predictor's "prefill + step 0" graph
    quantises, its "step t" graph reads. Eager calls never read such an entry (a capture
    runs nothing, so its buffers hold nothing until a replay), and a capture never reads an
    eager one (its graph would not requantise a context refilled in place between replays).
    """

    def get(
        self,
        k_ctx: torch.Tensor,
        v_ctx: torch.Tensor,
        length: int,
        *,
        smooth_k: bool,
        p_fp8: bool,
        rotate: bool,
    ) -> QuantizedKV:
        """`fp8_quantize_kv` of k_ctx[:, :, :length], v_ctx[:, :, :length] (k_ctx, v_ctx
        [G, H_kv, Nc, D]), from the cache when it holds them unchanged."""
        extra = (length, k_ctx.dtype, smooth_k, p_fp8, rotate, capturing())
        kv = self.lookup((k_ctx, v_ctx), extra)
        if kv is None:
            kv = fp8_quantize_kv(
                k_ctx[:, :, :length], v_ctx[:, :, :length],
                smooth_k=smooth_k, p_fp8=p_fp8, rotate=rotate,
            )  # fmt: skip
            self.store((k_ctx, v_ctx), extra, kv)
        return kv


QUANTIZED_CONTEXTS = QuantizedContextCache()


def check_fp8_forward(q: torch.Tensor, *tensors: torch.Tensor | None) -> None:
    """After tabattn-triton's argument checks: no input requiring grad (the FP8 ops are
    forward-only) and an sm90 device (or CPU under TRITON_INTERPRET=1)."""
    if needs_grad(q, *tensors):
        raise InputError(
            "q, k_ctx, v_ctx, k_buf, v_buf: expected no tensor requiring grad; the FP8 "
            "shared-context ops are forward-only (inference); use backend 'triton' or "
            "'torch' to train"
        )
    check_fp8_device(q.device)


def fp8_context_fwd(
    q: torch.Tensor,
    k_ctx: torch.Tensor,
    v_ctx: torch.Tensor,
    ctx_len: int,
    ctx_lens: torch.Tensor | None,
    group: int,
    scale: float,
    *,
    smooth_k: bool = True,
    p_fp8: bool = P_FP8_DEFAULT,
    rotate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The context part in FP8. All S*Lq rows of dataset g attend to its first M_g context
    keys (ctx_lens[g], or ctx_len for every dataset).

    q [G, S, H, Lq, D] is reshaped to [G, H, S*Lq, D]. That is a view (no copy) when
    S == 1, when Lq == 1 (a decode step of one row), or when q.stride(1) == Lq * q.stride(3)
    (the model's [G, S, Lq, H, D] projections transposed). Other layouts, such as a
    contiguous [G, S, H, Lq, D] with H > 1 and Lq > 1, get one copy of q. The kernels take
    any row strides. With `rotate` (the default), the rotation writes an fp32 copy of the
    rows in any case, as `fp8_attention` does. With one length, k_ctx and v_ctx are sliced
    to it (views). Then the keys past it need not be finite, and the K smoothing and
    scales see only the rows read. With per-dataset lengths, the context-target mask runs
    over all Nc rows, so every row must be finite (`fp8_attention`). The quantised K/V
    come from `QUANTIZED_CONTEXTS` (keyed on the k_ctx, v_ctx objects, not their slices);
    ctx_lens enter only the launch's mask.

    Returns out [G, S, H, Lq, D] (q.dtype) and lse [G, S, H, Lq] (fp32, the true LSE).
    Both are strided views of the [G, H, S*Lq, ...] results. A row with no context key
    gets out 0 and LSE -inf.
    """
    g, s, h, lq, d = q.shape
    q_rows = q.transpose(1, 2).reshape(g, h, s * lq, d)
    if ctx_lens is None:
        length, pm = ctx_len, PrefixMask()
    else:
        length, pm = k_ctx.shape[2], PrefixMask(MASK_CONTEXT, ctx_len=ctx_len, ctx_lens=ctx_lens)
    kv = QUANTIZED_CONTEXTS.get(k_ctx, v_ctx, length, smooth_k=smooth_k, p_fp8=p_fp8, rotate=rotate)
    out, lse = fp8_attention_launch(q_rows, v_ctx[:, :, :length], kv, pm, scale, group)
    return out.unflatten(2, (s, lq)).transpose(1, 2), lse.unflatten(2, (s, lq)).transpose(1, 2)


def fp8_context_attention(
    q: torch.Tensor,
    k_ctx: torch.Tensor,
    v_ctx: torch.Tensor,
    *,
    context_lens: int | torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The context part of both ops (a `tabattn_core.context_buffer.ContextOp`, inputs
    checked): `fp8_context_fwd` with the public ops' defaults. context_lens: M (an int) or
    int64 M_g [G] on q's device. Returns out [G, S, H, Lq, D], lse [G, S, H, Lq] (fp32)."""
    if isinstance(context_lens, torch.Tensor):
        ctx_len, ctx_lens = k_ctx.shape[2], context_lens
    else:
        ctx_len, ctx_lens = context_lens, None
    group = q.shape[2] // k_ctx.shape[1]
    return fp8_context_fwd(q, k_ctx, v_ctx, ctx_len, ctx_lens, group, scale)


def _fp8_checks(check: Callable) -> Callable:
    """tabattn-triton's `check` of an op (its contract and kernel checks), then
    `check_fp8_forward`; returns the contract's record."""

    def checked(q, k_ctx, v_ctx, k_buf, v_buf, **options):
        args = check(q, k_ctx, v_ctx, k_buf, v_buf, **options)
        check_fp8_forward(q, k_ctx, v_ctx, k_buf, v_buf)
        return args

    return checked


_DECODE = context_buffer_op(
    "shared_context_attention",
    fp8_context_attention,
    triton_decode,
    check=_fp8_checks(check_decode_inputs),
)
_TEACHER_FORCING = context_buffer_op(
    "teacher_forcing_attention",
    fp8_context_attention,
    triton_tf,
    check=_fp8_checks(check_teacher_forcing_inputs),
)


def fp8_shared_context_attention(
    q: torch.Tensor,
    k_ctx: torch.Tensor,
    v_ctx: torch.Tensor,
    k_buf: torch.Tensor | None = None,
    v_buf: torch.Tensor | None = None,
    *,
    buffer_len: int | torch.Tensor = 0,
    context_lens: int | torch.Tensor | None = None,
    row_rule: str | Sequence[str] = "causal",
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 kernel for `tabattn_core.reference.shared_context_attention` (its contract and
    docstring), forward only: the context part in FP8 (all S*Lq rows of a dataset at once),
    the buffer part exact (tabattn-triton's decode kernel, per path), merged by LSE. q in
    bf16 or fp16 (fp32 only for the interpreter's tests). Accuracy: see `fp8_attention`
    (about 5% relative error on the context part's Gaussian inputs). Returns out (q.dtype,
    possibly strided) and lse (fp32). Runs on sm90 only, or on CPU under TRITON_INTERPRET=1;
    elsewhere it raises `require_sm90`'s error."""
    return _DECODE(
        q, k_ctx, v_ctx, k_buf, v_buf,
        buffer_len=buffer_len, context_lens=context_lens, row_rule=row_rule, scale=scale,
    )  # fmt: skip


def fp8_teacher_forcing_attention(
    q: torch.Tensor,
    k_ctx: torch.Tensor,
    v_ctx: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    *,
    context_lens: int | torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 kernel for `tabattn_core.reference.teacher_forcing_attention` (its contract and
    docstring), forward only: the context part in FP8 (all S*2*Nt rows of a dataset at
    once), the buffer part exact (tabattn-triton), merged by LSE. q in bf16 or fp16 (fp32
    only for the interpreter's tests). Returns out (q.dtype, possibly strided) and lse
    (fp32). Runs on sm90 only, or on CPU under TRITON_INTERPRET=1."""
    return _TEACHER_FORCING(q, k_ctx, v_ctx, k_buf, v_buf, context_lens=context_lens, scale=scale)
