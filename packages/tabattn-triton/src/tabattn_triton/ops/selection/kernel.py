"""Selection (block-sparse, NSA-style) attention kernels: forward, backward dQ, backward dK/dV.

Varlen rows packed end to end: q [Tq, H, D], k/v [Tk, H_kv, D], any strides. Group-centric:
one forward / dQ program takes one query row and one kv head, its query tile holds the GROUP
query heads of that kv head (padded to BLOCK_H >= 16 rows for tl.dot), so every selected K/V
block is read once for the whole group. Each of the row's n_sel block indices (sequence
relative) is visited when it is >= 0, holds a key the row sees (past the sequence's keys or,
with CAUSAL, past the row's causal end it is skipped) and did not occur at an earlier slot
(duplicates count once). A skipped slot is not branched around: its tile starts at the row's
visible end, so every load is masked off; the block loop then has no branch and the
pipeliner prefetches the next block's K/V while this one computes. The backward recomputes P from the saved LSE. dK/dV run one program
per (kv head, key block, BLOCK_N keys of it) over the rows that selected the block, listed
by an inverted index (interface.py): deterministic, no atomics.
"""

from __future__ import annotations

import triton
import triton.language as tl

from tabattn_triton.ops.attention.kernel import dq_tile, load_row_stats
from tabattn_triton.ops.common import finish_softmax, load_rows, online_softmax_tile, pick_configs

# (warps, stages); BLOCK_N is chosen by the launcher from the block size and head dim. The
# first entry is the single config used when autotuning is off.
FWD_CONFIGS = [
    triton.Config({}, num_warps=w, num_stages=s)
    for w, s in [(4, 2), (4, 3), (8, 2), (2, 2), (2, 3), (2, 4)]
]
# (ROW_TILES, warps, stages): the dK/dV query tile holds ROW_TILES * BLOCK_H (row, head) pairs.
BWD_DKDV_CONFIGS = [
    triton.Config({"ROW_TILES": r}, num_warps=w, num_stages=s)
    for r, w, s in [(1, 4, 2), (2, 4, 2), (4, 4, 2), (2, 8, 2), (4, 8, 3)]
]
AUTOTUNE_KEY = ["BLOCK_SIZE", "BLOCK_N", "BLOCK_H", "BLOCK_D", "CAUSAL", "DOT_PRECISION"]


def _prune_dkdv(configs, named_args, **kwargs):
    """Keep query tiles whose q/dO operands and dK/dV accumulators fit at this head dim."""

    def arg(name):
        return named_args.get(name, kwargs.get(name))

    budget = 256 * 128 * 2
    kept = [
        c for c in configs
        if (2 * c.kwargs["ROW_TILES"] * arg("BLOCK_H") + 4 * arg("BLOCK_N")) * arg("BLOCK_D")
        <= budget * (2 if c.num_warps == 8 else 1)
    ]  # fmt: skip
    return kept or configs[:1]


@triton.jit
def _row_keys(SEQ, CU_Q, CU_K, row, CAUSAL: tl.constexpr):
    """Packed offset of the first key of `row`'s sequence and the number of its keys the row
    sees (bottom-right causal: Lk - Lq + i + 1 for row i, clamped to [0, Lk])."""
    b = tl.load(SEQ + row).to(tl.int64)
    q_start = tl.load(CU_Q + b)
    k_start = tl.load(CU_K + b)
    seq_k = tl.load(CU_K + b + 1) - k_start
    limit = seq_k
    if CAUSAL:
        seq_q = tl.load(CU_Q + b + 1) - q_start
        limit = tl.minimum(tl.maximum(seq_k - seq_q + (row - q_start) + 1, 0), seq_k)
    return k_start, limit


@triton.jit
def selected_block(BI, i, stride_bs, slots, idx, limit, BLOCK_SIZE: tl.constexpr):
    """First key of the block at slot i when it is visited (index >= 0, not at an earlier
    slot, starting before the row's visible end `limit`), else `limit`: every key of a tile
    starting there is masked off."""
    blk = tl.load(BI + i * stride_bs).to(tl.int64)
    start = blk * BLOCK_SIZE
    earlier = tl.sum(((idx == blk) & (slots < i)).to(tl.int32), 0)
    return tl.where((blk >= 0) & (start < limit) & (earlier == 0), start, limit)


@triton.jit
def group_tile(
    K, V, BI, SEQ, CU_Q, CU_K, stride_kt, stride_kh, stride_vt, stride_vh, stride_bt,
    stride_bh, stride_bs, Tq, H_kv, GROUP, n_sel,
    CAUSAL: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_S: tl.constexpr,
):  # fmt: skip
    """This program's (row, kv head) (grid Tq * H_kv, kv-head-major: the programs running
    together gather from one kv head's K/V, which stays in L2 where all heads' would not):
    the row, the group's first query head, its heads [BLOCK_H] and which exist, K/V bases
    of its sequence and kv head, its visible key count, and its block-index row (pointer,
    slots, indices)."""
    pid = tl.program_id(0).to(tl.int64)
    h_kv = pid // Tq
    row = pid % Tq
    k_start, limit = _row_keys(SEQ, CU_Q, CU_K, row, CAUSAL)
    offs_h = tl.arange(0, BLOCK_H)
    h0 = h_kv * GROUP
    k_base = K + k_start * stride_kt + h_kv * stride_kh
    v_base = V + k_start * stride_vt + h_kv * stride_vh
    bi = BI + row * stride_bt + h_kv * stride_bh
    slots = tl.arange(0, BLOCK_S)
    idx = tl.load(bi + slots * stride_bs, mask=slots < n_sel, other=-1).to(tl.int64)
    return row, h0, h0 + offs_h, offs_h < GROUP, k_base, v_base, limit, bi, slots, idx


@triton.autotune(configs=pick_configs(FWD_CONFIGS, lambda c: True), key=AUTOTUNE_KEY)
@triton.jit
def selection_fwd_kernel(
    Q, K, V, O, LSE, BI, SEQ, CU_Q, CU_K,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od,
    stride_bt, stride_bh, stride_bs,
    Tq, H_kv, GROUP, n_sel, D, qk_scale,
    CAUSAL: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Grid: (Tq * H_kv,). One program: the GROUP query heads of one row over its blocks;
    one-pass online softmax in fp32, out and LSE stored once."""
    row, h0, heads, head_ok, k_base, v_base, limit, bi, slots, idx = group_tile(
        K, V, BI, SEQ, CU_Q, CU_K, stride_kt, stride_kh, stride_vt, stride_vh, stride_bt,
        stride_bh, stride_bs, Tq, H_kv, GROUP, n_sel, CAUSAL, BLOCK_H, BLOCK_S,
    )  # fmt: skip
    offs_h = tl.arange(0, BLOCK_H)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = load_rows(
        Q + row * stride_qt + h0 * stride_qh, offs_h, stride_qh, stride_qd, offs_d, head_ok, d_ok
    )
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for i in range(0, n_sel):
        start = selected_block(bi, i, stride_bs, slots, idx, limit, BLOCK_SIZE)
        for sub in tl.static_range(0, BLOCK_SIZE, BLOCK_N):
            cols = start + sub + offs_n
            col_ok = (cols < limit) & (sub + offs_n < BLOCK_SIZE)
            k_t = tl.trans(load_rows(k_base, cols, stride_kt, stride_kd, offs_d, col_ok, d_ok))
            v_t = load_rows(v_base, cols, stride_vt, stride_vd, offs_d, col_ok, d_ok)
            visible = (offs_h >= 0)[:, None] & col_ok[None, :]
            acc, m_i, l_i = online_softmax_tile(
                acc, m_i, l_i, q, k_t, v_t, qk_scale, visible, True, DOT_PRECISION
            )
    out, lse = finish_softmax(acc, m_i, l_i)
    o_ptrs = O + row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=head_ok[:, None] & d_ok[None, :])
    tl.store(LSE + heads * Tq + row, lse, mask=head_ok)


@triton.autotune(configs=pick_configs(FWD_CONFIGS, lambda c: True), key=AUTOTUNE_KEY)
@triton.jit
def selection_bwd_dq_kernel(
    Q, K, V, O, DO, DQ, LSE, DELTA, BI, SEQ, CU_Q, CU_K,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od,
    stride_dot, stride_doh, stride_dod,
    stride_dqt, stride_dqh, stride_dqd,
    stride_bt, stride_bh, stride_bs,
    Tq, H_kv, GROUP, n_sel, D, sm_scale, qk_scale,
    CAUSAL: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Grid: (Tq * H_kv,). One program: dQ of the GROUP query heads of one row, re-walking
    its blocks; also stores delta = rowsum(O * dO) [H, Tq] for the dK/dV kernel."""
    row, h0, heads, head_ok, k_base, v_base, limit, bi, slots, idx = group_tile(
        K, V, BI, SEQ, CU_Q, CU_K, stride_kt, stride_kh, stride_vt, stride_vh, stride_bt,
        stride_bh, stride_bs, Tq, H_kv, GROUP, n_sel, CAUSAL, BLOCK_H, BLOCK_S,
    )  # fmt: skip
    offs_h = tl.arange(0, BLOCK_H)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = load_rows(
        Q + row * stride_qt + h0 * stride_qh, offs_h, stride_qh, stride_qd, offs_d, head_ok, d_ok
    )
    o_base = O + row * stride_ot + h0 * stride_oh
    o = load_rows(o_base, offs_h, stride_oh, stride_od, offs_d, head_ok, d_ok)
    do_base = DO + row * stride_dot + h0 * stride_doh
    do = load_rows(do_base, offs_h, stride_doh, stride_dod, offs_d, head_ok, d_ok)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + heads * Tq + row, delta, mask=head_ok)
    # saved LSE in log2 units, +inf where a row saw nothing (P = 0 there)
    lse = tl.load(LSE + heads * Tq + row, mask=head_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    kv_end = tl.zeros_like(offs_h).to(tl.int64) + limit
    dq = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for i in range(0, n_sel):
        start = selected_block(bi, i, stride_bs, slots, idx, limit, BLOCK_SIZE)
        for sub in tl.static_range(0, BLOCK_SIZE, BLOCK_N):
            # keys past the block (sub tiles wider than it) are masked by the block end
            ends = tl.minimum(kv_end, start + BLOCK_SIZE)
            dq = dq_tile(
                dq, q, do, lse, delta, k_base, v_base, start + sub, offs_n, ends,
                stride_kt, stride_kd, stride_vt, stride_vd, limit, qk_scale, offs_d, d_ok,
                True, DOT_PRECISION,
            )  # fmt: skip
    dq_ptrs = DQ + row * stride_dqt + heads[:, None] * stride_dqh + offs_d[None, :] * stride_dqd
    tl.store(
        dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=head_ok[:, None] & d_ok[None, :]
    )


@triton.autotune(
    configs=pick_configs(BWD_DKDV_CONFIGS, lambda c: True),
    key=AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _prune_dkdv},
)
@triton.jit
def selection_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, CU_Q, CU_K, BLOCK_SEQ, BLOCK_BASE, ENTRY_OFFSETS, ROWS,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_dot, stride_doh, stride_dod,
    stride_dkt, stride_dkh, stride_dkd,
    stride_dvt, stride_dvh, stride_dvd,
    Tq, GROUP, num_blocks, D, sm_scale, qk_scale,
    CAUSAL: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    GROUP_P2: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ROW_TILES: tl.constexpr,
):  # fmt: skip
    """Grid: (H_kv * num_blocks * cdiv(BLOCK_SIZE, BLOCK_N),), num_blocks counting every
    sequence's key blocks. One program: dK, dV of BLOCK_N keys of one block and kv head,
    summed over the rows in ROWS[ENTRY_OFFSETS[h_kv * num_blocks + block] : ...+1] (rows
    that selected the block, each once, ascending; -1 = skip) and the GROUP heads of each."""
    pid = tl.program_id(0).to(tl.int64)
    sub = pid % ((BLOCK_SIZE + BLOCK_N - 1) // BLOCK_N)
    key = pid // ((BLOCK_SIZE + BLOCK_N - 1) // BLOCK_N)  # h_kv * num_blocks + global block
    h_kv = key // num_blocks
    gblk = key % num_blocks
    b = tl.load(BLOCK_SEQ + gblk).to(tl.int64)
    q_start = tl.load(CU_Q + b)
    k_start = tl.load(CU_K + b)
    seq_q = tl.load(CU_Q + b + 1) - q_start
    seq_k = tl.load(CU_K + b + 1) - k_start
    first = (gblk - tl.load(BLOCK_BASE + b)) * BLOCK_SIZE + sub * BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    cols = first + offs_n  # sequence-relative keys
    col_ok = (cols < seq_k) & (sub * BLOCK_N + offs_n < BLOCK_SIZE)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    k_base = K + k_start * stride_kt + h_kv * stride_kh
    v_base = V + k_start * stride_vt + h_kv * stride_vh
    k = load_rows(k_base, cols, stride_kt, stride_kd, offs_d, col_ok, d_ok)
    v = load_rows(v_base, cols, stride_vt, stride_vd, offs_d, col_ok, d_ok)

    # Tile row t holds (entry lo + t // GROUP_P2, head t % GROUP_P2 of the group).
    offs_t = tl.arange(0, ROW_TILES * BLOCK_H)
    entry = offs_t // GROUP_P2
    g = offs_t % GROUP_P2
    heads = h_kv * GROUP + g
    lo = tl.load(ENTRY_OFFSETS + key)
    hi = tl.load(ENTRY_OFFSETS + key + 1)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for e0 in range(lo, hi, ROW_TILES * BLOCK_H // GROUP_P2):
        e = e0 + entry
        row = tl.load(ROWS + e, mask=e < hi, other=-1).to(tl.int64)
        ok = (row >= 0) & (g < GROUP)
        row = tl.where(ok, row, 0)
        q_ptrs = Q + row[:, None] * stride_qt + heads[:, None] * stride_qh
        q = tl.load(
            q_ptrs + offs_d[None, :] * stride_qd, mask=ok[:, None] & d_ok[None, :], other=0.0
        )
        do_ptrs = DO + row[:, None] * stride_dot + heads[:, None] * stride_doh
        do = tl.load(
            do_ptrs + offs_d[None, :] * stride_dod, mask=ok[:, None] & d_ok[None, :], other=0.0
        )
        lse, delta = load_row_stats(LSE, DELTA, row, heads * Tq, ok)
        end = tl.zeros_like(row) + seq_k
        if CAUSAL:
            end = tl.minimum(tl.maximum(seq_k - seq_q + (row - q_start) + 1, 0), seq_k)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        p_t = tl.math.exp2(s_t - lse[None, :])
        p_t = tl.where((cols[:, None] < end[None, :]) & ok[None, :], p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    store_mask = col_ok[:, None] & d_ok[None, :]
    keys = k_start + cols[:, None]
    dk_ptrs = DK + keys * stride_dkt + h_kv * stride_dkh + offs_d[None, :] * stride_dkd
    dv_ptrs = DV + keys * stride_dvt + h_kv * stride_dvh + offs_d[None, :] * stride_dvd
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=store_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=store_mask)
