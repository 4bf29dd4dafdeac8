"""Grouped MLP (the K component MLPs of a mixture head): launchers -> autograd Function ->
`grouped_mlp`, the registry op of the same name (as `tabattn_core.mlp.grouped_mlp`).

Forward, two launches: Z = x @ w1[k] with H = act(Z) in the epilogue, then Y = H @ w2[k].
Backward, four: dZ = (dY @ w2[k]^T) * act'(Z) in the epilogue, dw2[k] = H^T @ dY,
dw1[k] = x^T @ dZ, dx = sum_k dZ @ w1[k]^T (groups summed inside the kernel). H and Z
([K, N, d_hidden], x's dtype) are the saved intermediates.
"""

from __future__ import annotations

import torch
import triton

from tabattn_core.checks import InputError
from tabattn_core.mlp import activation_fn, check_mlp
from tabattn_triton.ops.common import bucket, dot_precision, needs_grad
from tabattn_triton.ops.grouped_mlp.kernel import (
    ACT_GELU,
    ACT_RELU,
    ACT_SILU,
    EPI_ACT_GRAD,
    EPI_ACTIVATE,
    EPI_NONE,
    MAX_FULL_ROW,
    full_row_matmul_kernel,
    grouped_matmul_kernel,
)
from tabattn_triton.ops.kernel_checks import KERNEL_DTYPES, check_device

__all__ = ["GroupedMLPFunction", "grouped_matmul", "grouped_mlp"]

ACTIVATION_IDS = {"gelu": ACT_GELU, "relu": ACT_RELU, "silu": ACT_SILU}


def _group_strides(t: torch.Tensor, shared: bool) -> tuple[int, int, int]:
    """(group, row, column) strides of a [G, rows, cols] operand, or of a [rows, cols]
    operand shared by every group (group stride 0)."""
    return (0, *t.stride()) if shared else tuple(t.stride())


def grouped_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    *,
    epilogue: int = EPI_NONE,
    activation: int = ACT_GELU,
    z: torch.Tensor | None = None,
    reduce_groups: bool = False,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """out[g] = epilogue(a[g] @ b[g]) for every group in one launch (see kernel.py).

    a: [G, M, Kd] or [M, Kd] (shared); b: [G, Kd, N] or [Kd, N] (shared); out: [G, M, N],
    or [M, N] with reduce_groups (out = sum_g a[g] @ b[g]); z: [G, M, N] (like out), written
    with EPI_ACTIVATE and read with EPI_ACT_GRAD. Any strides (transposed views included).
    Inference epilogues: bias [N] added before the activation, residual [M, N] added after
    it, norm = (weight [N], bias [N], eps) a layer norm of the row last (N <= MAX_FULL_ROW).
    Returns out.
    """
    groups = a.shape[0] if a.dim() == 3 else b.shape[0]
    m, kd = a.shape[-2:]
    n = b.shape[-1]
    if out.numel() == 0:
        return out
    if kd == 0 and bias is None and residual is None and norm is None:
        return out.zero_()
    z_strides = (0, 0, 0) if z is None else tuple(z.stride())
    r_strides = (0, 0) if residual is None else tuple(residual.stride())
    norm_weight, norm_bias, eps = (None, None, 0.0) if norm is None else norm
    if norm is not None and n > MAX_FULL_ROW:
        raise InputError(
            f"norm: the layer-norm epilogue holds rows of at most {MAX_FULL_ROW}, got {n}"
        )
    kernel = grouped_matmul_kernel if norm is None else full_row_matmul_kernel
    grid = lambda meta: (
        triton.cdiv(m, meta["BLOCK_M"]),
        triton.cdiv(n, meta["BLOCK_N"]),
        1 if reduce_groups else groups,
    )
    kernel[grid](
        a, b, out, z, bias, residual, norm_weight, norm_bias, m, n, kd, groups, eps,
        *_group_strides(a, a.dim() == 2), *_group_strides(b, b.dim() == 2),
        *_group_strides(out, reduce_groups), *z_strides, *r_strides,
        bucket(m), bucket(n), bucket(kd),
        EPILOGUE=epilogue, ACTIVATION=activation, STORE_Z=z is not None and epilogue == EPI_ACTIVATE,
        REDUCE_GROUPS=reduce_groups, HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None, NORM=norm is not None,
        DOT_PRECISION=dot_precision(a.dtype),
    )  # fmt: skip
    return out


def grouped_mlp_fwd(x, w1, w2, activation: int, save_z: bool):
    """x [N, d_in], w1 [K, d_in, d_hidden], w2 [K, d_hidden, d_out] ->
    (y [K, N, d_out], h [K, N, d_hidden], z like h or None)."""
    k, n = w1.shape[0], x.shape[0]
    h = x.new_empty((k, n, w1.shape[2]))
    z = torch.empty_like(h) if save_z else None
    grouped_matmul(x, w1, h, epilogue=EPI_ACTIVATE, activation=activation, z=z)
    y = grouped_matmul(h, w2, x.new_empty((k, n, w2.shape[2])))
    return y, h, z


def grouped_mlp_bwd(dy, x, w1, w2, h, z, activation: int, needs: tuple[bool, bool, bool]):
    """(dx [N, d_in], dw1, dw2) from dy [K, N, d_out]; None where `needs` is False."""
    dz = grouped_matmul(
        dy, w2.transpose(1, 2), torch.empty_like(h), epilogue=EPI_ACT_GRAD,
        activation=activation, z=z,
    )  # fmt: skip
    dx = dw1 = dw2 = None
    if needs[0]:
        dx = grouped_matmul(dz, w1.transpose(1, 2), torch.empty_like(x), reduce_groups=True)
    if needs[1]:
        dw1 = grouped_matmul(x.t(), dz, torch.empty_like(w1))
    if needs[2]:
        dw2 = grouped_matmul(h.transpose(1, 2), dy, torch.empty_like(w2))
    return dx, dw1, dw2


class GroupedMLPFunction(torch.autograd.Function):
    """Saves x, w1, w2, H and Z (Z only when a gradient is needed)."""

    @staticmethod
    def forward(ctx, x, w1, w2, activation: int, save_z: bool):
        y, h, z = grouped_mlp_fwd(x, w1, w2, activation, save_z)
        ctx.save_for_backward(x, w1, w2, h, z)
        ctx.activation = activation
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w1, w2, h, z = ctx.saved_tensors
        dx, dw1, dw2 = grouped_mlp_bwd(
            dy, x, w1, w2, h, z, ctx.activation, tuple(ctx.needs_input_grad[:3])
        )
        return dx, dw1, dw2, None, None


def grouped_mlp(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, *, activation: str = "gelu"
) -> torch.Tensor:
    """K MLPs over the same rows in one launch per GEMM: y[k] = act(x @ w1[k]) @ w2[k].

    x: [N, d_in] (shared by the K groups); w1: [K, d_in, d_hidden]; w2: [K, d_hidden, d_out];
    one dtype (fp16, bf16 or fp32; fp32 dots follow torch.backends.cuda.matmul.allow_tf32),
    any strides. activation: "gelu" (erf form), "relu" or "silu", applied in fp32 in the
    first GEMM's epilogue. Returns y [K, N, d_out] (x's dtype); differentiable in x, w1, w2.
    A mixture head with K components of (logit, mean, log sigma) is d_out = 3.
    """
    activation_fn(activation)  # InputError naming the choices
    check_mlp(x, w1, w2, grouped=True, dtypes=KERNEL_DTYPES)
    check_device("x", x)
    return GroupedMLPFunction.apply(x, w1, w2, ACTIVATION_IDS[activation], needs_grad(x, w1, w2))
