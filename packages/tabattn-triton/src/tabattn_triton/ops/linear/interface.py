"""`linear`, the registry op of the same name (as `tabattn_core.mlp.linear`): one launch of
the grouped-MLP GEMM kernel (one group) with the epilogue a post-norm transformer layer
applies after a projection: + bias, activation, + residual, layer norm of the row.

It replaces, per call, cuBLAS's GEMM and up to three elementwise kernels (bias/activation,
add, layer norm) in the predictor's decode steps, where rows are few (2 per sample path)
and every launch counts; fp32 runs as 3xTF32 on tensor cores (see `common.dot_precision`).
Forward only: sampling and density run without gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tabattn_core.checks import InputError
from tabattn_core.mlp import check_linear
from tabattn_triton.ops.common import needs_grad
from tabattn_triton.ops.grouped_mlp.interface import ACTIVATION_IDS, grouped_matmul
from tabattn_triton.ops.grouped_mlp.kernel import EPI_ACTIVATE, EPI_NONE, MAX_FULL_ROW
from tabattn_triton.ops.kernel_checks import KERNEL_DTYPES, check_device

__all__ = ["linear"]


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """y = layer_norm(residual + act(x @ weight^T + bias)), each part optional, in one launch.

    x: [..., d_in] (rows flattened with `reshape`); weight: [d_out, d_in] (nn.Linear's
    layout, any strides); bias, norm_weight, norm_bias: [d_out]; residual: [..., d_out].
    fp16, bf16 or fp32, on CUDA (or CPU under TRITON_INTERPRET=1). The layer norm is fused
    for d_out <= 256 (a program holds whole rows); wider rows get it from PyTorch after the
    launch. Returns y [..., d_out] in x's dtype.
    """
    check_linear(
        x, weight, bias, activation=activation, residual=residual, norm_weight=norm_weight,
        norm_bias=norm_bias, eps=eps, dtypes=KERNEL_DTYPES,
    )  # fmt: skip
    check_device("x", x)
    if needs_grad(x, weight, bias, residual, norm_weight, norm_bias):
        raise InputError(
            "x, weight, bias, residual, norm_weight, norm_bias: the fused linear layer is "
            "forward-only (inference); use tabattn_core.mlp.linear or torch to train"
        )
    d_out = weight.shape[0]
    rows = x.reshape(x.shape[:-1].numel(), x.shape[-1])
    out = x.new_empty((rows.shape[0], d_out))
    fuse_norm = norm_weight is not None and d_out <= MAX_FULL_ROW
    grouped_matmul(
        rows, weight.t()[None], out[None],
        epilogue=EPI_NONE if activation is None else EPI_ACTIVATE,
        activation=ACTIVATION_IDS.get(activation, 0),
        bias=bias,
        residual=None if residual is None else residual.reshape(-1, d_out),
        norm=(norm_weight, norm_bias, float(eps)) if fuse_norm else None,
    )  # fmt: skip
    if norm_weight is not None and not fuse_norm:
        out = F.layer_norm(out, (d_out,), norm_weight, norm_bias, eps)
    return out.view(*x.shape[:-1], d_out)
