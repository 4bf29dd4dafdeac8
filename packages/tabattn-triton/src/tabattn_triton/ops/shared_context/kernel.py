"""Shared-context attention kernels for joint sampling: one online softmax over a dataset's
context K/V (shared by all its sample paths, never copied) and each path's own buffer K/V.

Rows of one (dataset g, kv head) are the (sample s, query head of the GQA group, new row q)
triples. Two tilings:
- folded (decode, few rows per sample): a tile holds rows of many samples, so the context
  tile feeds a tensor-core dot at Lq = 1; the buffers of the tile's samples, laid end to
  end, run through dots too, under a block-diagonal mask (a row sees its own sample's slots);
- per-sample (teacher forcing, many rows per sample): a tile holds rows of one sample, and
  context and buffer both run as dots.
Long contexts with few rows split the context across programs (flash-decoding); partial
results are merged by LSE in `shared_context_combine_kernel`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from tabattn_triton.ops.common import finish_softmax, load_rows, online_softmax_tile, pick_configs

# (BLOCK_M, BLOCK_N, warps, stages); the first is the single config when autotuning is off.
FWD_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [
        (32, 32, 4, 2),
        (32, 64, 4, 3),
        (64, 64, 4, 3),
        (64, 128, 8, 3),
        (128, 64, 8, 3),
        (16, 64, 4, 3),
        (16, 64, 2, 3),
        (16, 128, 4, 3),
        (32, 128, 4, 3),
    ]
]
AUTOTUNE_KEY = [
    "ROWS_BUCKET", "NC_BUCKET", "T_BUCKET", "BLOCK_D", "SAMPLE_TILES", "NUM_SPLITS",
    "DOT_PRECISION",
]  # fmt: skip


def _prune(configs, named_args, **kwargs):
    """Tiles fit shared memory; folded tiles keep BLOCK_M <= 64 (their buffer dot work grows
    with the samples per tile)."""
    block_d = named_args.get("BLOCK_D", kwargs.get("BLOCK_D"))
    kept = [
        c for c in configs
        if (c.kwargs["BLOCK_M"] + 2 * c.kwargs["BLOCK_N"]) * block_d <= 256 * 128
        and (kwargs.get("SAMPLE_TILES", named_args.get("SAMPLE_TILES")) or c.kwargs["BLOCK_M"] <= 64)
    ]  # fmt: skip
    return kept or configs[:1]


@triton.jit
def buffer_visible(qi, Lq, buffer_len, rule_bits, TEACHER_FORCING: tl.constexpr):
    """Buffer rows visible to new row qi: [0, visible).

    Decode: row qi occupies buffer slot T - Lq + qi and sees up to it, itself included when
    bit min(qi, 62) of rule_bits is set ("causal"), not when clear ("strict"); rows whose
    slot would be negative see none. Teacher forcing (Lq = 2 Nt): buf_i sees buf_0..buf_i,
    tgt_i sees buf_0..buf_{i-1}.
    """
    if TEACHER_FORCING:
        nt = Lq // 2
        vis = tl.where(qi < nt, qi + 1, qi - nt)
    else:
        sees_self = ((rule_bits >> tl.minimum(qi, 62).to(tl.int64)) & 1).to(tl.int32)
        vis = tl.maximum(buffer_len - Lq + qi + sees_self, 0)
    return vis


@triton.autotune(
    configs=pick_configs(FWD_CONFIGS),
    key=AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit(
    do_not_specialize=[
        "S", "Lq", "ctx_len", "buffer_len", "rule_bits", "split_len", "n_rows",
        "ROWS_BUCKET", "NC_BUCKET", "T_BUCKET",
    ]
)  # fmt: skip
def shared_context_fwd_kernel(
    Q, K_CTX, V_CTX, K_BUF, V_BUF, CTX_LENS, BUFFER_LEN, O, LSE, O_PART, LSE_PART,
    stride_qg, stride_qs, stride_qh, stride_qm, stride_qd,
    stride_kcg, stride_kch, stride_kcn, stride_kcd,
    stride_vcg, stride_vch, stride_vcn, stride_vcd,
    stride_kbg, stride_kbs, stride_kbh, stride_kbn, stride_kbd,
    stride_vbg, stride_vbs, stride_vbh, stride_vbn, stride_vbd,
    S, H, GROUP, Lq, ctx_len, buffer_len, rule_bits, D, qk_scale, split_len, n_rows,
    ROWS_BUCKET, NC_BUCKET, T_BUCKET,
    HAS_CTX_LENS: tl.constexpr,
    HAS_BUFFER: tl.constexpr,
    LEN_FROM_PTR: tl.constexpr,
    TEACHER_FORCING: tl.constexpr,
    SAMPLE_TILES: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Grid: (G * H_kv * row_blocks * NUM_SPLITS,); n_rows = G * S * H * Lq. One program: BLOCK_M rows of one
    (dataset, kv head) over one context split (and the buffer, in the last split).
    With LEN_FROM_PTR the valid buffer length is read from BUFFER_LEN (buffer_len = T_cap).
    Writes out/LSE (O, LSE contiguous [G, S, H, Lq, D] / [G, S, H, Lq]), or with splits the
    normalised partials (O_PART [NUM_SPLITS, rows, BLOCK_D] fp32, LSE_PART [NUM_SPLITS, rows]).
    """
    pid = tl.program_id(0).to(tl.int64)
    H_kv = H // GROUP
    rows_per_sample = GROUP * Lq
    if SAMPLE_TILES:
        row_blocks = S * tl.cdiv(rows_per_sample, BLOCK_M)
    else:
        row_blocks = tl.cdiv(S * rows_per_sample, BLOCK_M)
    split = pid % NUM_SPLITS
    rest = pid // NUM_SPLITS
    row_block = rest % row_blocks
    g_hkv = rest // row_blocks
    g = g_hkv // H_kv
    h_kv = g_hkv % H_kv
    if HAS_CTX_LENS:
        ctx_len = tl.load(CTX_LENS + g).to(tl.int32)

    offs = tl.arange(0, BLOCK_M)
    if SAMPLE_TILES:
        blocks_per_sample = tl.cdiv(rows_per_sample, BLOCK_M)
        sample = row_block // blocks_per_sample
        r = ((row_block % blocks_per_sample) * BLOCK_M + offs).to(tl.int32)
        row_ok = r < rows_per_sample
        s = tl.zeros_like(r).to(tl.int64) + sample
    else:
        flat = row_block * BLOCK_M + offs
        row_ok = flat < S * rows_per_sample
        s = flat // rows_per_sample
        r = (flat % rows_per_sample).to(tl.int32)
    qi = r % Lq
    h = h_kv * GROUP + r // Lq
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_ptrs = Q + g * stride_qg + s * stride_qs + h * stride_qh + qi * stride_qm
    q = tl.load(
        q_ptrs[:, None] + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # Context keys [lo, hi) of this split: full tiles unmasked, then the ragged tail.
    offs_n = tl.arange(0, BLOCK_N)
    all_cols = offs_n >= 0
    lo = (split * split_len).to(tl.int32)
    hi = tl.minimum(lo + split_len, ctx_len)
    full_stop = lo + tl.maximum(hi - lo, 0) // BLOCK_N * BLOCK_N
    kc_base = K_CTX + g * stride_kcg + h_kv * stride_kch
    vc_base = V_CTX + g * stride_vcg + h_kv * stride_vch
    for start in range(lo, full_stop, BLOCK_N):
        cols = start + offs_n
        k_t = tl.trans(load_rows(kc_base, cols, stride_kcn, stride_kcd, offs_d, all_cols, d_ok))
        v_t = load_rows(vc_base, cols, stride_vcn, stride_vcd, offs_d, all_cols, d_ok)
        acc, m_i, l_i = online_softmax_tile(
            acc, m_i, l_i, q, k_t, v_t, qk_scale, None, False, DOT_PRECISION
        )
    for start in range(full_stop, hi, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < hi
        k_t = tl.trans(load_rows(kc_base, cols, stride_kcn, stride_kcd, offs_d, col_ok, d_ok))
        v_t = load_rows(vc_base, cols, stride_vcn, stride_vcd, offs_d, col_ok, d_ok)
        acc, m_i, l_i = online_softmax_tile(
            acc, m_i, l_i, q, k_t, v_t, qk_scale, col_ok[None, :], True, DOT_PRECISION
        )

    # The path's own buffer rows [0, visible(q)), in the last split.
    if HAS_BUFFER:  # noqa: SIM102 (constexpr test, then a runtime one)
        if split == NUM_SPLITS - 1:
            if LEN_FROM_PTR:  # a device-side length (CUDA-graph decode), clamped to T_cap
                buffer_len = tl.minimum(tl.maximum(tl.load(BUFFER_LEN).to(tl.int32), 0), buffer_len)
            vis = buffer_visible(qi, Lq, buffer_len, rule_bits, TEACHER_FORCING)
            vis = tl.where(row_ok, vis, 0)
            buf_end = tl.max(vis, 0)
            kb_base = K_BUF + g * stride_kbg + h_kv * stride_kbh
            vb_base = V_BUF + g * stride_vbg + h_kv * stride_vbh
            if SAMPLE_TILES:
                kb_base += sample * stride_kbs
                vb_base += sample * stride_vbs
                for t_start in range(0, buf_end, BLOCK_N):
                    cols = t_start + offs_n
                    col_ok = cols < buf_end
                    k_t = tl.trans(
                        load_rows(kb_base, cols, stride_kbn, stride_kbd, offs_d, col_ok, d_ok)
                    )
                    v_t = load_rows(vb_base, cols, stride_vbn, stride_vbd, offs_d, col_ok, d_ok)
                    visible = cols[None, :] < vis[:, None]
                    acc, m_i, l_i = online_softmax_tile(
                        acc, m_i, l_i, q, k_t, v_t, qk_scale, visible, True, DOT_PRECISION
                    )
            else:
                # The buffers of the tile's samples s_lo..s_hi laid end to end (buf_end slots
                # each) run as one key sequence through dots; a row sees only its own
                # sample's slots (block-diagonal mask). Dot work grows with the samples per
                # tile, but each buffer is read once as a 2-D tile.
                first = row_block * BLOCK_M
                s_lo = first // rows_per_sample
                s_hi = (tl.minimum(first + BLOCK_M, S * rows_per_sample) - 1) // rows_per_sample
                n_keys = ((s_hi - s_lo + 1) * buf_end).to(tl.int32)
                own = (s - s_lo).to(tl.int32)
                for t_start in range(0, n_keys, BLOCK_N):
                    cols = t_start + offs_n
                    col_ok = cols < n_keys
                    key_sample = cols // tl.maximum(buf_end, 1)
                    slot = cols - key_sample * buf_end
                    sample_row = (s_lo + key_sample).to(tl.int64)
                    k_off = sample_row * stride_kbs + slot * stride_kbn
                    v_off = sample_row * stride_vbs + slot * stride_vbn
                    k_t = tl.trans(load_rows(kb_base, k_off, 1, stride_kbd, offs_d, col_ok, d_ok))
                    v_t = load_rows(vb_base, v_off, 1, stride_vbd, offs_d, col_ok, d_ok)
                    visible = (key_sample[None, :] == own[:, None]) & (slot[None, :] < vis[:, None])
                    acc, m_i, l_i = online_softmax_tile(
                        acc, m_i, l_i, q, k_t, v_t, qk_scale, visible, True, DOT_PRECISION
                    )

    out, lse = finish_softmax(acc, m_i, l_i)
    row_id = ((g * S + s) * H + h) * Lq + qi  # flat [G, S, H, Lq] index
    store_mask = row_ok[:, None] & d_ok[None, :]
    if NUM_SPLITS == 1:
        tl.store(
            O + row_id[:, None] * D + offs_d[None, :], out.to(O.dtype.element_ty), mask=store_mask
        )
        tl.store(LSE + row_id, lse, mask=row_ok)
    else:
        part = split * n_rows + row_id
        tl.store(O_PART + part[:, None] * BLOCK_D + offs_d[None, :], out, mask=store_mask)
        tl.store(LSE_PART + part, lse, mask=row_ok)


@triton.jit
def shared_context_combine_kernel(
    O_PART, LSE_PART, O, LSE, n_rows, D,
    NUM_SPLITS: tl.constexpr,
    SPLITS_P2: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):  # fmt: skip
    """Merge the NUM_SPLITS partial results of each row by their LSEs (-inf safe)."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    splits = tl.arange(0, SPLITS_P2)
    split_ok = splits < NUM_SPLITS
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    part = splits[:, None] * n_rows + rows[None, :]  # [SPLITS_P2, BLOCK_R]
    lse = tl.load(LSE_PART + part, mask=split_ok[:, None] & row_ok[None, :], other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp(lse - m_safe[None, :])  # 0 for empty splits
    total = tl.sum(w, 0)
    empty = total == 0.0
    w = w / tl.where(empty, 1.0, total)[None, :]
    o = tl.load(
        O_PART + part[:, :, None] * BLOCK_D + offs_d[None, None, :],
        mask=(split_ok[:, None] & row_ok[None, :])[:, :, None] & d_ok[None, None, :],
        other=0.0,
    )
    out = tl.sum(tl.where(w[:, :, None] > 0, w[:, :, None] * o, 0.0), 0)
    tl.store(
        O + rows[:, None] * D + offs_d[None, :],
        out.to(O.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )
    lse_out = tl.where(empty, float("-inf"), m_safe + tl.math.log(tl.where(empty, 1.0, total)))
    tl.store(LSE + rows, lse_out, mask=row_ok)
