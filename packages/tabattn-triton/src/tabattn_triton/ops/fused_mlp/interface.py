"""Transformer feed-forward block y = act(x @ w1) @ w2 (no biases): `mlp`, the registry op
of the same name (as `tabattn_core.mlp.mlp`), with a choice of implementation.

impl="triton": the grouped MLP kernels of `tabattn_triton.ops.grouped_mlp` with one group:
the first GEMM applies the activation in its epilogue (and keeps the pre-activation for the
backward), the second GEMM reads the activated hidden rows; the backward fuses act' into
the epilogue of dH = dY @ w2^T. impl="torch": two `torch.matmul` calls (cuBLAS on CUDA)
and the torch activation, in the input dtype.
"""

from __future__ import annotations

import torch

from tabattn_core.checks import InputError
from tabattn_core.mlp import activation_fn, check_mlp
from tabattn_triton.ops.common import needs_grad
from tabattn_triton.ops.grouped_mlp.interface import ACTIVATION_IDS, GroupedMLPFunction
from tabattn_triton.ops.kernel_checks import KERNEL_DTYPES, check_device

__all__ = ["DEFAULT_IMPL", "IMPLS", "mlp"]

IMPLS = ("triton", "torch")
DEFAULT_IMPL = "triton"  # impl=None picks this one


def mlp(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    *,
    activation: str = "gelu",
    impl: str | None = None,
) -> torch.Tensor:
    """Feed-forward block: y = act(x @ w1) @ w2, forward and backward.

    x: [..., d_in] (leading axes flattened to rows with `reshape`: a view for contiguous
    rows); w1: [d_in, d_hidden]; w2: [d_hidden, d_out] (any strides, e.g. a transposed
    nn.Linear weight); one dtype. activation: "gelu" (erf form), "relu" or "silu".
    impl: "triton" (fp16, bf16 or fp32 on CUDA, or CPU under TRITON_INTERPRET=1), "torch",
    or None for DEFAULT_IMPL. Returns y [..., d_out] in x's dtype.
    """
    act = activation_fn(activation)
    impl = DEFAULT_IMPL if impl is None else impl
    if impl not in IMPLS:
        raise InputError(f"impl: expected one of {IMPLS} or None, got {impl!r}")
    if impl == "torch":
        check_mlp(x, w1, w2, grouped=False)
        return act(x @ w1) @ w2
    check_mlp(x, w1, w2, grouped=False, dtypes=KERNEL_DTYPES)
    check_device("x", x)
    rows = x.reshape(-1, x.shape[-1])
    y = GroupedMLPFunction.apply(
        rows, w1[None], w2[None], ACTIVATION_IDS[activation], needs_grad(x, w1, w2)
    )
    return y[0].reshape(*x.shape[:-1], w2.shape[1])
