"""Grouped GEMM with fused MLP epilogues: every GEMM of the grouped MLP (and of the plain MLP,
one group) forward and backward is one launch of `grouped_matmul_kernel`.

C[g] = A[g] @ B[g] for groups g (grid: row tiles, column tiles, groups); A: [G, M, Kd],
B: [G, Kd, N], C: [G, M, N] with any strides, including group stride 0 for an operand
shared by every group (the MLP input x) and swapped strides for transposed operands.
Epilogues (constexpr EPILOGUE), all in fp32 on the accumulator before the one store:

- EPI_NONE: C = acc.
- EPI_ACTIVATE: C = act(acc); with STORE_Z also Z = acc (the pre-activation the backward
  needs).
- EPI_ACT_GRAD: C = acc * act'(Z) (the backward through the activation, Z read at C's
  coordinates).

REDUCE_GROUPS sums over all groups inside one program instead (grid groups = 1):
C = sum_g A[g] @ B[g] (dx of the grouped MLP, x being shared by the groups).

Inference epilogues (the fused linear layer, `tabattn_triton.ops.linear`), in this order
before the activation epilogue's output is stored: + BIAS[n] (HAS_BIAS) before the
activation; then + R[m, n] (HAS_RESIDUAL); then, with NORM, a layer norm over the row
(weights NW, NB) — the program must hold whole rows: `full_row_matmul_kernel` sets BLOCK_N
to the row length's power of two.
"""

from __future__ import annotations

import triton
import triton.language as tl

from tabattn_triton.ops.common import bench_in_graph, pick_configs

EPI_NONE, EPI_ACTIVATE, EPI_ACT_GRAD = 0, 1, 2
# Activations (constexpr ACTIVATION), indexed by name in interface.ACTIVATION_IDS.
ACT_GELU, ACT_RELU, ACT_SILU = 0, 1, 2

SQRT1_2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); the first entry is the one config used when
# autotuning is off (small, so it fits every shape and the interpreter). Narrow columns
# serve d_out = 3 (head second GEMM, dw2), BLOCK_K = 16 the d_out-long reduction of dH.
MATMUL_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [
        (32, 32, 32, 4, 2),
        (128, 128, 64, 8, 3),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 128, 16, 8, 2),
        (128, 16, 64, 4, 4),
        (64, 16, 128, 4, 3),
        (64, 64, 64, 4, 2),
        (32, 64, 64, 4, 2),
    ]
]
AUTOTUNE_KEY = [
    "M_BUCKET", "N_BUCKET", "K_BUCKET", "EPILOGUE", "ACTIVATION", "STORE_Z", "REDUCE_GROUPS",
    "HAS_BIAS", "HAS_RESIDUAL", "NORM", "DOT_PRECISION",
]  # fmt: skip


def _prune(configs, named_args, **kwargs):
    """Drop tiles larger than the problem (e.g. 128 columns for d_out = 3)."""
    m, n, k = (named_args[key] for key in ("M_BUCKET", "N_BUCKET", "K_BUCKET"))

    def keep(c: triton.Config) -> bool:
        kw = c.kwargs
        return (
            kw["BLOCK_M"] <= max(m, 32)
            and kw["BLOCK_N"] <= max(n, 16)
            and kw["BLOCK_K"] <= max(k, 16)
        )

    return pick_configs(configs, keep)


@triton.jit
def _activate(z, ACTIVATION: tl.constexpr):
    if ACTIVATION == 0:
        out = 0.5 * z * (1.0 + tl.erf(z * SQRT1_2))
    elif ACTIVATION == 1:
        out = tl.maximum(z, 0.0)
    else:
        out = z * tl.sigmoid(z)
    return out


@triton.jit
def _activate_grad(z, ACTIVATION: tl.constexpr):
    """d act / dz."""
    if ACTIVATION == 0:
        out = 0.5 * (1.0 + tl.erf(z * SQRT1_2)) + z * INV_SQRT_2PI * tl.exp(-0.5 * z * z)
    elif ACTIVATION == 1:
        out = tl.where(z > 0.0, 1.0, 0.0)
    else:
        s = tl.sigmoid(z)
        out = s * (1.0 + z * (1.0 - s))
    return out


@triton.jit
def _grouped_matmul(
    A, B, C, Z, BIAS, R, NW, NB,
    M, N, Kd, G, eps,
    stride_ag, stride_am, stride_ak,
    stride_bg, stride_bk, stride_bn,
    stride_cg, stride_cm, stride_cn,
    stride_zg, stride_zm, stride_zn,
    stride_rm, stride_rn,
    M_BUCKET, N_BUCKET, K_BUCKET,
    EPILOGUE: tl.constexpr,
    ACTIVATION: tl.constexpr,
    STORE_Z: tl.constexpr,
    REDUCE_GROUPS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    NORM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), G or 1 with REDUCE_GROUPS); fp32
    accumulation and epilogues, the store cast to C's dtype (Z's for Z). BIAS, NW, NB: [N];
    R: [M, N] (strides stride_rm, stride_rn), shared by the groups."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    g = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    if REDUCE_GROUPS:
        g_first, g_end = g * 0, g * 0 + G
    else:
        g_first, g_end = g, g + 1
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for gg in range(g_first, g_end):
        a_ptrs = A + gg * stride_ag + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = B + gg * stride_bg + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
        for k0 in range(0, Kd, BLOCK_K):
            k_ok = offs_k < Kd - k0
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
    tile_ok = m_ok[:, None] & n_ok[None, :]
    z_offs = g * stride_zg + offs_m[:, None] * stride_zm + offs_n[None, :] * stride_zn
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if EPILOGUE == 1:
        if STORE_Z:
            tl.store(Z + z_offs, acc.to(Z.dtype.element_ty), mask=tile_ok)
        acc = _activate(acc, ACTIVATION)
    elif EPILOGUE == 2:
        z = tl.load(Z + z_offs, mask=tile_ok, other=0.0).to(tl.float32)
        acc = acc * _activate_grad(z, ACTIVATION)
    if HAS_RESIDUAL:
        r_ptrs = R + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rn
        acc += tl.load(r_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
    if NORM:  # whole rows: BLOCK_N >= N, one column tile
        mean = tl.sum(acc, 1) / N
        centred = tl.where(n_ok[None, :], acc - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 1) / N + eps)
        nw = tl.load(NW + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        nb = tl.load(NB + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        acc = centred * rstd[:, None] * nw[None, :] + nb[None, :]
    c_ptrs = C + g * stride_cg + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=tile_ok)


grouped_matmul_kernel = triton.autotune(
    configs=MATMUL_CONFIGS,
    key=AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _prune},
    do_bench=bench_in_graph,
)(_grouped_matmul)

# Whole-row tiles for the layer-norm epilogue: BLOCK_N is the row length's power of two
# (at most MAX_FULL_ROW), the configs vary the rest. First entry: the config without autotuning.
MAX_FULL_ROW = 256
FULL_ROW_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bk, w, s in [
        (16, 32, 4, 2),
        (32, 32, 4, 3),
        (64, 32, 4, 3),
        (64, 32, 8, 3),
        (128, 32, 8, 3),
        (32, 64, 4, 3),
        (64, 64, 8, 3),
    ]
]
full_row_matmul_kernel = triton.autotune(
    configs=pick_configs(FULL_ROW_CONFIGS),
    key=AUTOTUNE_KEY,
    do_bench=bench_in_graph,
)(
    triton.heuristics({"BLOCK_N": lambda args: max(16, triton.next_power_of_2(args["N"]))})(
        _grouped_matmul
    )
)
