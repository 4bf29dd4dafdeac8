"""Shared-context attention for joint sampling: launchers -> public functions.

`shared_context_attention` (one decode step of S sample paths per dataset) and
`teacher_forcing_attention` (the joint density in one pass) are the registry ops of the same
names: kernels for `tabattn_core.reference`'s ops, whose contracts
(`tabattn_core.contracts`) and docstrings they share. `decode_with_splits` is the decode
with the context split across a chosen number of programs (tests, benchmarks).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton

from tabattn_core.checks import InputError
from tabattn_core.contracts import (
    DecodeArgs,
    TeacherForcingArgs,
    check_context_buffer,
    shared_context_args,
    teacher_forcing_args,
)
from tabattn_triton.ops.attention.interface import PrefixMask, attention_bwd
from tabattn_triton.ops.common import (
    LOG2E,
    MASK_CONTEXT,
    MASK_TEACHER_BUFFER,
    autotune_enabled,
    bucket,
    capturing,
    dot_precision,
    head_block,
    needs_grad,
)
from tabattn_triton.ops.kernel_checks import check_kernel_tensors
from tabattn_triton.ops.shared_context.kernel import (
    shared_context_combine_kernel,
    shared_context_fwd_kernel,
)

__all__ = [
    "check_context_buffer_inputs",
    "check_decode_inputs",
    "check_teacher_forcing_inputs",
    "choose_num_splits",
    "decode_with_splits",
    "shared_context_attention",
    "teacher_forcing_attention",
]

MIN_SPLIT_KEYS = 512  # a split reads at least this many context keys
SAMPLE_TILE_MIN_ROWS = 16  # rows per sample from which per-sample tiles feed the dots
ROUGH_BLOCK_M = 16  # rows per program assumed when choosing the context splits

# Launch signatures whose device-side buffer length was already tuned for (see `_launch`).
_TUNED_AT_MEAN_LENGTH: set[tuple] = set()


_TUNED_MAX = 1024


def check_context_buffer_inputs(
    q, k_ctx, v_ctx, k_buf, v_buf, context_lens, *, need_buffer: int, q_dims: str
) -> tuple:
    """`tabattn_core.contracts.check_context_buffer` (buffers of at least need_buffer rows)
    and the kernels' checks; returns (group, ctx_len, ctx_lens): ctx_lens the int64 [G]
    per-dataset lengths, or None when one length ctx_len holds for every dataset."""
    result = check_context_buffer(
        q, k_ctx, v_ctx, k_buf, v_buf, context_lens,
        need=need_buffer, name="buffer_len", q_dims=q_dims,
    )  # fmt: skip
    check_kernel_tensors(q=q, k_ctx=k_ctx, v_ctx=v_ctx, k_buf=k_buf, v_buf=v_buf)
    return result


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def choose_num_splits(programs: int, context_keys: int, device: torch.device) -> int:
    """Split the context across programs only when the row tiles (counted at ROUGH_BLOCK_M
    rows) do not fill one wave of SMs; then aim for two waves, each split reading at least
    MIN_SPLIT_KEYS keys. Measured on an H200 (S, Nc, T, H=8, D=64): at (512, 1024, 16), 256
    programs, one split beats two (20.4 vs 24.8 + 1.8 µs combine); at (64, 16384, 32), 32
    programs, eight splits run about 3x faster than one."""
    if device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if programs >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, max(programs, 1)), context_keys // MIN_SPLIT_KEYS, 64))


def _launch(q, k_ctx, v_ctx, k_buf, v_buf, group, ctx_len, ctx_lens, *, buffer_len, rule_bits,
            teacher_forcing, scale, num_splits, buffer_len_ptr=None):  # fmt: skip
    """Allocate out [G, S, H, Lq, D] and lse [G, S, H, Lq] and run the kernel(s). With
    buffer_len_ptr (an int tensor on the device) the kernel reads the valid buffer length
    from it, clamped to buffer_len = T_cap."""
    g, s, h, lq, d = q.shape
    out = torch.empty((g, s, h, lq, d), device=q.device, dtype=q.dtype)
    lse = torch.empty((g, s, h, lq), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    h_kv = k_ctx.shape[1]
    rows_per_sample = group * lq
    sample_tiles = rows_per_sample >= SAMPLE_TILE_MIN_ROWS
    block_d = head_block(d)
    nc = k_ctx.shape[2]
    if num_splits is None:
        rough_rows = s * (
            triton.next_power_of_2(rows_per_sample) if sample_tiles else rows_per_sample
        )
        num_splits = choose_num_splits(
            g * h_kv * triton.cdiv(rough_rows, ROUGH_BLOCK_M), nc, q.device
        )
    if not 1 <= num_splits <= 1024:
        raise InputError(f"num_splits: expected an int in [1, 1024], got {num_splits}")
    split_len = triton.cdiv(triton.cdiv(nc, num_splits), 64) * 64 if num_splits > 1 else max(nc, 1)
    n_rows = g * s * h * lq
    has_buffer = k_buf is not None and (teacher_forcing or buffer_len > 0)
    buffer_len_ptr = buffer_len_ptr if has_buffer else None
    if num_splits > 1:
        o_part = torch.empty((num_splits, n_rows, block_d), device=q.device, dtype=torch.float32)
        lse_part = torch.empty((num_splits, n_rows), device=q.device, dtype=torch.float32)
    else:
        o_part = lse_part = None
    kb = k_buf if has_buffer else k_ctx.unsqueeze(1)  # placeholders when there is no buffer
    vb = v_buf if has_buffer else v_ctx.unsqueeze(1)
    precision = dot_precision(q.dtype)
    tuning_len = None
    if buffer_len_ptr is not None and autotune_enabled() and not capturing():
        # A decode loop replays one launch while the length read on the device grows from 1
        # to T_cap, but the autotuner would time its configs at whatever length the first
        # call holds (usually 1, which favours tiles that are slow on long buffers: at
        # S=1024, Nc=1024, T_cap=64, H=4, D=32, fp32 on an H100, 95 vs 62 µs per step). So
        # the first launch of a signature runs on scratch outputs at the mean length.
        signature = (q.shape, k_ctx.shape, q.dtype, q.device, buffer_len, num_splits, precision)
        if signature not in _TUNED_AT_MEAN_LENGTH:
            if len(_TUNED_AT_MEAN_LENGTH) >= _TUNED_MAX:
                _TUNED_AT_MEAN_LENGTH.clear()
            _TUNED_AT_MEAN_LENGTH.add(signature)
            tuning_len = torch.full_like(buffer_len_ptr, (buffer_len + 1) // 2)

    def grid(meta):
        bm = meta["BLOCK_M"]
        row_blocks = (
            s * triton.cdiv(rows_per_sample, bm)
            if sample_tiles
            else triton.cdiv(s * rows_per_sample, bm)
        )
        return (g * h_kv * row_blocks * num_splits,)

    def run(length_ptr, out, lse):
        shared_context_fwd_kernel[grid](
            q, k_ctx, v_ctx, kb, vb, ctx_lens, length_ptr, out, lse, o_part, lse_part,
            *q.stride(), *k_ctx.stride(), *v_ctx.stride(), *kb.stride(), *vb.stride(),
            s, h, group, lq, ctx_len, buffer_len, rule_bits, d, scale * LOG2E, split_len, n_rows,
            bucket(s * rows_per_sample), bucket(nc), bucket(buffer_len),
            HAS_CTX_LENS=ctx_lens is not None,
            HAS_BUFFER=has_buffer,
            LEN_FROM_PTR=length_ptr is not None,
            TEACHER_FORCING=teacher_forcing,
            SAMPLE_TILES=sample_tiles,
            NUM_SPLITS=num_splits,
            BLOCK_D=block_d,
            DOT_PRECISION=precision,
        )  # fmt: skip

    if tuning_len is not None:
        run(tuning_len, torch.empty_like(out), torch.empty_like(lse))
    run(buffer_len_ptr, out, lse)
    if num_splits > 1:
        block_r = 16
        shared_context_combine_kernel[(triton.cdiv(n_rows, block_r),)](
            o_part, lse_part, out, lse, n_rows, d,
            NUM_SPLITS=num_splits, SPLITS_P2=triton.next_power_of_2(num_splits),
            BLOCK_D=block_d, BLOCK_R=block_r,
        )  # fmt: skip
    return out, lse


@functools.lru_cache(maxsize=256)
def _rule_bits(rules: tuple[str, ...]) -> int:
    """Bit i set when row i is "causal" (sees its own slot); bit 62 holds the rule shared by
    rows 62 and later (the kernel's limit). Cached: the decode step calls this every step."""
    bits = sum(int(rule == "causal") << i for i, rule in enumerate(rules[:62]))
    if len(rules) > 62:
        tail = set(rules[62:])
        if len(tail) > 1:
            raise InputError("row_rule: expected one rule for all rows from 62 on, got both")
        bits |= int(tail.pop() == "causal") << 62
    return bits


class TeacherForcingFunction(torch.autograd.Function):
    """Forward: the fused shared-context kernel. Backward: the flash-attention backward
    kernels, once over the context with the samples folded into query rows (dK/dV of the
    shared context summed over samples without copies) and once per sample over its buffer;
    both use the final LSE and delta, so the two parts' gradients simply add. That is the
    gradient of the two parts merged by LSE (`tabattn_core.context_buffer_op`) in flash
    form; the fused forward leaves no per-part out and LSE to merge."""

    @staticmethod
    def forward(ctx, q, k_ctx, v_ctx, k_buf, v_buf, group, ctx_len, ctx_lens, scale):
        out, lse = _launch(
            q, k_ctx, v_ctx, k_buf, v_buf, group, ctx_len, ctx_lens,
            buffer_len=k_buf.shape[3], rule_bits=0, teacher_forcing=True, scale=scale,
            num_splits=1,
        )  # fmt: skip
        ctx.save_for_backward(q, k_ctx, v_ctx, k_buf, v_buf, out, lse, ctx_lens)
        ctx.group, ctx.ctx_len, ctx.scale = group, ctx_len, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k_ctx, v_ctx, k_buf, v_buf, out, lse, ctx_lens = ctx.saved_tensors
        g, s, h, rows, d = q.shape

        def fold(t):  # [G, S, H, L, ...] -> [G, H, S*L, ...]: samples become query rows
            return t.transpose(1, 2).reshape(g, h, s * rows, *t.shape[4:])

        pm_ctx = PrefixMask(MASK_CONTEXT, ctx_len=ctx.ctx_len, ctx_lens=ctx_lens)
        dq_ctx, dk_ctx, dv_ctx = attention_bwd(
            fold(do), fold(q), k_ctx, v_ctx, fold(out), fold(lse).contiguous(), pm_ctx,
            ctx.scale, ctx.group,
        )  # fmt: skip
        h_kv, nt = k_buf.shape[2], k_buf.shape[3]
        dq_buf, dk_buf, dv_buf = attention_bwd(
            do.reshape(g * s, h, rows, d), q.reshape(g * s, h, rows, d),
            k_buf.reshape(g * s, h_kv, nt, d), v_buf.reshape(g * s, h_kv, nt, d),
            out.reshape(g * s, h, rows, d), lse.reshape(g * s, h, rows),
            PrefixMask(MASK_TEACHER_BUFFER), ctx.scale, ctx.group,
        )  # fmt: skip
        dq = dq_buf.view(g, s, h, rows, d) + dq_ctx.view(g, h, s, rows, d).transpose(1, 2)
        shape = k_buf.shape
        return dq, dk_ctx, dv_ctx, dk_buf.view(shape), dv_buf.view(shape), None, None, None, None


def shared_context_attention(
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
    """Kernel for `tabattn_core.reference.shared_context_attention` (its contract and
    docstring), forward only: k_ctx, v_ctx read once per tile of many samples; a 0-dim
    device tensor `buffer_len` is read by the kernel (values beyond T_cap clamped to it);
    the context split across programs as `choose_num_splits` decides. Any strides with a
    unit stride on D; fp16, bf16 or fp32 on CUDA (CPU under TRITON_INTERPRET=1). Returns
    out [G, S, H, Lq, D] (contiguous), lse [G, S, H, Lq]."""
    return decode_with_splits(
        q, k_ctx, v_ctx, k_buf, v_buf,
        buffer_len=buffer_len, context_lens=context_lens, row_rule=row_rule, scale=scale,
    )  # fmt: skip


def decode_with_splits(
    q: torch.Tensor,
    k_ctx: torch.Tensor,
    v_ctx: torch.Tensor,
    k_buf: torch.Tensor | None = None,
    v_buf: torch.Tensor | None = None,
    *,
    num_splits: int | None = None,
    **options,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`shared_context_attention` with the context split across `num_splits` programs, an
    int in [1, 1024] (None: `choose_num_splits`, what the op does). For tests and
    benchmarks of the split path, which the heuristic takes on GPUs only. `options`: the
    op's keyword arguments (buffer_len, context_lens, row_rule, scale)."""
    args = check_decode_inputs(q, k_ctx, v_ctx, k_buf, v_buf, **options)
    if needs_grad(q, k_ctx, v_ctx, k_buf, v_buf):
        raise InputError(
            "q, k_ctx, v_ctx, k_buf, v_buf: the decode kernel is forward-only (sampling runs "
            "without gradients); use teacher_forcing_attention or backend 'torch' to train"
        )
    return _launch(
        q, k_ctx, v_ctx, k_buf, v_buf, args.group, args.ctx_len, args.ctx_lens,
        buffer_len=args.buffer_len, rule_bits=_rule_bits(args.row_rule), teacher_forcing=False,
        scale=args.scale, num_splits=num_splits, buffer_len_ptr=args.buffer_len_tensor,
    )  # fmt: skip


def check_decode_inputs(
    q, k_ctx, v_ctx, k_buf, v_buf, *, buffer_len=0, context_lens=None, row_rule="causal",
    scale=None,
) -> DecodeArgs:  # fmt: skip
    """The contract of `shared_context_attention` (`tabattn_core.contracts`), then the
    kernels' checks (dtypes, device, unit stride on D, one rule for rows 62 and later)."""
    args = shared_context_args(
        q, k_ctx, v_ctx, k_buf, v_buf,
        buffer_len=buffer_len, context_lens=context_lens, row_rule=row_rule, scale=scale,
    )  # fmt: skip
    check_kernel_tensors(q=q, k_ctx=k_ctx, v_ctx=v_ctx, k_buf=k_buf, v_buf=v_buf)
    _rule_bits(args.row_rule)
    return args


def teacher_forcing_attention(
    q: torch.Tensor,
    k_ctx: torch.Tensor,
    v_ctx: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    *,
    context_lens: int | torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel for `tabattn_core.reference.teacher_forcing_attention` (its contract and
    docstring), forward (the fused shared-context kernel) and backward (the flash-attention
    backward kernels). Any strides with a unit stride on D; fp16, bf16 or fp32 on CUDA (CPU
    under TRITON_INTERPRET=1)."""
    args = check_teacher_forcing_inputs(
        q, k_ctx, v_ctx, k_buf, v_buf, context_lens=context_lens, scale=scale
    )
    return TeacherForcingFunction.apply(
        q, k_ctx, v_ctx, k_buf, v_buf, args.group, args.ctx_len, args.ctx_lens, args.scale
    )


def check_teacher_forcing_inputs(
    q, k_ctx, v_ctx, k_buf, v_buf, *, context_lens=None, scale=None
) -> TeacherForcingArgs:
    """The contract of `teacher_forcing_attention` (`tabattn_core.contracts`), then the
    kernels' checks (dtypes, device, unit stride on D)."""
    args = teacher_forcing_args(
        q, k_ctx, v_ctx, k_buf, v_buf, context_lens=context_lens, scale=scale
    )
    check_kernel_tensors(q=q, k_ctx=k_ctx, v_ctx=v_ctx, k_buf=k_buf, v_buf=v_buf)
    return args
