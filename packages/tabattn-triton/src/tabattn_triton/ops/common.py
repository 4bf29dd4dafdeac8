"""Building blocks shared by the attention kernels: the prefix-mask rule, the online-softmax
tile step and autotune helpers (the kernels' input checks: `kernel_checks`).

Every mask these kernels run is a *prefix* mask: query row q sees keys `[0, kv_end(q))`.
That covers no mask, context-target (per-dataset M), causal with any alignment, the
AR-TabPFN training row mask (its visible set is one interval per row) and the buffer part
of teacher forcing.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl
import triton.testing

from tabattn_core.precision import scoped_fp32_dot_precision

# Mask kinds (constexpr MASK of the kernels).
MASK_NONE, MASK_CONTEXT, MASK_CAUSAL, MASK_AR_ROWS, MASK_TEACHER_BUFFER = 0, 1, 2, 3, 4
# The same kinds for the comparisons inside @triton.jit functions, which may read only
# constexpr globals.
_MASK_NONE = tl.constexpr(MASK_NONE)
_MASK_CONTEXT = tl.constexpr(MASK_CONTEXT)
_MASK_CAUSAL = tl.constexpr(MASK_CAUSAL)
_MASK_AR_ROWS = tl.constexpr(MASK_AR_ROWS)
_MASK_TEACHER_BUFFER = tl.constexpr(MASK_TEACHER_BUFFER)

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

ENV_AUTOTUNE = "TABATTN_AUTOTUNE"


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune_enabled() -> bool:
    """TABATTN_AUTOTUNE=0 (or the interpreter) collapses every config list to its first entry."""
    return os.environ.get(ENV_AUTOTUNE, "1") != "0" and not interpreting()


def pick_configs(
    configs: list[triton.Config], keep: Callable[[triton.Config], bool] | None = None
) -> list[triton.Config]:
    """The configs that `keep` accepts (all of them without `keep`; the first if it accepts
    none), or only the first of those when autotuning is off."""
    kept = [c for c in configs if keep is None or keep(c)] or configs[:1]
    return kept if autotune_enabled() else kept[:1]


def capturing() -> bool:
    """True while the current CUDA stream is being captured into a graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will record a call on these tensors (None entries ignored)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def bench_in_graph(kernel_call: Callable[[], None], quantiles) -> list[float]:
    """The autotuner's timer for kernels of a few microseconds: the calls replayed from a
    CUDA graph, so that the host's launch time (larger than such a kernel) does not decide
    the pick. Measured on an H100 for the fused linear layer at 2048 x 128 rows: the
    default timer picked configs taking 8.5-10.5 µs where the best take 6.5-7.

    The timer runs on a stream of its own, which does not wait for the caller's: the device
    is synchronised first, or its trial runs could write the output's memory while queued
    work still reads what occupied it before (seen as wrong densities at a large shape)."""
    torch.cuda.synchronize()
    timings = triton.testing.do_bench_cudagraph(kernel_call, rep=20, quantiles=quantiles)
    torch.cuda.synchronize()
    return timings


def bucket(n: int) -> int:
    """Power-of-two bucket of a length, so autotune keys do not change with every length."""
    return 1 << max(int(n) - 1, 0).bit_length()


def head_block(head_dim: int) -> int:
    """Head dims are padded (masked loads) to the next power of two, at least 16."""
    return max(16, triton.next_power_of_2(head_dim))


def dot_precision(dtype: torch.dtype) -> str:
    """The input precision of a kernel's dots for operands of `dtype`. fp16/bf16: their own
    tensor-core products (the name is then unused). fp32: the mode of the enclosing
    `tabattn_core.precision.fp32_dot_precision` scope; outside any scope, torch's setting:
    "tf32" with torch.backends.cuda.matmul.allow_tf32, else "tf32x3" (fp32-level accuracy on
    tensor cores; Triton's own fp32 dot, "ieee", runs on the CUDA cores several times
    slower). The interpreter, which knows no "bf16x3", computes that mode as "tf32x3"."""
    if dtype != torch.float32:
        return "tf32"
    mode = scoped_fp32_dot_precision()
    if mode is None:
        mode = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"
    if mode == "bf16x3" and interpreting():
        return "tf32x3"
    return mode


@triton.jit
def load_rows(base, offs, stride_l, stride_d, offs_d, row_ok, d_ok):
    """A [rows, BLOCK_D] tile; out-of-range rows and padded head dims read as 0."""
    ptrs = base + offs[:, None] * stride_l + offs_d[None, :] * stride_d
    return tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def prefix_kv_end(
    offs_m,
    Lq,
    Lk,
    ctx_len,
    causal_offset,
    ar_buffer,
    ar_chunked,
    MASK: tl.constexpr,
):
    """Per query row, the end of its visible key prefix: row q sees keys [0, end(q)).

    NONE: Lk. CONTEXT: ctx_len (the dataset's M). CAUSAL: q + 1 + causal_offset (Lk - Lq for
    bottom-right, 0 for top-left), clamped to [0, Lk]. AR_ROWS (rows [ctx | buffer | targets],
    ctx_len = Nc, ar_buffer = Nb, ar_chunked = A * Nb): context rows Nc, buffer rows q + 1,
    target j < A*Nb: Nc + (j mod Nb) + 1, other targets Nc. TEACHER_BUFFER (rows
    [buf_0..buf_{Lk-1}, tgt_0..tgt_{Lk-1}] over the Lk buffer keys): buf_i i + 1, tgt_i i.
    """
    if MASK == _MASK_NONE:
        end = offs_m * 0 + Lk  # (not zeros_like: the sm90 Gluon kernel calls this too)
    elif MASK == _MASK_CONTEXT:
        end = offs_m * 0 + ctx_len
    elif MASK == _MASK_CAUSAL:
        end = tl.minimum(tl.maximum(offs_m + 1 + causal_offset, 0), Lk)
    elif MASK == _MASK_TEACHER_BUFFER:
        end = tl.where(offs_m < Lk, offs_m + 1, offs_m - Lk)
    else:  # AR_ROWS
        j = offs_m - ctx_len - ar_buffer
        chunk_end = ctx_len + j % tl.maximum(ar_buffer, 1) + 1
        end = tl.where(
            offs_m < ctx_len,
            ctx_len,
            tl.where(j < 0, offs_m + 1, tl.where(j < ar_chunked, chunk_end, ctx_len)),
        )
    return end


@triton.jit
def prefix_query_blocks(
    k0, k1, Lq, ctx_len, causal_offset, ar_buffer, MASK: tl.constexpr, BLOCK_M: tl.constexpr
):
    """The query blocks of BLOCK_M rows that see keys [k0, k1) under `prefix_kv_end`'s rule:
    blocks [lo, mid) see them in part (run masked), [mid, hi) whole. CONTEXT: every block
    sees context keys (padding keys: none). AR_ROWS: context keys as CONTEXT, buffer keys
    some rows of every block (masked), target keys none. TEACHER_BUFFER: every block, masked.
    CAUSAL: from the first row that sees k0, whole from the first that sees k1 - 1."""
    num_m_blocks = tl.cdiv(Lq, BLOCK_M)
    m_lo = num_m_blocks * 0
    m_mid = num_m_blocks * 0
    m_hi = num_m_blocks
    if MASK == _MASK_CONTEXT or MASK == _MASK_AR_ROWS:  # noqa: SIM109 (Triton has no `in`)
        reach = ctx_len
        if MASK == _MASK_AR_ROWS:
            reach = ctx_len + ar_buffer
        if k1 > ctx_len:
            m_mid = num_m_blocks
        if k0 >= reach:
            m_mid = num_m_blocks * 0
            m_hi = num_m_blocks * 0
    elif MASK == _MASK_TEACHER_BUFFER:
        m_mid = num_m_blocks
    elif MASK == _MASK_CAUSAL:
        first_row = tl.maximum(k0 - causal_offset, 0)  # first row that sees key k0
        full_row = tl.minimum(tl.maximum(k1 - 1 - causal_offset, 0), Lq)  # sees all of them
        m_lo = tl.minimum(first_row // BLOCK_M, num_m_blocks)
        m_mid = tl.maximum(tl.cdiv(full_row, BLOCK_M), m_lo)
    return m_lo, m_mid, m_hi


@triton.jit
def online_softmax_tile(
    acc,
    m_i,
    l_i,
    q,
    k_tile,
    v_tile,
    qk_scale,
    visible,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One key tile of the online softmax (log2 domain).

    q [BM, BD], k_tile [BD, BN] (transposed), v_tile [BN, BD]; m_i, l_i [BM] running max and
    sum; acc [BM, BD] fp32. `visible` [BM, BN] is used only when MASKED. Rows that have seen
    no key keep m_i = -inf, l_i = 0, acc = 0 (no NaN).
    """
    s = tl.dot(q, k_tile, input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v_tile.dtype), v_tile, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def finish_softmax(acc, m_i, l_i):
    """Normalise the accumulator; returns (out [BM, BD] fp32, lse [BM] natural log).
    Rows that saw no key give out 0 and lse -inf."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    return out, lse
