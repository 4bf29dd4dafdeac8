"""FP8 shared-context decode and teacher forcing: checks -> launcher -> public functions.

No kernel of its own. Each op's keys split in two, as the predictor's top-k path splits
them (`tabpfn_infer.predictor.routing.merge_with_buffer`):

- context (FP8): every query row of dataset g sees the same keys, its first M_g context
  rows, whatever its row rule. So the S * Lq rows of its S sample paths are one dense
  attention: q viewed as [G, H, S*Lq, D] over k_ctx, v_ctx [G, H_kv, Nc, D], run by
  tabattn-fp8's FP8 forward (`fp8_attention_launch`). It returns out and the true fp32 LSE.
  The context's K/V are quantised once and reused while the same k_ctx, v_ctx come back
  unchanged (`QuantizedContextCache`): a decode loop passes each layer's prefilled context
  at every step.
- buffer (exact): tabattn-triton's op of the same name with an empty context (Nc = 0
  slices of k_ctx, v_ctx). It runs in the input precision with an fp32 softmax.
- the two parts merged by their LSEs (`tabattn_core.reference.merge_states`).

`fp8_shared_context_attention` and `fp8_teacher_forcing_attention` are the `fp8` backend's
registry ops of the same names, with the signatures of `tabattn_core.reference`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from tabattn_core.checks import InputError
from tabattn_core.memo import TensorMemo
from tabattn_core.reference import merge_states
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
    "fp8_context_buffer_fwd",
    "fp8_context_fwd",
    "fp8_shared_context_attention",
    "fp8_teacher_forcing_attention",
]

# (q, k_ctx[:, :, :0], v_ctx[:, :, :0]) -> (out, lse): the exact attention over the buffer.
BufferPart = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


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


def fp8_context_buffer_fwd(
    q: torch.Tensor,
    k_ctx: torch.Tensor,
    v_ctx: torch.Tensor,
    ctx_len: int,
    ctx_lens: torch.Tensor | None,
    group: int,
    scale: float,
    buffer_part: BufferPart | None,
    *,
    smooth_k: bool = True,
    p_fp8: bool = P_FP8_DEFAULT,
    rotate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The launcher behind both ops, with inputs already checked. It combines the FP8
    context part (`fp8_context_fwd`) with `buffer_part(q, k_ctx[:, :, :0], v_ctx[:, :, :0])`,
    the exact attention over the buffer, and merges the two by their LSEs.

    An empty context (ctx_len 0) gives the buffer part alone. No buffer (`buffer_part`
    None) gives the context part alone. With neither, out is 0 and LSE -inf, as in the
    reference. smooth_k, p_fp8 and rotate are those of `fp8_attention`. The public ops use
    their defaults.

    q [G, S, H, Lq, D]; k_ctx, v_ctx [G, H_kv, Nc, D]. Returns out [G, S, H, Lq, D]
    (q.dtype) and lse [G, S, H, Lq] (fp32).
    """
    if ctx_len == 0:  # Nc = 0 or context_lens = 0: no row sees a context key
        if buffer_part is not None:
            return buffer_part(q, k_ctx[:, :, :0], v_ctx[:, :, :0])
        lse = torch.full(q.shape[:4], float("-inf"), device=q.device, dtype=torch.float32)
        return torch.zeros_like(q), lse
    out, lse = fp8_context_fwd(
        q, k_ctx, v_ctx, ctx_len, ctx_lens, group, scale,
        smooth_k=smooth_k, p_fp8=p_fp8, rotate=rotate,
    )  # fmt: skip
    if buffer_part is None:
        return out, lse
    return merge_states(out, lse, *buffer_part(q, k_ctx[:, :, :0], v_ctx[:, :, :0]))


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
    args = check_decode_inputs(
        q, k_ctx, v_ctx, k_buf, v_buf,
        buffer_len=buffer_len, context_lens=context_lens, row_rule=row_rule, scale=scale,
    )  # fmt: skip
    check_fp8_forward(q, k_ctx, v_ctx, k_buf, v_buf)
    has_buffer = k_buf is not None and (args.buffer_len_tensor is not None or args.buffer_len > 0)
    scale = args.scale
    buffer_part = None
    if has_buffer:
        buffer_part = functools.partial(
            _buffer_part, triton_decode, k_buf, v_buf,
            buffer_len=buffer_len, row_rule=row_rule, scale=scale,
        )  # fmt: skip
    return fp8_context_buffer_fwd(
        q, k_ctx, v_ctx, args.ctx_len, args.ctx_lens, args.group, scale, buffer_part
    )


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
    args = check_teacher_forcing_inputs(
        q, k_ctx, v_ctx, k_buf, v_buf, context_lens=context_lens, scale=scale
    )
    check_fp8_forward(q, k_ctx, v_ctx, k_buf, v_buf)
    buffer_part = functools.partial(_buffer_part, triton_tf, k_buf, v_buf, scale=args.scale)
    return fp8_context_buffer_fwd(
        q, k_ctx, v_ctx, args.ctx_len, args.ctx_lens, args.group, args.scale, buffer_part
    )


def _buffer_part(op, k_buf, v_buf, q, k_empty, v_empty, **kwargs):
    """tabattn-triton's `op` over the buffer alone (an empty context)."""
    return op(q, k_empty, v_empty, k_buf, v_buf, **kwargs)
