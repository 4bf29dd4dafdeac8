"""Hopper (sm90) forward of flash attention in Gluon: a TMA producer and warp-specialised
wgmma consumers, for the prefix masks of kernel.py (same contract, same LSE).

One CTA owns CONSUMERS * 64 query rows of one (sequence, head); each consumer warpgroup owns
64 of them. The pipeline, per key tile j (slot s = j % STAGES):

    producer (default partition, 4 warps)      consumer c (a worker warpgroup, 64 rows)
    Q[c] --TMA--> q_smem[c]     -> q_ready     wait q_ready
    wait k_empty[s]                            wait k_ready[s_j], v_ready[s_{j-1}]
    K_j  --TMA--> k_smem[s]     -> k_ready[s]  [wait turn[c]]  issue S_j = Q K_j^T
    wait v_empty[s]                                            issue O += P_{j-1} V_{j-1}
    V_j  --TMA--> v_smem[s]     -> v_ready[s]  [arrive turn[c+1]]
                                               wait S_j         -> arrive k_empty[s_j]
                                               softmax of S_j (masked on partial tiles)
                                               wait P_{j-1} V_{j-1} -> arrive v_empty[s_{j-1}]
                                               O *= alpha_j
                                               after the last tile: O += P V, O /= l,
                                               store O and LSE (masked rows)

`turn` (PINGPONG) makes the consumers issue their GEMMs in turn, so one warpgroup's
softmax runs under the other's GEMMs (FlashAttention-3 §3.1); the S_j / P_{j-1} V_{j-1}
order overlaps a warpgroup's own softmax with its next QK^T (§3.2). Every tile range comes
from common.py's `prefix_kv_end`, the rule the portable kernels use.

Loads go through rank-4 TMA descriptors over [B, H, L, D] with any strides (16-byte
aligned): rows past a tensor's end read as zero and are masked by the key range; with
varlen, rows past a sequence's end belong to the next one and are masked the same way.
The output is stored from registers with a row mask.
"""

from __future__ import annotations

from tabattn_triton.ops.common import (
    MASK_AR_ROWS,
    MASK_CAUSAL,
    MASK_CONTEXT,
    MASK_NONE,
    prefix_kv_end,
)
from tabattn_triton.ops.gluon_compat import (
    gl,
    gluon,
    mbarrier,
    tma_load,
    warpgroup_mma,
    warpgroup_mma_wait,
)

ROWS_PER_CONSUMER = 64
# Head dims with an sm90 path, and per head dim the configs (BLOCK_N, STAGES, CONSUMERS,
# PINGPONG). The first is the default (used when autotuning is off or a graph is being
# captured): the best at the large context-target shapes of
# bench/results/sm90_fwd_configs.json (H200). The consumer register budget follows from
# CONSUMERS (FlashAttention-3's 240 / 160). Only configs that compile without register
# spills are listed (CI checks it): BLOCK_N = 128 at D = 128 spills ~250 bytes under 240.
SM90_HEAD_DIMS = (64, 128)
SM90_FWD_CONFIGS = {
    64: [
        (128, 2, 2, True),
        (128, 3, 2, True),
        (128, 2, 2, False),
        (64, 3, 2, True),
        (64, 3, 3, True),
    ],
    128: [(64, 3, 2, False), (64, 3, 2, True), (64, 2, 2, True)],
}
CONSUMER_REGS = {2: 240, 3: 160}


@gluon.jit
def _cta_work(
    CTX_LENS, CU_Q, CU_K, H, GROUP, Lq, Lk, ctx_len, causal_offset,
    HAS_CTX_LENS: gl.constexpr, IS_VARLEN: gl.constexpr, BLOCK_M: gl.constexpr,
):  # fmt: skip
    """This CTA's tensor batch index, head, kv head, first query row of its sequence in the
    tensor, first key row, the sequence's Lq, Lk, context length and causal offset, and the
    CTA's first row within the sequence."""
    pid = gl.program_id(0)
    num_m_blocks = gl.cdiv(Lq, BLOCK_M)
    bh = pid // num_m_blocks
    b = bh // H
    h = bh % H
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
    return (
        b,
        h,
        h // GROUP,
        q_start,
        k_start,
        Lq,
        Lk,
        ctx_len,
        causal_offset,
        (pid % num_m_blocks) * BLOCK_M,
    )


@gluon.jit
def _key_tiles(
    row0, Lq, Lk, ctx_len, causal_offset, ar_buffer, ar_chunked,
    MASK: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr,
):  # fmt: skip
    """(tiles every row of [row0, row0 + ROWS) sees whole, tiles any row sees, at least 1),
    the first never above the second. Rows past Lq count as seeing everything for the first
    and nothing for the second, so a block with no row inside Lq has (1, 1)."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    rows = row0 + gl.arange(0, ROWS, layout=layout)
    kv_end = prefix_kv_end(rows, Lq, Lk, ctx_len, causal_offset, ar_buffer, ar_chunked, MASK)
    row_ok = rows < Lq
    full_end = gl.min(gl.where(row_ok, kv_end, Lk), axis=0)
    any_end = gl.max(gl.where(row_ok, kv_end, 0), axis=0)
    n_any = gl.maximum(gl.cdiv(any_end, BLOCK_N), 1)
    return gl.minimum(full_end // BLOCK_N, n_any), n_any


@gluon.jit
def _cta_key_tiles(
    row0, Lq, Lk, ctx_len, causal_offset, ar_buffer, ar_chunked,
    MASK: gl.constexpr, CONSUMERS: gl.constexpr, BLOCK_N: gl.constexpr,
):  # fmt: skip
    """The key tiles any row of the CTA sees (at least 1): producer and consumers agree."""
    n_tiles = 1
    for c in gl.static_range(CONSUMERS):
        _, n_any = _key_tiles(
            row0 + c * 64, Lq, Lk, ctx_len, causal_offset, ar_buffer, ar_chunked, MASK, 64, BLOCK_N
        )
        n_tiles = gl.maximum(n_tiles, n_any)
    return n_tiles


@gluon.jit
def _producer(
    descs, smem, bars, work,
    MASK: gl.constexpr, HAS_CTX_LENS: gl.constexpr, IS_VARLEN: gl.constexpr,
    BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CONSUMERS: gl.constexpr,
):  # fmt: skip
    """TMA loads: the CTA's Q once, then K and V tiles through STAGES-deep rings."""
    q_desc, k_desc, v_desc = descs
    q_smem, k_smem, v_smem = smem
    q_ready, k_ready, k_empty, v_ready, v_empty, _ = bars
    CTX_LENS, CU_Q, CU_K, H, GROUP, Lq, Lk, ctx_len, causal_offset, ar_buffer, ar_chunked = work
    BM: gl.constexpr = q_desc.block_type.shape[2]
    tb, h, h_kv, q_start, k_start, Lq, Lk, ctx_len, causal_offset, row0 = _cta_work(
        CTX_LENS, CU_Q, CU_K, H, GROUP, Lq, Lk, ctx_len, causal_offset,
        HAS_CTX_LENS, IS_VARLEN, CONSUMERS * BM,
    )  # fmt: skip
    n_tiles = _cta_key_tiles(
        row0, Lq, Lk, ctx_len, causal_offset, ar_buffer, ar_chunked, MASK, CONSUMERS, BLOCK_N
    )
    mbarrier.expect(q_ready, CONSUMERS * q_desc.block_type.nbytes)
    for c in gl.static_range(CONSUMERS):
        tma_load(q_desc, [tb, h, q_start + row0 + c * BM, 0], q_ready, q_smem.index(c))
    for j in range(n_tiles):
        slot = j % STAGES
        phase = (j // STAGES) & 1
        key = k_start + j * BLOCK_N
        mbarrier.wait(k_empty.index(slot), phase ^ 1)
        mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
        tma_load(k_desc, [tb, h_kv, key, 0], k_ready.index(slot), k_smem.index(slot))
        mbarrier.wait(v_empty.index(slot), phase ^ 1)
        mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
        tma_load(v_desc, [tb, h_kv, key, 0], v_ready.index(slot), v_smem.index(slot))


@gluon.jit
def _softmax_step(
    s, m_i, l_i, kv_end, key0, qk_scale, MASKED: gl.constexpr, s_layout: gl.constexpr
):
    """Online softmax of one score tile S [64, BLOCK_N] (log2 units): P, new max, new sum and
    the factor alpha for the accumulator. Rows that have seen no key keep max -inf, sum 0."""
    if MASKED:
        BN: gl.constexpr = s.type.shape[1]
        cols = key0 + gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout))
        s = gl.where(cols[None, :] < kv_end[:, None], s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
    if MASKED:
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = gl.exp2(s * qk_scale - m_use[:, None])
    alpha = gl.exp2(m_i - m_use)
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return p, m_new, l_i, alpha


@gluon.jit
def _consumer_tile(
    j, q, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn,
    o, m_i, l_i, p, kv_end, qk_scale,
    CID: gl.constexpr, MASKED: gl.constexpr, STAGES: gl.constexpr, CONSUMERS: gl.constexpr,
    PINGPONG: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr,
):  # fmt: skip
    """Key tile j >= 1: S_j = Q K_j^T and O += P_{j-1} V_{j-1} in flight together, then the
    softmax of S_j while P_{j-1} V_{j-1} finishes."""
    BM: gl.constexpr = q.type.shape[0]
    BN: gl.constexpr = k_smem.type.shape[3]
    D: gl.constexpr = k_smem.type.shape[4]
    slot = j % STAGES
    prev = (j - 1) % STAGES
    mbarrier.wait(k_ready.index(slot), (j // STAGES) & 1)
    mbarrier.wait(v_ready.index(prev), ((j - 1) // STAGES) & 1)
    if PINGPONG:
        mbarrier.wait(turn.index(CID), j & 1)
    k_t = k_smem.index(slot).reshape([BN, D]).permute((1, 0))
    s_tok = warpgroup_mma(
        q, k_t, gl.zeros([BM, BN], gl.float32, s_layout), use_acc=False, is_async=True
    )
    p_op = gl.convert_layout(p.to(q.dtype), gl.DotOperandLayout(0, o_layout, 2))
    o_tok = warpgroup_mma(p_op, v_smem.index(prev).reshape([BN, D]), o, is_async=True)
    if PINGPONG:
        mbarrier.arrive(turn.index((CID + 1) % CONSUMERS), count=1)
    s, o_tok, p_op = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok, o_tok, p_op))
    mbarrier.arrive(k_empty.index(slot), count=1)
    p, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, kv_end, j * BN, qk_scale, MASKED, s_layout)
    o, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok, p_op))
    mbarrier.arrive(v_empty.index(prev), count=1)
    o = o * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    return o, m_i, l_i, p


@gluon.jit
def _consumer(
    smem, bars, work, out, qk_scale,
    CID: gl.constexpr, MASK: gl.constexpr, HAS_CTX_LENS: gl.constexpr, IS_VARLEN: gl.constexpr,
    STAGES: gl.constexpr, CONSUMERS: gl.constexpr, PINGPONG: gl.constexpr,
):  # fmt: skip
    """64 query rows: QK^T, online softmax and P V over the CTA's key tiles; stores O, LSE."""
    q_smem, k_smem, v_smem = smem
    q_ready, k_ready, k_empty, v_ready, v_empty, turn = bars
    CTX_LENS, CU_Q, CU_K, H, GROUP, Lq, Lk, ctx_len, causal_offset, ar_buffer, ar_chunked = work
    O, LSE, stride_ob, stride_oh, stride_om, lse_len = out
    BM: gl.constexpr = q_smem.type.shape[3]
    D: gl.constexpr = q_smem.type.shape[4]
    BN: gl.constexpr = k_smem.type.shape[3]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16]
    )
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16]
    )
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    tb, h, _, q_start, _, Lq, Lk, ctx_len, causal_offset, row0 = _cta_work(
        CTX_LENS, CU_Q, CU_K, H, GROUP, Lq, Lk, ctx_len, causal_offset,
        HAS_CTX_LENS, IS_VARLEN, CONSUMERS * BM,
    )  # fmt: skip
    n_tiles = _cta_key_tiles(
        row0, Lq, Lk, ctx_len, causal_offset, ar_buffer, ar_chunked, MASK, CONSUMERS, BN
    )
    my_row0 = row0 + CID * BM
    n_full, _ = _key_tiles(
        my_row0, Lq, Lk, ctx_len, causal_offset, ar_buffer, ar_chunked, MASK, BM, BN
    )
    rows = my_row0 + gl.arange(0, BM, layout=row_layout)
    kv_end = prefix_kv_end(rows, Lq, Lk, ctx_len, causal_offset, ar_buffer, ar_chunked, MASK)
    kv_end = gl.minimum(kv_end, Lk)

    q = q_smem.index(CID).reshape([BM, D])
    mbarrier.wait(q_ready, 0)
    m_i = gl.full([BM], float("-inf"), gl.float32, row_layout)
    l_i = gl.zeros([BM], gl.float32, row_layout)
    o = gl.zeros([BM, D], gl.float32, o_layout)

    # Tile 0 (always masked: it may be the only, partial tile).
    mbarrier.wait(k_ready.index(0), 0)
    if PINGPONG:
        mbarrier.wait(turn.index(CID), 0)
    s_tok = warpgroup_mma(
        q,
        k_smem.index(0).reshape([BN, D]).permute((1, 0)),
        gl.zeros([BM, BN], gl.float32, s_layout),
        use_acc=False,
        is_async=True,
    )
    if PINGPONG:
        mbarrier.arrive(turn.index((CID + 1) % CONSUMERS), count=1)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok,))
    mbarrier.arrive(k_empty.index(0), count=1)
    p, m_i, l_i, _ = _softmax_step(s, m_i, l_i, kv_end, 0, qk_scale, True, s_layout)

    for j in range(1, n_full):
        o, m_i, l_i, p = _consumer_tile(
            j, q, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn,
            o, m_i, l_i, p, kv_end, qk_scale,
            CID, False, STAGES, CONSUMERS, PINGPONG, s_layout, o_layout,
        )  # fmt: skip
    for j in range(gl.maximum(n_full, 1), n_tiles):
        o, m_i, l_i, p = _consumer_tile(
            j, q, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn,
            o, m_i, l_i, p, kv_end, qk_scale,
            CID, True, STAGES, CONSUMERS, PINGPONG, s_layout, o_layout,
        )  # fmt: skip

    last = n_tiles - 1
    mbarrier.wait(v_ready.index(last % STAGES), (last // STAGES) & 1)
    p_op = gl.convert_layout(p.to(q.dtype), gl.DotOperandLayout(0, o_layout, 2))
    o_tok = warpgroup_mma(p_op, v_smem.index(last % STAGES).reshape([BN, D]), o, is_async=True)
    o, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok, p_op))
    mbarrier.arrive(v_empty.index(last % STAGES), count=1)

    # Epilogue: rows that saw no key give O = 0 and LSE = -inf.
    empty = l_i == 0.0
    l_safe = gl.where(empty, 1.0, l_i)
    lse = gl.where(empty, float("-inf"), (m_i + gl.log2(l_safe)) * 0.6931471805599453)
    row_ok = rows < Lq
    gl.store(LSE + (tb * H + h).to(gl.int64) * lse_len + q_start + rows, lse, mask=row_ok)
    out = (o / gl.convert_layout(l_safe, gl.SliceLayout(1, o_layout))[:, None]).to(q.dtype)
    o_rows = my_row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, o_layout))
    o_cols = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    o_base = O + tb.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh
    o_ptrs = o_base + (q_start + o_rows).to(gl.int64)[:, None] * stride_om + o_cols[None, :]
    gl.store(o_ptrs, out, mask=(o_rows < Lq)[:, None])


@gluon.jit
def attention_fwd_sm90_kernel(
    q_desc, k_desc, v_desc, O, LSE, CTX_LENS, CU_Q, CU_K,
    stride_ob, stride_oh, stride_om,
    H, GROUP, Lq, Lk, qk_scale, ctx_len, causal_offset, ar_buffer, ar_chunked, lse_len,
    MASK: gl.constexpr, HAS_CTX_LENS: gl.constexpr, IS_VARLEN: gl.constexpr,
    BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CONSUMERS: gl.constexpr,
    PINGPONG: gl.constexpr, CONSUMER_REGS: gl.constexpr,
):  # fmt: skip
    """Grid: (B * H * cdiv(Lq, CONSUMERS * 64),). Descriptors: rank 4 over [B, H, L, D],
    blocks [1, 1, 64, D] (q) and [1, 1, BLOCK_N, D] (k, v); O [B, H, Lq, D] with unit
    stride on D, LSE [B, H, lse_len] fp32."""
    BM: gl.constexpr = q_desc.block_type.shape[2]
    D: gl.constexpr = q_desc.block_type.shape[3]
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [CONSUMERS, 1, 1, BM, D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, 1, 1, BLOCK_N, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, 1, 1, BLOCK_N, D], v_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [CONSUMERS, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_ready, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=CONSUMERS)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(v_empty.index(i), count=CONSUMERS)
    for i in gl.static_range(CONSUMERS):
        mbarrier.init(turn.index(i), count=1)
    mbarrier.arrive(turn.index(0), count=1)  # consumer 0 issues first

    descs = (q_desc, k_desc, v_desc)
    smem = (q_smem, k_smem, v_smem)
    bars = (q_ready, k_ready, k_empty, v_ready, v_empty, turn)
    work = (CTX_LENS, CU_Q, CU_K, H, GROUP, Lq, Lk, ctx_len, causal_offset, ar_buffer, ar_chunked)
    out = (O, LSE, stride_ob, stride_oh, stride_om, lse_len)
    if CONSUMERS == 2:
        gl.warp_specialize(
            [
                (_producer, (descs, smem, bars, work, MASK, HAS_CTX_LENS, IS_VARLEN, BLOCK_N, STAGES, CONSUMERS)),
                (_consumer, (smem, bars, work, out, qk_scale, 0, MASK, HAS_CTX_LENS, IS_VARLEN, STAGES, CONSUMERS, PINGPONG)),
                (_consumer, (smem, bars, work, out, qk_scale, 1, MASK, HAS_CTX_LENS, IS_VARLEN, STAGES, CONSUMERS, PINGPONG)),
            ],
            [4, 4],
            [CONSUMER_REGS, CONSUMER_REGS],
        )  # fmt: skip
    else:
        gl.warp_specialize(
            [
                (_producer, (descs, smem, bars, work, MASK, HAS_CTX_LENS, IS_VARLEN, BLOCK_N, STAGES, CONSUMERS)),
                (_consumer, (smem, bars, work, out, qk_scale, 0, MASK, HAS_CTX_LENS, IS_VARLEN, STAGES, CONSUMERS, PINGPONG)),
                (_consumer, (smem, bars, work, out, qk_scale, 1, MASK, HAS_CTX_LENS, IS_VARLEN, STAGES, CONSUMERS, PINGPONG)),
                (_consumer, (smem, bars, work, out, qk_scale, 2, MASK, HAS_CTX_LENS, IS_VARLEN, STAGES, CONSUMERS, PINGPONG)),
            ],
            [4, 4, 4],
            [CONSUMER_REGS, CONSUMER_REGS, CONSUMER_REGS],
        )  # fmt: skip


def desc_type(dtype: str, rows: int, head_dim: int) -> str:
    """The signature type of a rank-4 TMA descriptor with blocks [1, 1, rows, head_dim]."""
    gl_dtype = {"bf16": gl.bfloat16, "fp16": gl.float16}[dtype]
    shape = [1, 1, rows, head_dim]
    layout = gl.NVMMASharedLayout.get_default_for(shape, gl_dtype)
    return f"tensordesc<{dtype}[{','.join(map(str, shape))}],{layout!r}>"


def compile_for_sm90(kernel, signature: dict[str, str], constexprs: dict):
    """Compile a Gluon kernel for sm90 without a GPU (CI's check); the constexprs are added
    to the signature. Returns Triton's compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    signature = signature | {n: "constexpr" for n in constexprs}
    source = GluonASTSource(kernel, signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


def compile_fwd_sm90(dtype: str, head_dim: int, config: tuple, mask: int = MASK_NONE, **flags):
    """The forward compiled for sm90: dtype "bf16" or "fp16", config one of
    SM90_FWD_CONFIGS[head_dim]."""
    block_n, stages, consumers, pingpong = config
    signature = {
        "q_desc": desc_type(dtype, ROWS_PER_CONSUMER, head_dim),
        "k_desc": desc_type(dtype, block_n, head_dim),
        "v_desc": desc_type(dtype, block_n, head_dim),
    }
    signature |= {
        "O": f"*{dtype}",
        "LSE": "*fp32",
        "CTX_LENS": "*i64",
        "CU_Q": "*i64",
        "CU_K": "*i64",
    }
    ints = ["stride_ob", "stride_oh", "stride_om", "H", "GROUP", "Lq", "Lk"]
    ints2 = ["ctx_len", "causal_offset", "ar_buffer", "ar_chunked", "lse_len"]
    signature |= {n: "i32" for n in ints} | {"qk_scale": "fp32"} | {n: "i32" for n in ints2}
    constexprs = {
        "MASK": mask,
        "HAS_CTX_LENS": flags.get("HAS_CTX_LENS", False),
        "IS_VARLEN": flags.get("IS_VARLEN", False),
        "BLOCK_N": block_n,
        "STAGES": stages,
        "CONSUMERS": consumers,
        "PINGPONG": pingpong,
        "CONSUMER_REGS": CONSUMER_REGS[consumers],
    }
    return compile_for_sm90(attention_fwd_sm90_kernel, signature, constexprs)


def ptxas_usage(compiled) -> dict[str, int]:
    """Registers and spill bytes that ptxas (Triton's own) reports for a compiled kernel."""
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        ptx = f"{tmp}/kernel.ptx"
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        run = subprocess.run(
            [get_ptxas(90).path, "-v", "--gpu-name=sm_90a", ptx, "-o", f"{tmp}/kernel.cubin"],
            capture_output=True,
            text=True,
            check=True,
        )
    text = run.stdout + run.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if not (regs and spills):
        raise RuntimeError(f"unexpected ptxas output: {text}")
    budgets = re.findall(r"setmaxnreg\.inc\.sync\.aligned\.u32\s+(\d+)", compiled.asm["ptx"])
    return {
        "registers": int(regs[1]),
        "spill_stores": int(spills[1]),
        "spill_loads": int(spills[2]),
        "shared": compiled.metadata.shared,
        "setmaxnreg_inc": sorted({int(b) for b in budgets}),
    }


def compile_cases() -> list[tuple[str, str, int, tuple, int]]:
    """(kernel, dtype, head dim, config, mask) that CI compiles: every forward config with
    the context mask, the default forward config of each head dim with every mask, fp16
    once, and the backward (config: its BLOCK_M) of each head dim with every mask. The
    context mask compiles with per-dataset lengths, causal with varlen (`_compile_flags`)."""
    from tabattn_triton.ops.attention.kernel_sm90_bwd import SM90_BWD_BLOCK_M

    masks = (MASK_NONE, MASK_CONTEXT, MASK_CAUSAL, MASK_AR_ROWS)
    cases = [("fwd", "fp16", 64, SM90_FWD_CONFIGS[64][0], MASK_CAUSAL)]
    for d, configs in SM90_FWD_CONFIGS.items():
        cases += [("fwd", "bf16", d, configs[0], m) for m in masks if m != MASK_CONTEXT]
        cases += [("fwd", "bf16", d, config, MASK_CONTEXT) for config in configs]
    for d, block_m in SM90_BWD_BLOCK_M.items():
        cases += [("bwd", "bf16", d, (block_m,), mask) for mask in masks]
    return cases


def _compile_flags(mask: int) -> dict[str, bool]:
    """The compile report's flags per mask: per-dataset context lengths, causal varlen."""
    return {"HAS_CTX_LENS": mask == MASK_CONTEXT, "IS_VARLEN": mask == MASK_CAUSAL}


def compile_report() -> list[dict]:
    """ptxas's usage of every compile case (CI's check, `python -m ...kernel_sm90`)."""
    from tabattn_triton.ops.attention.kernel_sm90_bwd import compile_bwd_sm90

    report = []
    for kernel, dtype, d, config, mask in compile_cases():
        flags = _compile_flags(mask)
        if kernel == "fwd":
            compiled = compile_fwd_sm90(dtype, d, config, mask=mask, **flags)
        else:
            compiled = compile_bwd_sm90(dtype, d, mask=mask, **flags)
        report.append({"case": [kernel, dtype, d, list(config), mask], **ptxas_usage(compiled)})
    return report


if __name__ == "__main__":  # the compile report of CI, as JSON
    import json

    print(json.dumps(compile_report()))
