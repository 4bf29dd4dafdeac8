"""Transformer feed-forward block y = act(x @ w1) @ w2 (no biases): `mlp`, the registry op
of the same name (as `tabattn_core.mlp.mlp`; the registry's torch backend is the cuBLAS one).

The grouped MLP kernels of `tabattn_triton.ops.grouped_mlp` with one group: the first GEMM
applies the activation in its epilogue (and keeps the pre-activation for the backward), the
second GEMM reads the activated hidden rows; the backward fuses act' into the epilogue of
dH = dY @ w2^T.
"""

from __future__ import annotations

import torch

from tabattn_core.mlp import activation_fn, check_mlp
from tabattn_triton.ops.common import needs_grad
from tabattn_triton.ops.grouped_mlp.interface import ACTIVATION_IDS, GroupedMLPFunction
from tabattn_triton.ops.kernel_checks import KERNEL_DTYPES, check_device

__all__ = ["mlp"]


def mlp(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    *,
    activation: str = "gelu",
) -> torch.Tensor:
    """Feed-forward block: y = act(x @ w1) @ w2, forward and backward.

    x: [..., d_in] (leading axes flattened to rows with `reshape`: a view for contiguous
    rows); w1: [d_in, d_hidden]; w2: [d_hidden, d_out] (any strides, e.g. a transposed
    nn.Linear weight); one dtype: fp16, bf16 or fp32 on CUDA (CPU under TRITON_INTERPRET=1).
    activation: "gelu" (erf form), "relu" or "silu". Returns y [..., d_out] in x's dtype.
    """
    activation_fn(activation)  # an unknown name raises before any check of the tensors
    check_mlp(x, w1, w2, grouped=False, dtypes=KERNEL_DTYPES)
    check_device("x", x)
    rows = x.reshape(-1, x.shape[-1])
    y = GroupedMLPFunction.apply(
        rows, w1[None], w2[None], ACTIVATION_IDS[activation], needs_grad(x, w1, w2)
    )
    return y[0].reshape(*x.shape[:-1], w2.shape[1])
