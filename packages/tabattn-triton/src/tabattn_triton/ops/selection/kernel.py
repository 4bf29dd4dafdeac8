"""Selection (block-sparse, NSA-style) attention kernels: forward, backward dQ, backward dK/dV.

Varlen rows packed end to end: q [Tq, H, D], k/v [Tk, H_kv, D], any strides. Group-centric:
a forward / dQ program takes one kv head and a tile of BLOCK_H (row, query head) pairs, the
GROUP query heads of ROWS = BLOCK_H // HEAD_SLOTS consecutive rows (BLOCK_H >= 16 for
tl.dot; HEAD_SLOTS >= GROUP, a power of two; ROWS = 1 when it is BLOCK_H). It walks the
union of the blocks its rows selected, each K/V block read once for the whole tile, and
masks every row to the blocks it chose: where selections overlap (short contexts, few heads
per group) rows share the reads, and tile rows that one row's group would leave as padding
hold other rows instead.

Blocks are named by their first key's packed index. A row's index (sequence relative) counts
when it is >= 0 and its block holds a key the row sees (`row_limits`: the sequence's keys,
with causal the row's causal end); a repeated index counts once. One row per tile walks the
row's own indices (a repeat masked off in place); several walk the union listed by
`tile_union_kernel` (ascending, distinct, a bit per tile row that chose the block, a
count). Skipped entries are masked, not branched around, so the block loop has no branch
and the pipeliner prefetches the next block's K/V while this one computes. The backward
recomputes P from the saved LSE. dK/dV run one program per (kv head, key block, BLOCK_N keys
of it) over the rows that selected the block, listed by an inverted index (interface.py):
deterministic, no atomics.
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
FWD_AUTOTUNE_KEY = ["BLOCK_SIZE", "BLOCK_N", "BLOCK_H", "HEAD_SLOTS", "BLOCK_D", "DOT_PRECISION"]
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
def row_tile(
    BI, ROW_KEY_START, ROW_LIMITS, TILE_COUNTS, stride_bt, stride_bh, stride_bs, Tq, n_tiles,
    GROUP, n_sel,
    BLOCK_H: tl.constexpr,
    HEAD_SLOTS: tl.constexpr,
    BLOCK_S: tl.constexpr,
):  # fmt: skip
    """This program's tile (grid H_kv * n_tiles, kv-head-major: the programs running together
    gather from one kv head's K/V, which stays in L2 where all heads' would not). Tile row t
    is (row tile * ROWS + t // HEAD_SLOTS, query head h_kv * GROUP + t % HEAD_SLOTS). Returns
    the kv head, rows [BLOCK_H], heads, which pairs exist, each row's end of visible keys
    (packed index), the entries to walk and, with one row per tile, the walk over its own
    indices: their pointer, the row's first and end key, the indices [BLOCK_S]."""
    pid = tl.program_id(0).to(tl.int64)
    h_kv = pid // n_tiles
    offs_t = tl.arange(0, BLOCK_H)
    rows = (pid % n_tiles) * (BLOCK_H // HEAD_SLOTS) + offs_t // HEAD_SLOTS
    group_slot = offs_t % HEAD_SLOTS
    ok = (group_slot < GROUP) & (rows < Tq)
    rows = tl.where(ok, rows, 0)
    end_key = tl.load(ROW_KEY_START + rows) + tl.load(ROW_LIMITS + rows, mask=ok, other=0)
    row = pid % n_tiles
    bi_row = BI + row * stride_bt + h_kv * stride_bh
    slots = tl.arange(0, BLOCK_S)
    if BLOCK_H == HEAD_SLOTS:
        n_entries = n_sel
        first = tl.load(ROW_KEY_START + row)
        end = first + tl.load(ROW_LIMITS + row)
        own = tl.load(bi_row + slots * stride_bs, mask=slots < n_sel, other=-1).to(tl.int64)
    else:
        n_entries = tl.load(TILE_COUNTS + pid)
        first = row * 0
        end = row * 0
        own = tl.full([BLOCK_S], -1, tl.int64)
    return h_kv, rows, h_kv * GROUP + group_slot, ok, end_key, n_entries, bi_row, first, end, own


@triton.jit
def tile_entry(
    j, bi_row, first, end, own, end_key, TILE_KEYS, TILE_ROWS, stride_bs, stride_tk, Tk,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_SLOTS: tl.constexpr,
    BLOCK_S: tl.constexpr,
):  # fmt: skip
    """Entry j of the walk: the block's first key, each tile row's end of visible keys in it
    (the first key or less: the row did not choose it) and the end of the keys to load (0:
    none). One row per tile: the row's index at slot j (skipped: -1, past the row's keys, or
    a repeat of an earlier slot). Several: union entry j and its rows' bits (bit r: the
    tile's row r chose it)."""
    if BLOCK_H == HEAD_SLOTS:
        blk = tl.load(bi_row + j * stride_bs).to(tl.int64)
        key = first + blk * BLOCK_SIZE
        slots = tl.arange(0, BLOCK_S)
        repeat = tl.sum(((own == blk) & (slots < j)).to(tl.int32), 0) > 0
        visit = (blk >= 0) & (key < end) & (repeat == 0)
        load_end = tl.where(visit, tl.minimum(end, key + BLOCK_SIZE), 0)
        key = tl.where(visit, key, 0)
        kv_end = tl.zeros([BLOCK_H], tl.int64) + load_end
    else:
        at = tl.program_id(0).to(tl.int64) * stride_tk + j
        key = tl.load(TILE_KEYS + at)
        bits = tl.load(TILE_ROWS + at)
        chosen = ((bits >> (tl.arange(0, BLOCK_H) // HEAD_SLOTS)) & 1) != 0
        kv_end = tl.where(chosen, tl.minimum(end_key, key + BLOCK_SIZE), 0)
        load_end = tl.minimum(key + BLOCK_SIZE, Tk)
    return key, kv_end, load_end


@triton.jit
def tile_union_kernel(
    BI, ROW_KEY_START, ROW_LIMITS, KEYS, ROW_BITS, COUNTS, stride_bt, stride_bh, stride_bs,
    Tq, Tk, n_tiles, n_sel,
    BLOCK_SIZE: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_S: tl.constexpr,
):  # fmt: skip
    """Grid: (H_kv * n_tiles,), kv-head-major. The union walk of one tile of ROWS rows:
    KEYS [H_kv * n_tiles, ROWS * BLOCK_S] the distinct first keys of the blocks its rows
    chose, ascending, ROW_BITS (same shape, int32) bit r set where row r chose the block,
    COUNTS [H_kv * n_tiles] how many (entries past the count are not defined)."""
    pid = tl.program_id(0).to(tl.int64)
    h_kv = pid // n_tiles
    offs = tl.arange(0, ROWS * BLOCK_S)
    row = (pid % n_tiles) * ROWS + offs // BLOCK_S
    ok = (row < Tq) & (offs % BLOCK_S < n_sel)
    row = tl.where(ok, row, 0)
    idx = tl.load(
        BI + row * stride_bt + h_kv * stride_bh + (offs % BLOCK_S) * stride_bs, mask=ok, other=-1
    ).to(tl.int64)
    first = tl.load(ROW_KEY_START + row)
    start = first + idx * BLOCK_SIZE
    counted = (idx >= 0) & (start < first + tl.load(ROW_LIMITS + row, mask=ok, other=0))
    # (first key, tile row) pairs, ascending: a block's choosers are one run of equal keys
    none = Tk * ROWS  # past every pair, sorts last
    pairs = tl.sort(tl.where(counted, start * ROWS + offs // BLOCK_S, none))
    keys_out = KEYS + pid * (ROWS * BLOCK_S)
    bits_out = ROW_BITS + pid * (ROWS * BLOCK_S)
    tl.store(keys_out + offs, pairs)
    tl.debug_barrier()
    before = tl.load(keys_out + offs - 1, mask=offs > 0, other=-ROWS)
    after = tl.load(keys_out + offs + 1, mask=offs < ROWS * BLOCK_S - 1, other=none)
    tl.debug_barrier()
    key = pairs // ROWS
    used = pairs < none
    bit = tl.where(used & (pairs != before), 1 << (pairs % ROWS).to(tl.int32), 0)
    run_first = used & (key != before // ROWS)
    run_last = used & (key != after // ROWS)
    slot = tl.cumsum(run_first.to(tl.int32), 0) - 1  # the run's entry
    count = tl.sum(run_first.to(tl.int32), 0)
    bits_through = tl.cumsum(bit, 0)  # a run's bits: through its last minus before its first
    tl.store(keys_out + slot, key, mask=run_first)
    tl.store(bits_out + slot, bits_through - bit, mask=run_first)
    tl.debug_barrier()
    bits_before = tl.load(bits_out + slot, mask=run_last, other=0)
    tl.debug_barrier()
    tl.store(bits_out + slot, bits_through - bits_before, mask=run_last)
    tl.store(COUNTS + pid, count)


@triton.autotune(configs=pick_configs(FWD_CONFIGS), key=FWD_AUTOTUNE_KEY)
@triton.jit
def selection_fwd_kernel(
    Q, K, V, O, LSE, BI, ROW_KEY_START, ROW_LIMITS, TILE_KEYS, TILE_ROWS, TILE_COUNTS,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od,
    stride_bt, stride_bh, stride_bs, stride_tk,
    Tq, Tk, n_tiles, GROUP, n_sel, D, qk_scale,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_SLOTS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Grid: (H_kv * n_tiles,). One program: its tile's rows over the blocks they chose;
    one-pass online softmax in fp32, out and LSE stored once."""
    h_kv, rows, heads, ok, end_key, n_entries, bi_row, first, end, own = row_tile(
        BI, ROW_KEY_START, ROW_LIMITS, TILE_COUNTS, stride_bt, stride_bh, stride_bs, Tq,
        n_tiles, GROUP, n_sel, BLOCK_H, HEAD_SLOTS, BLOCK_S,
    )  # fmt: skip
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_ptrs = (
        Q + rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd
    )
    q = tl.load(q_ptrs, mask=ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + h_kv * stride_kh
    v_base = V + h_kv * stride_vh
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for j in range(0, n_entries):
        key, kv_end, load_end = tile_entry(
            j, bi_row, first, end, own, end_key, TILE_KEYS, TILE_ROWS, stride_bs, stride_tk, Tk,
            BLOCK_SIZE, BLOCK_H, HEAD_SLOTS, BLOCK_S,
        )  # fmt: skip
        for sub in tl.static_range(0, BLOCK_SIZE, BLOCK_N):
            cols = key + sub + offs_n
            col_ok = cols < load_end
            k_t = tl.trans(load_rows(k_base, cols, stride_kt, stride_kd, offs_d, col_ok, d_ok))
            v_t = load_rows(v_base, cols, stride_vt, stride_vd, offs_d, col_ok, d_ok)
            visible = cols[None, :] < kv_end[:, None]
            acc, m_i, l_i = online_softmax_tile(
                acc, m_i, l_i, q, k_t, v_t, qk_scale, visible, True, DOT_PRECISION
            )
    out, lse = finish_softmax(acc, m_i, l_i)
    o_ptrs = (
        O + rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :] * stride_od
    )
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=ok[:, None] & d_ok[None, :])
    tl.store(LSE + heads * Tq + rows, lse, mask=ok)


@triton.autotune(configs=pick_configs(FWD_CONFIGS), key=FWD_AUTOTUNE_KEY)
@triton.jit
def selection_bwd_dq_kernel(
    Q, K, V, O, DO, DQ, LSE, DELTA, BI, ROW_KEY_START, ROW_LIMITS, TILE_KEYS, TILE_ROWS,
    TILE_COUNTS,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od,
    stride_dot, stride_doh, stride_dod,
    stride_dqt, stride_dqh, stride_dqd,
    stride_bt, stride_bh, stride_bs, stride_tk,
    Tq, Tk, n_tiles, GROUP, n_sel, D, sm_scale, qk_scale,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_SLOTS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Grid: (H_kv * n_tiles,). One program: dQ of its tile's (row, head) pairs, re-walking
    their blocks; also stores delta = rowsum(O * dO) [H, Tq] for the dK/dV kernel."""
    h_kv, rows, heads, ok, end_key, n_entries, bi_row, first, end, own = row_tile(
        BI, ROW_KEY_START, ROW_LIMITS, TILE_COUNTS, stride_bt, stride_bh, stride_bs, Tq,
        n_tiles, GROUP, n_sel, BLOCK_H, HEAD_SLOTS, BLOCK_S,
    )  # fmt: skip
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    tile_ok = ok[:, None] & d_ok[None, :]
    q_ptrs = (
        Q + rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd
    )
    q = tl.load(q_ptrs, mask=tile_ok, other=0.0)
    o_ptrs = (
        O + rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :] * stride_od
    )
    o = tl.load(o_ptrs, mask=tile_ok, other=0.0)
    do_ptrs = (
        DO + rows[:, None] * stride_dot + heads[:, None] * stride_doh + offs_d[None, :] * stride_dod
    )
    do = tl.load(do_ptrs, mask=tile_ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + heads * Tq + rows, delta, mask=ok)
    # saved LSE in log2 units, +inf where a row saw nothing (P = 0 there)
    lse = tl.load(LSE + heads * Tq + rows, mask=ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    k_base = K + h_kv * stride_kh
    v_base = V + h_kv * stride_vh
    dq = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for j in range(0, n_entries):
        key, kv_end, load_end = tile_entry(
            j, bi_row, first, end, own, end_key, TILE_KEYS, TILE_ROWS, stride_bs, stride_tk, Tk,
            BLOCK_SIZE, BLOCK_H, HEAD_SLOTS, BLOCK_S,
        )  # fmt: skip
        for sub in tl.static_range(0, BLOCK_SIZE, BLOCK_N):
            dq = dq_tile(
                dq, q, do, lse, delta, k_base, v_base, key + sub, offs_n, kv_end,
                stride_kt, stride_kd, stride_vt, stride_vd, load_end, qk_scale, offs_d, d_ok,
                True, DOT_PRECISION,
            )  # fmt: skip
    dq_ptrs = (
        DQ + rows[:, None] * stride_dqt + heads[:, None] * stride_dqh + offs_d[None, :] * stride_dqd
    )
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=tile_ok)


@triton.autotune(
    configs=pick_configs(BWD_DKDV_CONFIGS),
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
