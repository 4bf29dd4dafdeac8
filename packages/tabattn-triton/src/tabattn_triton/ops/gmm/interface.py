"""Fused Gaussian-mixture loss: launchers -> autograd Function -> `gmm_nll`, the registry op
of the same name (same signature and semantics as `tabattn_core.gmm.gmm_nll`)."""

from __future__ import annotations

import torch
import triton

from tabattn_core.checks import InputError, check_tensor
from tabattn_core.gmm import check_mixture
from tabattn_triton.ops.gmm.kernel import (
    gmm_nll_bwd_kernel,
    gmm_nll_finish_kernel,
    gmm_nll_fwd_kernel,
)
from tabattn_triton.ops.kernel_checks import KERNEL_DTYPES, check_device

__all__ = ["gmm_nll", "row_block"]

TILE_ELEMENTS = 2048  # components per program: BLOCK_R * BLOCK_K
MAX_ROW_BLOCK = 1024
FINISH_BLOCK = 1024
NUM_WARPS = 4


def row_block(rows: int, k: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_K): K padded to a power of two, rows so that a tile holds about
    TILE_ELEMENTS components (K=10: 128 rows), never more rows than needed."""
    block_k = triton.next_power_of_2(k)
    block_r = max(1, min(MAX_ROW_BLOCK, TILE_ELEMENTS // block_k))
    return min(block_r, triton.next_power_of_2(max(rows, 1))), block_k


def _strides(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.stride())


def gmm_nll_fwd(y, logits, loc, scale, mask, log_std: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """y [R], logits/loc/scale [R, K], mask [R] or None -> (loss 0-dim fp32, W 0-dim fp32),
    W the divisor (max(sum(mask), 1) or max(R, 1))."""
    rows, k = logits.shape
    loss = torch.empty((), device=logits.device, dtype=torch.float32)
    weight = torch.empty((), device=logits.device, dtype=torch.float32)
    if rows == 0:
        return loss.zero_(), weight.fill_(1.0)
    block_r, block_k = row_block(rows, k)
    programs = triton.cdiv(rows, block_r)
    partial = torch.empty((2, programs), device=logits.device, dtype=torch.float32)
    gmm_nll_fwd_kernel[(programs,)](
        y, logits, loc, scale, mask, partial, rows, k,
        *_strides(y), *_strides(logits), *_strides(loc), *_strides(scale),
        0 if mask is None else mask.stride(0),
        LOG_STD=log_std, HAS_MASK=mask is not None, BLOCK_R=block_r, BLOCK_K=block_k,
        num_warps=NUM_WARPS,
    )  # fmt: skip
    gmm_nll_finish_kernel[(1,)](
        partial, loss, weight, programs, float(rows), HAS_MASK=mask is not None, BLOCK=FINISH_BLOCK
    )
    return loss, weight


def gmm_nll_bwd(grad, weight, y, logits, loc, scale, mask, log_std: bool, need_dy: bool):
    """(dy [R] or None, dlogits, dloc, dscale [R, K]) in the dtypes of the inputs."""
    rows, k = logits.shape
    d_logits, d_loc, d_scale = (
        torch.empty((rows, k), device=t.device, dtype=t.dtype) for t in (logits, loc, scale)
    )
    d_y = torch.empty((rows,), device=y.device, dtype=y.dtype) if need_dy else None
    if rows == 0:
        return d_y, d_logits, d_loc, d_scale
    block_r, block_k = row_block(rows, k)
    gmm_nll_bwd_kernel[(triton.cdiv(rows, block_r),)](
        y, logits, loc, scale, mask, grad, weight, d_y, d_logits, d_loc, d_scale, rows, k,
        *_strides(y), *_strides(logits), *_strides(loc), *_strides(scale),
        0 if mask is None else mask.stride(0),
        1, *_strides(d_logits), *_strides(d_loc), *_strides(d_scale),
        LOG_STD=log_std, HAS_MASK=mask is not None, HAS_DY=need_dy,
        BLOCK_R=block_r, BLOCK_K=block_k, num_warps=NUM_WARPS,
    )  # fmt: skip
    return d_y, d_logits, d_loc, d_scale


class GMMNLLFunction(torch.autograd.Function):
    """Saves the inputs and the 0-dim divisor W; the backward recomputes everything else.
    The mask gets no gradient."""

    @staticmethod
    def forward(ctx, y, logits, loc, scale, mask, log_std: bool):
        loss, weight = gmm_nll_fwd(y, logits, loc, scale, mask, log_std)
        ctx.save_for_backward(y, logits, loc, scale, mask, weight)
        ctx.log_std = log_std
        return loss

    @staticmethod
    def backward(ctx, grad):
        y, logits, loc, scale, mask, weight = ctx.saved_tensors
        d_y, d_logits, d_loc, d_scale = gmm_nll_bwd(
            grad, weight, y, logits, loc, scale, mask, ctx.log_std, ctx.needs_input_grad[0]
        )
        return d_y, d_logits, d_loc, d_scale, None, None


def _check(y, logits, loc, scale, scale_param, mask) -> torch.Size:
    """Arguments as the reference takes them (kernel dtypes only); returns the batch shape."""
    batch = check_mixture(logits, loc, scale, scale_param, dtypes=KERNEL_DTYPES, y=y)
    check_device("logits", logits)
    if mask is not None:
        check_tensor("mask", mask, shape=batch, device=logits.device, dims="[...]")
        if mask.dtype != torch.bool and mask.dtype not in KERNEL_DTYPES:
            raise InputError(
                f"mask: expected dtype bool, float16, bfloat16 or float32, got {mask.dtype}"
            )
    return batch


def gmm_nll(
    y: torch.Tensor,
    logits: torch.Tensor,
    loc: torch.Tensor,
    scale: torch.Tensor,
    *,
    scale_param: str = "std",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean negative log-likelihood of a Gaussian mixture, fused (forward and backward).

    y: [...]; logits, loc, scale: [..., K] (any K >= 1; batch axes broadcast as in
    `tabattn_core.gmm.gmm_nll`); mask: None, or bool / float weights of the batch shape
    [...]. fp16, bf16 or fp32 inputs (may differ), fp32 math. scale_param "std"
    (std = scale > 0) or "log_std" (std = exp(scale)).

    Per row: nll = -logsumexp_k [log_softmax(logits)_k - log std_k - log(2 pi)/2
    - ((y - loc_k) / std_k)^2 / 2]. Returns a 0-dim fp32 tensor:
    sum(nll) / max(rows, 1), or with a mask sum(w * nll) / max(sum(w), 1) where rows with
    w = 0 add exactly 0 (also to the gradients). Differentiable in y, logits, loc and scale
    (not in mask); the backward recomputes the per-component terms from the inputs.
    Deterministic: per-program partial sums, then one fixed-order sum.

    Leading axes are flattened to rows with `reshape` (a view for contiguous tensors and for
    slices such as `head_out[..., :K]`; broadcast inputs are expanded first). Any row and
    component strides are read as they are.
    """
    batch = _check(y, logits, loc, scale, scale_param, mask)
    k = logits.shape[-1]
    rows = [t.expand(*batch, k).reshape(-1, k) for t in (logits, loc, scale)]
    y_rows = y.expand(batch).reshape(-1)
    if mask is not None:
        mask = mask.reshape(-1)
        if mask.dtype == torch.bool:
            mask = mask.view(torch.uint8)
    return GMMNLLFunction.apply(y_rows, *rows, mask, scale_param == "log_std")
