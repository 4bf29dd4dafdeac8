"""Fused Gaussian-mixture negative log-likelihood kernels (forward partial sums, the final
sum, backward).

Rows are independent: row r holds y_r and the K components (logits, loc, scale) of its
mixture, read as [BLOCK_R, BLOCK_K] tiles with any row and component strides (K padded to
a power of two with masked loads). Everything per component stays in registers; the math is
fp32 whatever the input dtypes.

Forward: each program writes the (masked) sum of its rows' nll and of their weights to
PARTIAL; one program then sums the partials in a fixed order (deterministic) into the loss
and the total weight W. Backward recomputes every per-component term from the inputs and
reads only the upstream gradient and W.

Block sizes are a function of K (see interface.row_block), not autotuned: the forward's
partial-sum count depends on BLOCK_R, and the kernels are memory-bound streams.
"""

from __future__ import annotations

import triton
import triton.language as tl

HALF_LOG_2PI = tl.constexpr(0.9189385332046727)  # log(2 pi) / 2


@triton.jit
def _load_mixture(
    Y, LOGITS, LOC, SCALE, rows, row_ok, offs_k, k_ok,
    stride_y, stride_lr, stride_lk, stride_mr, stride_mk, stride_sr, stride_sk,
):  # fmt: skip
    """y [BLOCK_R] and logits, loc, scale [BLOCK_R, BLOCK_K] as fp32; padded rows and
    components read as (0, 0, 0, 1) so every term stays finite."""
    tile_ok = row_ok[:, None] & k_ok[None, :]
    y = tl.load(Y + rows * stride_y, mask=row_ok, other=0.0).to(tl.float32)
    logits = tl.load(
        LOGITS + rows[:, None] * stride_lr + offs_k[None, :] * stride_lk, mask=tile_ok, other=0.0
    ).to(tl.float32)
    loc = tl.load(
        LOC + rows[:, None] * stride_mr + offs_k[None, :] * stride_mk, mask=tile_ok, other=0.0
    ).to(tl.float32)
    scale = tl.load(
        SCALE + rows[:, None] * stride_sr + offs_k[None, :] * stride_sk, mask=tile_ok, other=1.0
    ).to(tl.float32)
    return y, logits, loc, scale


@triton.jit
def _mixture_terms(y, logits, loc, scale, k_ok, LOG_STD: tl.constexpr):
    """Per row and component: log weight, z = (y - loc) / std, 1 / std and the log term
    c = log w - log std - log(2 pi)/2 - z^2/2 (-inf on padded components); per row the
    log-likelihood ll = logsumexp_k c (-inf when every term underflows, never NaN)."""
    logits = tl.where(k_ok[None, :], logits, float("-inf"))
    l_max = tl.max(logits, 1)
    log_norm = l_max + tl.log(tl.sum(tl.exp(logits - l_max[:, None]), 1))
    log_w = logits - log_norm[:, None]
    if LOG_STD:
        log_std = scale
        std = tl.exp(scale)
    else:
        log_std = tl.log(scale)
        std = scale
    inv_std = 1.0 / std
    z = (y[:, None] - loc) / std
    c = tl.where(k_ok[None, :], log_w - log_std - HALF_LOG_2PI - 0.5 * z * z, float("-inf"))
    c_max = tl.max(c, 1)
    c_max = tl.where(c_max == float("-inf"), 0.0, c_max)
    ll = c_max + tl.log(tl.sum(tl.exp(c - c_max[:, None]), 1))
    return log_w, z, inv_std, c, ll


@triton.jit
def _row_weight(MASK, rows, row_ok, stride_w, HAS_MASK: tl.constexpr):
    """The weight of each row: the mask value (bool as 0/1, or float), 1 without a mask,
    0 on padded rows."""
    if HAS_MASK:
        w = tl.load(MASK + rows * stride_w, mask=row_ok, other=0).to(tl.float32)
    else:
        w = tl.where(row_ok, 1.0, 0.0)
    return w


@triton.jit
def gmm_nll_fwd_kernel(
    Y, LOGITS, LOC, SCALE, MASK, PARTIAL,
    R, K,
    stride_y, stride_lr, stride_lk, stride_mr, stride_mk, stride_sr, stride_sk, stride_w,
    LOG_STD: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Grid cdiv(R, BLOCK_R). PARTIAL [2, programs]: row 0 the sum of w * nll over this
    program's rows (rows with w = 0 add exactly 0), row 1 the sum of w (with HAS_MASK)."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    offs_k = tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    y, logits, loc, scale = _load_mixture(
        Y, LOGITS, LOC, SCALE, rows, row_ok, offs_k, k_ok,
        stride_y, stride_lr, stride_lk, stride_mr, stride_mk, stride_sr, stride_sk,
    )  # fmt: skip
    _, _, _, _, ll = _mixture_terms(y, logits, loc, scale, k_ok, LOG_STD)
    w = _row_weight(MASK, rows, row_ok, stride_w, HAS_MASK)
    nll = tl.where(w != 0.0, -ll * w, 0.0)
    tl.store(PARTIAL + pid, tl.sum(nll, 0))
    if HAS_MASK:
        tl.store(PARTIAL + tl.num_programs(0) + pid, tl.sum(w, 0))


@triton.jit
def gmm_nll_finish_kernel(
    PARTIAL, LOSS, WEIGHT, P, row_divisor, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr
):
    """One program: LOSS = sum(PARTIAL[0]) / W and WEIGHT = W, where W = max(sum(PARTIAL[1]),
    1) with HAS_MASK, else row_divisor (max(R, 1), a float). The sum order is fixed, so the
    result is deterministic."""
    total = tl.zeros([BLOCK], dtype=tl.float32)
    weight = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, P, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < P
        total += tl.load(PARTIAL + offs, mask=ok, other=0.0)
        if HAS_MASK:
            weight += tl.load(PARTIAL + P + offs, mask=ok, other=0.0)
    if HAS_MASK:
        w = tl.maximum(tl.sum(weight, 0), 1.0)
    else:
        w = row_divisor
    tl.store(LOSS, (tl.sum(total, 0) / w).to(LOSS.dtype.element_ty))
    tl.store(WEIGHT, w)


@triton.jit
def gmm_nll_bwd_kernel(
    Y, LOGITS, LOC, SCALE, MASK, GRAD, WEIGHT, DY, DLOGITS, DLOC, DSCALE,
    R, K,
    stride_y, stride_lr, stride_lk, stride_mr, stride_mk, stride_sr, stride_sk, stride_w,
    stride_dy, stride_dlr, stride_dlk, stride_dmr, stride_dmk, stride_dsr, stride_dsk,
    LOG_STD: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_DY: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Grid cdiv(R, BLOCK_R). With g = GRAD / WEIGHT and coef_r = -g w_r (d loss / d ll_r),
    responsibilities p_rk = exp(c_rk - ll_r) and weights pi_rk = softmax(logits_r)_k:
    d logits = coef (p - pi), d loc = coef p z / std, d log std = coef p (z^2 - 1)
    (d std = that / std), d y = -sum_k d loc. Rows with w = 0 get exactly 0."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    offs_k = tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    y, logits, loc, scale = _load_mixture(
        Y, LOGITS, LOC, SCALE, rows, row_ok, offs_k, k_ok,
        stride_y, stride_lr, stride_lk, stride_mr, stride_mk, stride_sr, stride_sk,
    )  # fmt: skip
    log_w, z, inv_std, c, ll = _mixture_terms(y, logits, loc, scale, k_ok, LOG_STD)
    w = _row_weight(MASK, rows, row_ok, stride_w, HAS_MASK)
    g = tl.load(GRAD).to(tl.float32) / tl.load(WEIGHT)
    live = (w != 0.0)[:, None]
    coef = (-g * w)[:, None]
    ll_safe = tl.where(ll == float("-inf"), 0.0, ll)
    p = tl.exp(c - ll_safe[:, None])
    d_loc = tl.where(live, coef * p * z * inv_std, 0.0)
    d_logits = tl.where(live, coef * (p - tl.exp(log_w)), 0.0)
    d_log_std = coef * p * (z * z - 1.0)
    if LOG_STD:
        d_scale = tl.where(live, d_log_std, 0.0)
    else:
        d_scale = tl.where(live, d_log_std * inv_std, 0.0)
    tile_ok = row_ok[:, None] & k_ok[None, :]
    r2, k2 = rows[:, None], offs_k[None, :]
    tl.store(
        DLOGITS + r2 * stride_dlr + k2 * stride_dlk,
        d_logits.to(DLOGITS.dtype.element_ty),
        mask=tile_ok,
    )
    tl.store(
        DLOC + r2 * stride_dmr + k2 * stride_dmk, d_loc.to(DLOC.dtype.element_ty), mask=tile_ok
    )
    tl.store(
        DSCALE + r2 * stride_dsr + k2 * stride_dsk,
        d_scale.to(DSCALE.dtype.element_ty),
        mask=tile_ok,
    )
    if HAS_DY:
        d_y = -tl.sum(d_loc, 1)  # padded components have p = 0
        tl.store(DY + rows * stride_dy, d_y.to(DY.dtype.element_ty), mask=row_ok)
