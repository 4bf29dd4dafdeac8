"""FP8 (E4M3) flash attention forward for prefix masks (none, context-target, causal, AR rows).

Q and K arrive quantised per block (`tabattn_fp8.quantize`); their scales fold into the
fp32 scores: s = dot(q8, k8) * sq[row block] * sk[key block] * sm_scale. Q's scales are
loaded per row (any Q block size); K's block is a multiple of BLOCK_N, so each key tile has
one scale. Softmax runs in fp32 (log2 domain). P·V:

- P_FP8: P is cast to E4M3 for an FP8 dot with V (quantised with one static scale per
  (batch, kv head), stored [B, H, D, L] so the tile is the K-major B operand Hopper's FP8
  wgmma needs). P is scaled by 448 before the cast (folded into the exponent, so the
  scaling costs nothing): probabilities down to ~4e-6 of the row max stay in E4M3's normal
  range, where an unscaled P in [0, 1] flushes everything below ~1e-3 to zero (the bulk of
  P over a long context). The running sum uses the same scaled P, so the 448 cancels in
  out = acc / l and leaves the LSE as -log2(448). One V scale per head keeps the P·V
  accumulation a plain fused dot-accumulate; E4M3's exponent range covers V's variation
  along the keys.
- otherwise P·V runs in the input precision with the original (unquantised) V, through
  tabattn-triton's `online_softmax_tile`.

The mask rule, tile split (full tiles unmasked, partial tiles masked, empty tiles skipped),
query-block prologue, loads and final normalisation are tabattn-triton's helpers.
"""

from __future__ import annotations

import triton
import triton.language as tl

from tabattn_fp8.quantize.kernel import to_e4m3
from tabattn_triton.building_blocks import (
    finish_softmax,
    key_tiles,
    load_rows,
    online_softmax_tile,
    pick_configs,
    query_block,
)

# log2 of P's scale before its E4M3 cast: a hair under log2(448), so exp2 never rounds past 448.
LOG2_P_SCALE = tl.constexpr(8.80734)
K_BLOCK = 128  # K quantisation block: a multiple of every BLOCK_N below

# (BLOCK_M, BLOCK_N, warps, stages); the first entry is the single config used when
# autotuning is off (it must fit every head dim up to 256).
FWD_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [
        (64, 32, 4, 2),
        (128, 128, 8, 3),
        (128, 128, 8, 2),
        (128, 64, 8, 3),
        (128, 64, 4, 3),
        (64, 128, 4, 3),
        (64, 64, 4, 3),
    ]
]
AUTOTUNE_KEY = ["LQ_BUCKET", "LK_BUCKET", "BLOCK_D", "MASK", "P_FP8"]


def _prune(configs, named_args, **kwargs):
    """Keep tiles whose fp8 operands and fp32 accumulator fit at this head dim."""
    block_d = named_args.get("BLOCK_D", kwargs.get("BLOCK_D"))
    kept = [
        c
        for c in configs
        if (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * block_d
        <= 256 * 128 * (2 if c.num_warps == 8 else 1)
    ]
    return kept or configs[:1]


@triton.jit
def fp8_pv_softmax_tile(acc, m_i, l_i, q, k_tile, v_tile, qk_scale, visible,
                        MASKED: tl.constexpr, ROUND_FIRST: tl.constexpr):  # fmt: skip
    """`online_softmax_tile` with P·V in FP8: P scaled by 2**LOG2_P_SCALE, cast to v_tile's
    E4M3 (`to_e4m3`) and dotted with it. The running sum l_i holds the same scaled P."""
    s = tl.dot(q, k_tile) * qk_scale
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - (m_safe[:, None] - LOG2_P_SCALE))
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(to_e4m3(p, v_tile.dtype, ROUND_FIRST), v_tile)
    return acc, m_new, l_i


@triton.jit
def _tile(acc, m_i, l_i, q, k_tile, v_tile, qk_scale, visible, MASKED: tl.constexpr,
          P_FP8: tl.constexpr, DOT_PRECISION: tl.constexpr, ROUND_FIRST: tl.constexpr):  # fmt: skip
    if P_FP8:
        return fp8_pv_softmax_tile(
            acc, m_i, l_i, q, k_tile, v_tile, qk_scale, visible, MASKED, ROUND_FIRST
        )
    return online_softmax_tile(
        acc, m_i, l_i, q, k_tile, v_tile, qk_scale, visible, MASKED, DOT_PRECISION
    )


@triton.autotune(
    configs=pick_configs(FWD_CONFIGS),
    key=AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def fp8_attention_fwd_kernel(
    Q8,
    SQ,
    K8,
    SK,
    V,
    SV,
    ROW_DOT,
    O,
    LSE,
    CTX_LENS,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    H,
    GROUP,
    Lq,
    Lk,
    D,
    sm_scale,
    qk_scale,
    ctx_len,
    causal_offset,
    ar_buffer,
    ar_chunked,
    q_blocks,
    k_blocks,
    LQ_BUCKET,
    LK_BUCKET,
    MASK: tl.constexpr,
    HAS_CTX_LENS: tl.constexpr,
    P_FP8: tl.constexpr,
    SMOOTH_K: tl.constexpr,
    ROUND_FIRST: tl.constexpr,
    Q_BLOCK: tl.constexpr,
    KB: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Grid: (B * H * cdiv(Lq, BLOCK_M),). One program: BLOCK_M query rows of one (b, h).

    Q8 [B, H, Lq, D] / K8 [B, H_kv, Lk, D] E4M3 with SQ [B, H, q_blocks] (blocks of Q_BLOCK
    rows) and SK [B, H_kv, k_blocks] (blocks of KB rows); V: E4M3 with SV [B, H_kv]
    (P_FP8) or the input V; ROW_DOT [B, H, Lq]: q · mean_k, added to the LSE (SMOOTH_K);
    qk_scale = sm_scale * log2(e). O [B, H, Lq, D], LSE [B, H, Lq] fp32 natural log."""
    tb, h, h_kv, _q0, _k0, Lq, Lk, ctx_len, causal_offset, offs_m, row_ok = query_block(
        CTX_LENS, None, None, H, GROUP, Lq, Lk, ctx_len, causal_offset,
        HAS_CTX_LENS, False, BLOCK_M,
    )  # fmt: skip
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    bh = tb * H + h
    bh_kv = tb * (H // GROUP) + h_kv
    q = load_rows(
        Q8 + tb * stride_qb + h * stride_qh, offs_m, stride_qm, stride_qd, offs_d, row_ok, d_ok
    )
    row_scale = tl.load(SQ + bh * q_blocks + offs_m // Q_BLOCK, mask=row_ok, other=0.0) * qk_scale

    kv_end, full_stop, any_end = key_tiles(
        offs_m, row_ok, Lq, Lk, ctx_len, causal_offset, ar_buffer, ar_chunked, MASK, BLOCK_N
    )
    k_base = K8 + tb * stride_kb + h_kv * stride_kh
    v_base = V + tb * stride_vb + h_kv * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    all_rows = offs_n >= 0
    for start in range(0, full_stop, BLOCK_N):
        cols = start + offs_n
        k_t = tl.trans(load_rows(k_base, cols, stride_kn, stride_kd, offs_d, all_rows, d_ok))
        v_t = load_rows(v_base, cols, stride_vn, stride_vd, offs_d, all_rows, d_ok)
        scale = row_scale * tl.load(SK + bh_kv * k_blocks + start // KB)
        acc, m_i, l_i = _tile(
            acc,
            m_i,
            l_i,
            q,
            k_t,
            v_t,
            scale[:, None],
            None,
            False,
            P_FP8,
            DOT_PRECISION,
            ROUND_FIRST,
        )
    for start in range(full_stop, any_end, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < Lk
        k_t = tl.trans(load_rows(k_base, cols, stride_kn, stride_kd, offs_d, col_ok, d_ok))
        v_t = load_rows(v_base, cols, stride_vn, stride_vd, offs_d, col_ok, d_ok)
        scale = row_scale * tl.load(SK + bh_kv * k_blocks + start // KB)
        visible = cols[None, :] < kv_end[:, None]
        acc, m_i, l_i = _tile(
            acc,
            m_i,
            l_i,
            q,
            k_t,
            v_t,
            scale[:, None],
            visible,
            True,
            P_FP8,
            DOT_PRECISION,
            ROUND_FIRST,
        )

    if P_FP8:
        acc = acc * tl.load(SV + bh_kv)
        m_i = m_i - LOG2_P_SCALE
    out, lse = finish_softmax(acc, m_i, l_i)
    if SMOOTH_K:
        lse = lse + tl.load(ROW_DOT + bh * Lq + offs_m, mask=row_ok, other=0.0) * sm_scale
    o_ptrs = (
        O
        + tb * stride_ob
        + h * stride_oh
        + offs_m[:, None] * stride_om
        + offs_d[None, :] * stride_od
    )
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bh * Lq + offs_m, lse, mask=row_ok)
