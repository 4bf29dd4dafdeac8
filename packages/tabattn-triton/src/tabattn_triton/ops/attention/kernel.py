"""Flash attention kernels (forward, backward dK/dV, backward dQ) for prefix masks: none,
context-target, causal (any alignment) and the AR-TabPFN training row mask.

Layout [B, H, L, D] with any strides; GQA (query head h reads kv head h // GROUP); head dim
padded to BLOCK_D with masked loads. Per query block the visible keys split into tiles that
every row sees (run without a mask) and tiles that only some rows see (masked); tiles no row
sees are never visited. The backward recomputes P from the saved LSE (FlashAttention-2).
"""

from __future__ import annotations

import triton
import triton.language as tl

from tabattn_triton.ops.common import (
    finish_softmax,
    load_rows,
    online_softmax_tile,
    pick_configs,
    prefix_kv_end,
    prefix_query_blocks,
)


def _fits(c: triton.Config, block_d: int, dot_rows: tuple[str, str]) -> bool:
    """Keep tiles whose operands fit registers/shared memory at this head dim."""
    rows = c.kwargs[dot_rows[0]] + 2 * c.kwargs[dot_rows[1]]
    return rows * block_d <= 256 * 128 * (2 if c.num_warps == 8 else 1)


# (BLOCK_M, BLOCK_N, warps, stages); the first entry is the single config used when
# autotuning is off (it must fit every head dim up to 256).
FWD_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [
        (64, 32, 4, 2),
        (128, 128, 8, 3),
        (128, 128, 8, 2),
        (128, 64, 8, 4),
        (128, 64, 8, 3),
        (128, 64, 4, 3),
        (128, 32, 4, 3),
        (64, 64, 4, 3),
        (64, 64, 4, 2),
    ]
]
BWD_DKDV_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [
        (32, 32, 4, 2),
        (32, 128, 8, 3),
        (64, 128, 8, 3),
        (64, 128, 8, 2),
        (32, 64, 4, 3),
        (64, 64, 4, 2),
    ]
]
BWD_DQ_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [
        (32, 32, 4, 2),
        (128, 32, 8, 3),
        (128, 64, 8, 3),
        (128, 64, 8, 2),
        (64, 64, 4, 2),
        (64, 32, 4, 3),
    ]
]
AUTOTUNE_KEY = ["LQ_BUCKET", "LK_BUCKET", "BLOCK_D", "MASK", "GROUP_BUCKET", "DOT_PRECISION"]


def _prune(dot_rows: tuple[str, str]):
    def prune(configs, named_args, **kwargs):
        block_d = named_args.get("BLOCK_D", kwargs.get("BLOCK_D"))
        kept = [c for c in configs if _fits(c, block_d, dot_rows)]
        return kept or configs[:1]

    return prune


@triton.jit
def _sequence(CU_Q, CU_K, b, Lq, Lk, causal_offset, IS_VARLEN: tl.constexpr):
    """(tensor batch index, first query row, first key row, Lq, Lk, causal offset) of
    sequence b: a batch entry, or with IS_VARLEN a packed sequence of cu_seqlens offsets
    (its causal mask bottom-right aligned)."""
    if IS_VARLEN:
        q_start = tl.load(CU_Q + b)
        k_start = tl.load(CU_K + b)
        seq_q = (tl.load(CU_Q + b + 1) - q_start).to(tl.int32)
        seq_k = (tl.load(CU_K + b + 1) - k_start).to(tl.int32)
        return b * 0, q_start, k_start, seq_q, seq_k, seq_k - seq_q
    else:
        return b, 0, 0, Lq, Lk, causal_offset


@triton.jit
def query_block(
    CTX_LENS, CU_Q, CU_K, H, GROUP, Lq, Lk, ctx_len, causal_offset,
    HAS_CTX_LENS: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    """The query block of this program (grid B * H * cdiv(Lq, BLOCK_M)): tensor batch index,
    head, kv head, first query/key row, the sequence's Lq, Lk, context length and causal
    offset, the rows [BLOCK_M] and which of them exist."""
    pid = tl.program_id(0).to(tl.int64)
    num_m_blocks = tl.cdiv(Lq, BLOCK_M)
    bh = pid // num_m_blocks
    m_block = pid % num_m_blocks
    b = bh // H
    h = bh % H
    if HAS_CTX_LENS:
        ctx_len = tl.load(CTX_LENS + b).to(tl.int32)
    tb, q_start, k_start, Lq, Lk, causal_offset = _sequence(
        CU_Q, CU_K, b, Lq, Lk, causal_offset, IS_VARLEN
    )
    offs_m = (m_block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int32)
    return tb, h, h // GROUP, q_start, k_start, Lq, Lk, ctx_len, causal_offset, offs_m, offs_m < Lq


@triton.jit
def key_tiles(
    offs_m, row_ok, Lq, Lk, ctx_len, causal_offset, ar_buffer, ar_chunked,
    MASK: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Per-row key ends, the end of the key tiles every row sees whole (run unmasked) and the
    end of the keys any row sees (tiles past it are skipped)."""
    kv_end = prefix_kv_end(offs_m, Lq, Lk, ctx_len, causal_offset, ar_buffer, ar_chunked, MASK)
    full_end = tl.min(tl.where(row_ok, kv_end, Lk), 0)
    any_end = tl.max(tl.where(row_ok, kv_end, 0), 0)
    return kv_end, (full_end // BLOCK_N) * BLOCK_N, any_end


@triton.autotune(
    configs=pick_configs(FWD_CONFIGS),
    key=AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _prune(("BLOCK_M", "BLOCK_N"))},
)
@triton.jit
def attention_fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    CTX_LENS,
    CU_Q,
    CU_K,
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
    qk_scale,
    ctx_len,
    causal_offset,
    ar_buffer,
    ar_chunked,
    lse_len,
    LQ_BUCKET,
    LK_BUCKET,
    GROUP_BUCKET,
    MASK: tl.constexpr,
    HAS_CTX_LENS: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Grid: (B * H * cdiv(Lq, BLOCK_M),). One program: BLOCK_M query rows of one (b, h)."""
    tb, h, h_kv, q_start, k_start, Lq, Lk, ctx_len, causal_offset, offs_m, row_ok = query_block(
        CTX_LENS, CU_Q, CU_K, H, GROUP, Lq, Lk, ctx_len, causal_offset,
        HAS_CTX_LENS, IS_VARLEN, BLOCK_M,
    )  # fmt: skip
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = load_rows(
        Q + tb * stride_qb + h * stride_qh + q_start * stride_qm,
        offs_m,
        stride_qm,
        stride_qd,
        offs_d,
        row_ok,
        d_ok,
    )

    kv_end, full_stop, any_end = key_tiles(
        offs_m, row_ok, Lq, Lk, ctx_len, causal_offset, ar_buffer, ar_chunked, MASK, BLOCK_N
    )

    k_base = K + tb * stride_kb + h_kv * stride_kh + k_start * stride_kn
    v_base = V + tb * stride_vb + h_kv * stride_vh + k_start * stride_vn
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    all_rows = offs_n >= 0
    for start in range(0, full_stop, BLOCK_N):
        cols = start + offs_n
        k_t = tl.trans(load_rows(k_base, cols, stride_kn, stride_kd, offs_d, all_rows, d_ok))
        v_t = load_rows(v_base, cols, stride_vn, stride_vd, offs_d, all_rows, d_ok)
        acc, m_i, l_i = online_softmax_tile(
            acc, m_i, l_i, q, k_t, v_t, qk_scale, None, False, DOT_PRECISION
        )
    for start in range(full_stop, any_end, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < Lk
        k_t = tl.trans(load_rows(k_base, cols, stride_kn, stride_kd, offs_d, col_ok, d_ok))
        v_t = load_rows(v_base, cols, stride_vn, stride_vd, offs_d, col_ok, d_ok)
        visible = cols[None, :] < kv_end[:, None]
        acc, m_i, l_i = online_softmax_tile(
            acc, m_i, l_i, q, k_t, v_t, qk_scale, visible, True, DOT_PRECISION
        )

    out, lse = finish_softmax(acc, m_i, l_i)
    o_ptrs = (
        O
        + tb * stride_ob
        + h * stride_oh
        + (q_start + offs_m[:, None]) * stride_om
        + offs_d[None, :] * stride_od
    )
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + (tb * H + h) * lse_len + q_start + offs_m, lse, mask=row_ok)


@triton.jit
def attention_bwd_preprocess_kernel(
    O,
    DO,
    DELTA,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dod,
    H,
    Lq,
    D,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """delta[b, h, m] = sum_d O * dO (fp32), the row term of dS = P * (dP - delta)."""
    pid = tl.program_id(0).to(tl.int64)
    num_m_blocks = tl.cdiv(Lq, BLOCK_M)
    bh = pid // num_m_blocks
    b = bh // H
    h = bh % H
    offs_m = ((pid % num_m_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int32)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Lq
    d_ok = offs_d < D
    o = load_rows(
        O + b * stride_ob + h * stride_oh, offs_m, stride_om, stride_od, offs_d, row_ok, d_ok
    )
    do = load_rows(
        DO + b * stride_dob + h * stride_doh, offs_m, stride_dom, stride_dod, offs_d, row_ok, d_ok
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh * Lq + offs_m, delta, mask=row_ok)


@triton.jit
def load_row_stats(LSE, DELTA, stat_row, offs_m, row_ok):
    """Saved LSE in log2 units (+inf for rows that saw nothing, so P = 0) and delta."""
    lse = tl.load(LSE + stat_row + offs_m, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(DELTA + stat_row + offs_m, mask=row_ok, other=0.0)
    return lse, delta


@triton.jit
def _dkdv_tile(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    LSE,
    DELTA,
    stat_row,
    m_block,
    cols,
    stride_qm,
    stride_qd,
    stride_dom,
    stride_dod,
    Lq,
    Lk,
    ctx_len,
    causal_offset,
    ar_buffer,
    ar_chunked,
    qk_scale,
    offs_d,
    d_ok,
    MASK: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Accumulate dK, dV [BLOCK_N, BLOCK_D] of one key block over one block of query rows."""
    offs_m = (m_block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int32)
    row_ok = offs_m < Lq
    q = load_rows(q_base, offs_m, stride_qm, stride_qd, offs_d, row_ok, d_ok)
    do = load_rows(do_base, offs_m, stride_dom, stride_dod, offs_d, row_ok, d_ok)
    lse, delta = load_row_stats(LSE, DELTA, stat_row, offs_m, row_ok)
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
    p_t = tl.math.exp2(s_t - lse[None, :])
    if MASKED:
        kv_end = prefix_kv_end(offs_m, Lq, Lk, ctx_len, causal_offset, ar_buffer, ar_chunked, MASK)
        p_t = tl.where(cols[:, None] < kv_end[None, :], p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.autotune(
    configs=pick_configs(BWD_DKDV_CONFIGS),
    key=AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _prune(("BLOCK_N", "BLOCK_M"))},
)
@triton.jit
def attention_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    DK,
    DV,
    LSE,
    DELTA,
    CTX_LENS,
    CU_Q,
    CU_K,
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
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dod,
    stride_dkb,
    stride_dkh,
    stride_dkn,
    stride_dkd,
    stride_dvb,
    stride_dvh,
    stride_dvn,
    stride_dvd,
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
    lse_len,
    LQ_BUCKET,
    LK_BUCKET,
    GROUP_BUCKET,
    MASK: tl.constexpr,
    HAS_CTX_LENS: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Grid: (B * H_kv * cdiv(Lk, BLOCK_N),). One program: one key block of one kv head,
    summed over the GROUP query heads that read it (no atomics, deterministic)."""
    pid = tl.program_id(0).to(tl.int64)
    num_n_blocks = tl.cdiv(Lk, BLOCK_N)
    bh_kv = pid // num_n_blocks
    n_block = pid % num_n_blocks
    H_kv = H // GROUP
    b = bh_kv // H_kv
    h_kv = bh_kv % H_kv
    if HAS_CTX_LENS:
        ctx_len = tl.load(CTX_LENS + b).to(tl.int32)
    tb, q_start, k_start, Lq, Lk, causal_offset = _sequence(
        CU_Q, CU_K, b, Lq, Lk, causal_offset, IS_VARLEN
    )

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    k0 = (n_block * BLOCK_N).to(tl.int32)
    cols = k0 + tl.arange(0, BLOCK_N)
    col_ok = cols < Lk
    k_base = K + tb * stride_kb + h_kv * stride_kh + k_start * stride_kn
    v_base = V + tb * stride_vb + h_kv * stride_vh + k_start * stride_vn
    k = load_rows(k_base, cols, stride_kn, stride_kd, offs_d, col_ok, d_ok)
    v = load_rows(v_base, cols, stride_vn, stride_vd, offs_d, col_ok, d_ok)

    # Query blocks that see this key block: [m_lo, m_mid) partly (masked), [m_mid, m_hi) fully.
    m_lo, m_mid, m_hi = prefix_query_blocks(
        k0, tl.minimum(k0 + BLOCK_N, Lk), Lq, ctx_len, causal_offset, ar_buffer, MASK, BLOCK_M
    )

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(0, GROUP):
        h = h_kv * GROUP + g
        stat_row = (tb * H + h) * lse_len + q_start
        q_base = Q + tb * stride_qb + h * stride_qh + q_start * stride_qm
        do_base = DO + tb * stride_dob + h * stride_doh + q_start * stride_dom
        for m_block in range(m_lo, m_mid):
            dk, dv = _dkdv_tile(
                dk, dv, k, v, q_base, do_base, LSE, DELTA, stat_row, m_block, cols,
                stride_qm, stride_qd, stride_dom, stride_dod, Lq, Lk,
                ctx_len, causal_offset, ar_buffer, ar_chunked, qk_scale, offs_d, d_ok,
                MASK, True, DOT_PRECISION, BLOCK_M,
            )  # fmt: skip
        for m_block in range(m_mid, m_hi):
            dk, dv = _dkdv_tile(
                dk, dv, k, v, q_base, do_base, LSE, DELTA, stat_row, m_block, cols,
                stride_qm, stride_qd, stride_dom, stride_dod, Lq, Lk,
                ctx_len, causal_offset, ar_buffer, ar_chunked, qk_scale, offs_d, d_ok,
                MASK, False, DOT_PRECISION, BLOCK_M,
            )  # fmt: skip
    store_mask = col_ok[:, None] & d_ok[None, :]
    dk_ptrs = (
        DK
        + tb * stride_dkb
        + h_kv * stride_dkh
        + (k_start + cols[:, None]) * stride_dkn
        + offs_d[None, :] * stride_dkd
    )
    dv_ptrs = (
        DV
        + tb * stride_dvb
        + h_kv * stride_dvh
        + (k_start + cols[:, None]) * stride_dvn
        + offs_d[None, :] * stride_dvd
    )
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=store_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=store_mask)


@triton.jit
def dq_tile(
    dq,
    q,
    do,
    lse,
    delta,
    k_base,
    v_base,
    start,
    offs_n,
    kv_end,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    Lk,
    qk_scale,
    offs_d,
    d_ok,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Accumulate dQ [BLOCK_M, BLOCK_D] over one key tile."""
    cols = start + offs_n
    col_ok = cols < Lk
    k = load_rows(k_base, cols, stride_kn, stride_kd, offs_d, col_ok, d_ok)
    v = load_rows(v_base, cols, stride_vn, stride_vd, offs_d, col_ok, d_ok)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    p = tl.math.exp2(s - lse[:, None])
    if MASKED:
        p = tl.where(cols[None, :] < kv_end[:, None], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.autotune(
    configs=pick_configs(BWD_DQ_CONFIGS),
    key=AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _prune(("BLOCK_M", "BLOCK_N"))},
)
@triton.jit
def attention_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    DQ,
    LSE,
    DELTA,
    CTX_LENS,
    CU_Q,
    CU_K,
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
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dod,
    stride_dqb,
    stride_dqh,
    stride_dqm,
    stride_dqd,
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
    lse_len,
    LQ_BUCKET,
    LK_BUCKET,
    GROUP_BUCKET,
    MASK: tl.constexpr,
    HAS_CTX_LENS: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Grid: (B * H * cdiv(Lq, BLOCK_M),). One program: dQ of BLOCK_M rows of one (b, h)."""
    tb, h, h_kv, q_start, k_start, Lq, Lk, ctx_len, causal_offset, offs_m, row_ok = query_block(
        CTX_LENS, CU_Q, CU_K, H, GROUP, Lq, Lk, ctx_len, causal_offset,
        HAS_CTX_LENS, IS_VARLEN, BLOCK_M,
    )  # fmt: skip
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = load_rows(
        Q + tb * stride_qb + h * stride_qh + q_start * stride_qm,
        offs_m,
        stride_qm,
        stride_qd,
        offs_d,
        row_ok,
        d_ok,
    )
    do = load_rows(
        DO + tb * stride_dob + h * stride_doh + q_start * stride_dom,
        offs_m,
        stride_dom,
        stride_dod,
        offs_d,
        row_ok,
        d_ok,
    )
    lse, delta = load_row_stats(LSE, DELTA, (tb * H + h) * lse_len + q_start, offs_m, row_ok)

    kv_end, full_stop, any_end = key_tiles(
        offs_m, row_ok, Lq, Lk, ctx_len, causal_offset, ar_buffer, ar_chunked, MASK, BLOCK_N
    )

    k_base = K + tb * stride_kb + h_kv * stride_kh + k_start * stride_kn
    v_base = V + tb * stride_vb + h_kv * stride_vh + k_start * stride_vn
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, full_stop, BLOCK_N):
        dq = dq_tile(
            dq, q, do, lse, delta, k_base, v_base, start, offs_n, kv_end,
            stride_kn, stride_kd, stride_vn, stride_vd, Lk, qk_scale, offs_d, d_ok,
            False, DOT_PRECISION,
        )  # fmt: skip
    for start in range(full_stop, any_end, BLOCK_N):
        dq = dq_tile(
            dq, q, do, lse, delta, k_base, v_base, start, offs_n, kv_end,
            stride_kn, stride_kd, stride_vn, stride_vd, Lk, qk_scale, offs_d, d_ok,
            True, DOT_PRECISION,
        )  # fmt: skip
    dq_ptrs = (
        DQ
        + tb * stride_dqb
        + h * stride_dqh
        + (q_start + offs_m[:, None]) * stride_dqm
        + offs_d[None, :] * stride_dqd
    )
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
