"""Per-block E4M3 quantisation kernel.

One program quantises one tile of BLOCK rows of one (batch, head) of x [B, H, L, D] (any
strides): optionally minus a per-(batch, head) mean (K smoothing), divided by the block's
scale (amax / 448 of the tile, or a static per-(batch, head) scale), clamped to ±448 and
cast to float8_e4m3fn. It also writes, when asked, the row dot of x with the mean of its kv
head (the LSE correction of K smoothing, computed from the unquantised rows). The output is
addressed through strides of its logical [B, H, L, D] view, so a [B, H, D, L] buffer (V as
the K-major B operand of the FP8 P·V dot on Hopper) is written through a permuted view.
"""

from __future__ import annotations

import triton
import triton.language as tl

from tabattn_triton.building_blocks import load_rows

# The mean pointer: unused, subtracted from x's rows (K), or dotted with them (Q).
MEAN_NONE, MEAN_SUBTRACT, MEAN_ROW_DOT = 0, 1, 2

FP8_MAX = tl.constexpr(448.0)
SCALE_FLOOR = tl.constexpr(
    1.1754943508222875e-38
)  # smallest normal fp32: x / scale never overflows


@triton.jit
def to_e4m3(x, dtype, ROUND_FIRST: tl.constexpr):
    """Cast fp32 x (within ±448) to the E4M3 `dtype`, rounding to nearest even.

    ROUND_FIRST (set under the Triton interpreter, whose fp32 -> fp8 cast mis-rounds values
    whose rounding carries into the exponent, e.g. 125.9 -> 64, and rounds ties away from
    zero): round to the E4M3 grid in fp32 first, so the cast is exact. Normal values keep
    3 mantissa bits (round-to-nearest-even on the fp32 bits); below 2**-6 the grid is 2**-9
    (adding and removing 1.5 * 2**14, whose fp32 ulp is 2**-9).
    """
    if ROUND_FIRST:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000
        normal = bits.to(tl.float32, bitcast=True)
        subnormal = (x + 24576.0) - 24576.0
        x = tl.where(tl.abs(x) < 0.015625, subnormal, normal)
    return x.to(dtype)


@triton.jit
def quantize_fp8_kernel(
    X,
    X8,
    SCALES,
    MEAN,
    ROW_DOT,
    stride_xb,
    stride_xh,
    stride_xl,
    stride_xd,
    stride_yb,
    stride_yh,
    stride_yl,
    stride_yd,
    H,
    GROUP,
    L,
    D,
    num_blocks,
    MEAN_MODE: tl.constexpr,
    STATIC_SCALE: tl.constexpr,
    ROUND_FIRST: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid: (B * H * cdiv(L, BLOCK),). SCALES [B, H, num_blocks] is written (per-block) or
    read (STATIC_SCALE: [B, H]); MEAN [B, H // GROUP, D] fp32; ROW_DOT [B, H, L] fp32.
    X8 strides are given in the logical [B, H, L, D] order (a transposed output is a
    permuted view)."""
    pid = tl.program_id(0).to(tl.int64)
    bh = pid // num_blocks
    blk = pid % num_blocks
    b = bh // H
    h = bh % H
    offs_l = (blk * BLOCK + tl.arange(0, BLOCK)).to(tl.int32)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_l < L
    d_ok = offs_d < D
    ok = row_ok[:, None] & d_ok[None, :]
    x = load_rows(
        X + b * stride_xb + h * stride_xh, offs_l, stride_xl, stride_xd, offs_d, row_ok, d_ok
    ).to(tl.float32)
    if MEAN_MODE == 1:
        mean = tl.load(MEAN + bh * D + offs_d, mask=d_ok, other=0.0)
        x = tl.where(ok, x - mean[None, :], 0.0)
    if MEAN_MODE == 2:
        mean = tl.load(MEAN + (b * (H // GROUP) + h // GROUP) * D + offs_d, mask=d_ok, other=0.0)
        tl.store(ROW_DOT + bh * L + offs_l, tl.sum(x * mean[None, :], 1), mask=row_ok)
    if STATIC_SCALE:
        scale = tl.load(SCALES + bh)
    else:
        amax = tl.max(tl.max(tl.abs(x), 1), 0)
        scale = tl.where(amax > 0.0, amax / FP8_MAX, 1.0)
        scale = tl.maximum(scale, SCALE_FLOOR)
        tl.store(SCALES + bh * num_blocks + blk, scale)
    y = to_e4m3(
        tl.minimum(tl.maximum(x / scale, -FP8_MAX), FP8_MAX), X8.dtype.element_ty, ROUND_FIRST
    )
    y_ptrs = (
        X8
        + b * stride_yb
        + h * stride_yh
        + offs_l[:, None] * stride_yl
        + offs_d[None, :] * stride_yd
    )
    tl.store(y_ptrs, y, mask=ok)
