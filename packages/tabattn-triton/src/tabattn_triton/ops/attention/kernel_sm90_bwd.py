"""Hopper (sm90) backward of flash attention in Gluon: one CTA per 128 keys of one
(sequence, kv head), a TMA producer and two wgmma consumer warpgroups of 64 keys each.

Per query block i of every head of the kv head's group (2-slot ring, slot s = i % 2):

    producer (default partition, 4 warps)      consumer c (a worker warpgroup, 64 keys)
    K[c], V[c] --TMA--> smem   -> kv_ready     wait kv_ready (once)
    wait empty[s]                              wait ready[s]
    Q_i, dO_i --TMA--> smem[s] -> ready[s]     S^T = K_c Q_i^T, dP^T = V_c dO_i^T (async)
                                               P^T = exp2(S^T - LSE_i) (masked)
                                               dV += P^T dO_i            (P^T from registers)
                                               dS^T = P^T (dP^T - Delta_i)
                                               dK += dS^T Q_i            (dS^T from registers)
                                               dS^T -> ds_smem[i % 2][c] -> arrive ds_full
                                               wait ds_full (both consumers' dS^T)
                                               dQ_i^T[:, half c] = K^T dS^T[:, half c]
                                                 (all 128 keys, this consumer's BM / 2 rows)
                                               -> arrive empty[s]; dQ_i^T half added
                                               after the last block: dK *= scale, store dK, dV

dQ is accumulated in fp32 (`DQ_ACC`, zeroed by the launcher) with relaxed atomics, one
partial sum per CTA and query block (each consumer adds half of its rows), and scaled and
cast by the launcher; Delta = rowsum(dO * O) comes from the portable
preprocess kernel. Key ends and query-block ranges come from common.py's `prefix_kv_end` and
`prefix_query_blocks`, the rule every kernel here reads.
"""

from __future__ import annotations

from tabattn_triton.ops.common import MASK_NONE, prefix_kv_end, prefix_query_blocks
from tabattn_triton.ops.gluon_compat import (
    barrier,
    fence_async_shared,
    gl,
    gluon,
    mbarrier,
    tma_load,
    warpgroup_mma,
    warpgroup_mma_wait,
)

KEYS_PER_CONSUMER = 64
CONSUMERS = 2
# Per head dim the query block BLOCK_M: the consumer holds dK, dV [64, D] and dQ^T [D, BM]
# in fp32 registers, so BM shrinks as D grows (CI checks that both compile without spills).
SM90_BWD_BLOCK_M = {64: 64, 128: 32}
CONSUMER_REGS = 240


@gluon.jit
def _cta_work(
    CTX_LENS, CU_Q, CU_K, H_KV, Lq, Lk, ctx_len, causal_offset,
    HAS_CTX_LENS: gl.constexpr, IS_VARLEN: gl.constexpr, BLOCK_KEYS: gl.constexpr,
):  # fmt: skip
    """This CTA's tensor batch index, kv head, first query and key row of its sequence in
    the tensors, the sequence's Lq, Lk, context length and causal offset, and its first key."""
    pid = gl.program_id(0)
    num_n_blocks = gl.cdiv(Lk, BLOCK_KEYS)
    bh = pid // num_n_blocks
    b = bh // H_KV
    h_kv = bh % H_KV
    if HAS_CTX_LENS:
        ctx_len = gl.load(CTX_LENS + b).to(gl.int32)
    if IS_VARLEN:
        q_start = gl.load(CU_Q + b).to(gl.int32)
        k_start = gl.load(CU_K + b).to(gl.int32)
        Lq = gl.load(CU_Q + b + 1).to(gl.int32) - q_start
        Lk = gl.load(CU_K + b + 1).to(gl.int32) - k_start
        causal_offset = Lk - Lq
        b = b * 0
    else:
        q_start = 0
        k_start = 0
    key0 = (pid % num_n_blocks) * BLOCK_KEYS
    return b, h_kv, q_start, k_start, Lq, Lk, ctx_len, causal_offset, key0


@gluon.jit
def _query_blocks(
    key0, Lq, Lk, ctx_len, causal_offset, ar_buffer,
    MASK: gl.constexpr, BM: gl.constexpr, BLOCK_KEYS: gl.constexpr,
):  # fmt: skip
    """(first query block, number of query blocks) that see keys [key0, key0 + BLOCK_KEYS):
    common.py's `prefix_query_blocks` (all masked per element here), none past Lk."""
    lo, _, hi = prefix_query_blocks(
        key0, gl.minimum(key0 + BLOCK_KEYS, Lk), Lq, ctx_len, causal_offset, ar_buffer, MASK, BM
    )
    return lo, gl.where(key0 < Lk, hi - lo, 0)


@gluon.jit
def _producer(
    descs, smem, bars, work,
    MASK: gl.constexpr, HAS_CTX_LENS: gl.constexpr, IS_VARLEN: gl.constexpr, BM: gl.constexpr,
):  # fmt: skip
    """TMA loads: the CTA's K and V once, then Q and dO blocks through a 2-slot ring."""
    q_desc, k_desc, v_desc, do_desc = descs
    q_smem, k_smem, v_smem, do_smem, _ = smem
    kv_ready, ready, empty, _ = bars
    CTX_LENS, CU_Q, CU_K, H_KV, GROUP, Lq, Lk, ctx_len, causal_offset, ar_buffer, _ = work
    KC: gl.constexpr = k_desc.block_type.shape[2]
    tb, h_kv, q_start, k_start, Lq, Lk, ctx_len, causal_offset, key0 = _cta_work(
        CTX_LENS, CU_Q, CU_K, H_KV, Lq, Lk, ctx_len, causal_offset,
        HAS_CTX_LENS, IS_VARLEN, 2 * KC,
    )  # fmt: skip
    first, n_blocks = _query_blocks(
        key0, Lq, Lk, ctx_len, causal_offset, ar_buffer, MASK, BM, 2 * KC
    )
    mbarrier.expect(kv_ready, 2 * (k_desc.block_type.nbytes + v_desc.block_type.nbytes))
    for c in gl.static_range(2):
        tma_load(k_desc, [tb, h_kv, k_start + key0 + c * KC, 0], kv_ready, k_smem.index(c))
        tma_load(v_desc, [tb, h_kv, k_start + key0 + c * KC, 0], kv_ready, v_smem.index(c))
    for t in range(GROUP * n_blocks):
        slot = t % 2
        head = h_kv * GROUP + t // n_blocks
        row = q_start + (first + t % n_blocks) * BM
        mbarrier.wait(empty.index(slot), ((t // 2) & 1) ^ 1)
        mbarrier.expect(ready.index(slot), q_desc.block_type.nbytes + do_desc.block_type.nbytes)
        tma_load(q_desc, [tb, head, row, 0], ready.index(slot), q_smem.index(slot))
        tma_load(do_desc, [tb, head, row, 0], ready.index(slot), do_smem.index(slot))


@gluon.jit
def _consumer(
    smem, bars, work, grads, qk_scale, scale,
    CID: gl.constexpr, MASK: gl.constexpr, HAS_CTX_LENS: gl.constexpr, IS_VARLEN: gl.constexpr,
):  # fmt: skip
    """64 keys: S^T, P^T, dP^T and dS^T per query block; dK, dV in registers; dQ of half the
    block's rows over the CTA's 128 keys, added atomically."""
    q_smem, k_smem, v_smem, do_smem, ds_smem = smem
    kv_ready, ready, empty, ds_full = bars
    CTX_LENS, CU_Q, CU_K, H_KV, GROUP, Lq, Lk, ctx_len, causal_offset, ar_buffer, ar_chunked = work
    DK, DV, DQ_ACC, LSE, DELTA, stride_kb, stride_kh, stride_km, lse_len = grads
    BM: gl.constexpr = q_smem.type.shape[3]
    D: gl.constexpr = q_smem.type.shape[4]
    KC: gl.constexpr = k_smem.type.shape[3]
    st_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BM, 16]
    )
    kv_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16]
    )
    col_layout: gl.constexpr = gl.SliceLayout(0, st_layout)
    row1_layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    tb, h_kv, q_start, k_start, Lq, Lk, ctx_len, causal_offset, key0 = _cta_work(
        CTX_LENS, CU_Q, CU_K, H_KV, Lq, Lk, ctx_len, causal_offset,
        HAS_CTX_LENS, IS_VARLEN, 2 * KC,
    )  # fmt: skip
    first, n_blocks = _query_blocks(
        key0, Lq, Lk, ctx_len, causal_offset, ar_buffer, MASK, BM, 2 * KC
    )
    my_key0 = key0 + CID * KC
    keys = my_key0 + gl.arange(0, KC, layout=gl.SliceLayout(1, st_layout))
    k_c = k_smem.index(CID).reshape([KC, D])
    v_c = v_smem.index(CID).reshape([KC, D])
    HALF: gl.constexpr = BM // 2
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HALF, 16]
    )
    dk = gl.zeros([KC, D], gl.float32, kv_layout)
    dv = gl.zeros([KC, D], gl.float32, kv_layout)
    dq_rows = gl.arange(0, D, layout=gl.SliceLayout(1, dq_layout))
    mbarrier.wait(kv_ready, 0)
    for t in range(GROUP * n_blocks):
        slot = t % 2
        head = h_kv * GROUP + t // n_blocks
        rows = (first + t % n_blocks) * BM + gl.arange(0, BM, layout=col_layout)
        row_ok = rows < Lq
        # The rows' key ends, one row per thread (few integer ops), then in the S^T columns.
        rows1 = (first + t % n_blocks) * BM + gl.arange(0, BM, layout=row1_layout)
        end1 = prefix_kv_end(rows1, Lq, Lk, ctx_len, causal_offset, ar_buffer, ar_chunked, MASK)
        end1 = gl.where(rows1 < Lq, gl.minimum(end1, Lk), 0)
        kv_end = gl.convert_layout(end1, col_layout)
        stats = (tb * GROUP * H_KV + head).to(gl.int64) * lse_len + q_start + rows
        lse2 = gl.load(LSE + stats, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = gl.load(DELTA + stats, mask=row_ok, other=0.0)

        mbarrier.wait(ready.index(slot), (t // 2) & 1)
        q = q_smem.index(slot).reshape([BM, D])
        do = do_smem.index(slot).reshape([BM, D])
        zeros = gl.zeros([KC, BM], gl.float32, st_layout)
        s_tok = warpgroup_mma(k_c, q.permute((1, 0)), zeros, use_acc=False, is_async=True)
        dp_tok = warpgroup_mma(v_c, do.permute((1, 0)), zeros, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok,))
        visible = keys[:, None] < kv_end[None, :]
        p = gl.where(visible, gl.exp2(s * qk_scale - lse2[None, :]), 0.0)
        p_op = gl.convert_layout(p.to(q.dtype), gl.DotOperandLayout(0, kv_layout, 2))
        dv_tok = warpgroup_mma(p_op, do, dv, is_async=True)
        dp, dv_tok, p_op = warpgroup_mma_wait(num_outstanding=1, deps=(dp_tok, dv_tok, p_op))
        ds = (p * (dp - delta[None, :])).to(q.dtype)
        ds_op = gl.convert_layout(ds, gl.DotOperandLayout(0, kv_layout, 2))
        dk_tok = warpgroup_mma(ds_op, q, dk, is_async=True)
        buf = t % 2
        ds_smem.index(2 * buf + CID).store(ds)
        fence_async_shared()
        barrier()
        mbarrier.arrive(ds_full.index(buf), count=1)
        mbarrier.wait(ds_full.index(buf), (t // 2) & 1)
        dq_tok = gl.zeros([D, HALF], gl.float32, dq_layout)
        for kh in gl.static_range(2):
            dq_tok = warpgroup_mma(
                k_smem.index(kh).reshape([KC, D]).permute((1, 0)),
                ds_smem.index(2 * buf + kh).slice(CID * HALF, HALF, dim=1),
                dq_tok, use_acc=kh > 0, is_async=True,
            )  # fmt: skip
        dv, dk, dq_t, ds_op, p_op = warpgroup_mma_wait(
            num_outstanding=0, deps=(dv_tok, dk_tok, dq_tok, ds_op, p_op)
        )
        mbarrier.arrive(empty.index(slot), count=1)
        dq_base = DQ_ACC + ((tb * GROUP * H_KV + head).to(gl.int64) * lse_len + q_start) * D
        my_rows = (
            (first + t % n_blocks) * BM
            + CID * HALF
            + gl.arange(0, HALF, layout=gl.SliceLayout(0, dq_layout))
        )
        dq_ptrs = dq_base + my_rows.to(gl.int64)[None, :] * D + dq_rows[:, None]
        gl.atomic_add(dq_ptrs, dq_t, mask=(my_rows < Lq)[None, :], sem="relaxed")

    out_keys = my_key0 + gl.arange(0, KC, layout=gl.SliceLayout(1, kv_layout))
    cols = gl.arange(0, D, layout=gl.SliceLayout(0, kv_layout))
    base = tb.to(gl.int64) * stride_kb + h_kv.to(gl.int64) * stride_kh
    offs = base + (k_start + out_keys).to(gl.int64)[:, None] * stride_km + cols[None, :]
    key_ok = (out_keys < Lk)[:, None]
    gl.store(DK + offs, (dk * scale).to(DK.dtype.element_ty), mask=key_ok)
    gl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=key_ok)


@gluon.jit
def attention_bwd_sm90_kernel(
    q_desc, k_desc, v_desc, do_desc, DK, DV, DQ_ACC, LSE, DELTA, CTX_LENS, CU_Q, CU_K,
    stride_kb, stride_kh, stride_km,
    H_KV, GROUP, Lq, Lk, qk_scale, scale, ctx_len, causal_offset, ar_buffer, ar_chunked,
    lse_len,
    MASK: gl.constexpr, HAS_CTX_LENS: gl.constexpr, IS_VARLEN: gl.constexpr,
    CONSUMER_REGS: gl.constexpr,
):  # fmt: skip
    """Grid: (B * H_kv * cdiv(Lk, 128),). Descriptors: rank 4 over [B, H, L, D], blocks
    [1, 1, BM, D] (q, do) and [1, 1, 64, D] (k, v). DK, DV [B, H_kv, Lk, D] with the same
    strides (unit on D); DQ_ACC fp32 [B, H, lse_len, D] contiguous, zeroed; LSE (natural
    log) and DELTA fp32 [B, H, lse_len]."""
    BM: gl.constexpr = q_desc.block_type.shape[2]
    D: gl.constexpr = q_desc.block_type.shape[3]
    KC: gl.constexpr = k_desc.block_type.shape[2]
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2, 1, 1, BM, D], q_desc.layout)
    do_smem = gl.allocate_shared_memory(do_desc.dtype, [2, 1, 1, BM, D], do_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [2, 1, 1, KC, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [2, 1, 1, KC, D], v_desc.layout)
    # dS^T of both consumers, double-buffered; swizzled in BM // 2 column atoms so each
    # consumer's half of the query rows is a whole-atom slice (the dQ^T GEMM's B operand).
    ds_layout: gl.constexpr = gl.NVMMASharedLayout(
        swizzle_byte_width=BM, element_bitwidth=16, rank=2
    )
    ds_smem = gl.allocate_shared_memory(q_desc.dtype, [4, KC, BM], ds_layout)
    ds_full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    kv_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_ready, count=1)
    for i in gl.static_range(2):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
        mbarrier.init(ds_full.index(i), count=2)

    descs = (q_desc, k_desc, v_desc, do_desc)
    smem = (q_smem, k_smem, v_smem, do_smem, ds_smem)
    bars = (kv_ready, ready, empty, ds_full)
    work = (
        CTX_LENS,
        CU_Q,
        CU_K,
        H_KV,
        GROUP,
        Lq,
        Lk,
        ctx_len,
        causal_offset,
        ar_buffer,
        ar_chunked,
    )
    grads = (DK, DV, DQ_ACC, LSE, DELTA, stride_kb, stride_kh, stride_km, lse_len)
    gl.warp_specialize(
        [
            (_producer, (descs, smem, bars, work, MASK, HAS_CTX_LENS, IS_VARLEN, BM)),
            (_consumer, (smem, bars, work, grads, qk_scale, scale, 0, MASK, HAS_CTX_LENS, IS_VARLEN)),
            (_consumer, (smem, bars, work, grads, qk_scale, scale, 1, MASK, HAS_CTX_LENS, IS_VARLEN)),
        ],
        [4, 4],
        [CONSUMER_REGS, CONSUMER_REGS],
    )  # fmt: skip


def compile_bwd_sm90(dtype: str, head_dim: int, mask: int = MASK_NONE, **flags):
    """The backward compiled for sm90 (CI's check): dtype "bf16" or "fp16"."""
    from tabattn_triton.ops.attention.kernel_sm90 import compile_for_sm90, desc_type

    block_m = SM90_BWD_BLOCK_M[head_dim]
    signature = {
        "q_desc": desc_type(dtype, block_m, head_dim),
        "k_desc": desc_type(dtype, KEYS_PER_CONSUMER, head_dim),
        "v_desc": desc_type(dtype, KEYS_PER_CONSUMER, head_dim),
        "do_desc": desc_type(dtype, block_m, head_dim),
    }
    signature |= {"DK": f"*{dtype}", "DV": f"*{dtype}"}
    signature |= {n: "*fp32" for n in ("DQ_ACC", "LSE", "DELTA")}
    signature |= {n: "*i64" for n in ("CTX_LENS", "CU_Q", "CU_K")}
    ints = ["stride_kb", "stride_kh", "stride_km", "H_KV", "GROUP", "Lq", "Lk"]
    ints2 = ["ctx_len", "causal_offset", "ar_buffer", "ar_chunked", "lse_len"]
    signature |= {n: "i32" for n in ints} | {"qk_scale": "fp32", "scale": "fp32"}
    signature |= {n: "i32" for n in ints2}
    constexprs = {
        "MASK": mask,
        "HAS_CTX_LENS": flags.get("HAS_CTX_LENS", False),
        "IS_VARLEN": flags.get("IS_VARLEN", False),
        "CONSUMER_REGS": CONSUMER_REGS,
    }
    return compile_for_sm90(attention_bwd_sm90_kernel, signature, constexprs)
