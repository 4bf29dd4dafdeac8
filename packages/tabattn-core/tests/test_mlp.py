"""MLP references: against explicit per-row / per-group formulas, dtypes and input errors."""

from __future__ import annotations

import math

import pytest
import torch

from tabattn_core.checks import InputError
from tabattn_core.mlp import ACTIVATIONS, grouped_mlp, linear, mlp
from tabattn_core.registry import get_op
from tabattn_core.testing import assert_rel_close

F64 = torch.float64

# The activations written out from their definitions.
FORMULAS = {
    "gelu": lambda t: 0.5 * t * (1 + torch.erf(t / math.sqrt(2))),
    "relu": lambda t: torch.where(t > 0, t, torch.zeros_like(t)),
    "silu": lambda t: t / (1 + torch.exp(-t)),
}


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_grouped_mlp_is_k_separate_mlps(activation):
    k, n, d_in, d_hidden, d_out = 3, 7, 5, 11, 2
    x = torch.randn(n, d_in, dtype=F64)
    w1 = torch.randn(k, d_in, d_hidden, dtype=F64)
    w2 = torch.randn(k, d_hidden, d_out, dtype=F64)
    y = grouped_mlp(x, w1, w2, activation=activation)
    assert y.shape == (k, n, d_out) and y.dtype == F64
    act = FORMULAS[activation]
    for g in range(k):
        row_by_row = torch.stack([act(x[i] @ w1[g]) @ w2[g] for i in range(n)])
        assert_rel_close(y[g], row_by_row, name=f"group {g}")
        assert_rel_close(mlp(x, w1[g], w2[g], activation=activation), row_by_row)


def test_mlp_leading_dims_low_precision_and_gradients():
    x = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    w1, w2 = torch.randn(8, 16, dtype=torch.bfloat16), torch.randn(16, 4, dtype=torch.bfloat16)
    y = mlp(x, w1, w2)
    assert y.shape == (2, 3, 4) and y.dtype == torch.bfloat16
    ref = FORMULAS["gelu"](x.double() @ w1.double()) @ w2.double()
    assert_rel_close(y, ref, dtype=torch.bfloat16)
    leaves = [t.double().requires_grad_() for t in (x[0], w1, w2)]
    grads = torch.autograd.grad(
        grouped_mlp(leaves[0], leaves[1][None], leaves[2][None]).sum(), leaves
    )
    ref = FORMULAS["gelu"](leaves[0] @ leaves[1]) @ leaves[2]
    for g, rg in zip(grads, torch.autograd.grad(ref.sum(), leaves), strict=True):
        assert_rel_close(g, rg)


def test_registry_ops():
    x, w1, w2 = torch.randn(4, 3), torch.randn(2, 3, 5), torch.randn(2, 5, 1)
    assert torch.equal(get_op("grouped_mlp", "torch")(x, w1, w2), grouped_mlp(x, w1, w2))
    assert torch.equal(get_op("mlp", "torch")(x, w1[0], w2[0]), mlp(x, w1[0], w2[0]))


def test_input_errors():
    x, w1, w2 = torch.randn(4, 3), torch.randn(2, 3, 5), torch.randn(2, 5, 1)
    with pytest.raises(InputError, match="activation"):
        grouped_mlp(x, w1, w2, activation="tanh")
    with pytest.raises(InputError, match=r"w1: expected shape \[\*, 3, \*\]"):
        grouped_mlp(x, w1[:, :2], w2)
    with pytest.raises(InputError, match=r"w2: expected shape \[2, 5, \*\]"):
        grouped_mlp(x, w1, w2[:1])
    with pytest.raises(InputError, match="w2: expected dtype float32"):
        grouped_mlp(x, w1, w2.double())
    with pytest.raises(InputError, match="x: expected 2 dims"):
        grouped_mlp(x[None], w1, w2)
    with pytest.raises(InputError, match="w1: expected shape"):
        mlp(x, w1, w2[0])


def test_linear_is_a_post_norm_sublayer():
    """Against the torch modules a post-norm transformer layer is made of, written out."""
    x, res = torch.randn(2, 5, 6, dtype=F64), torch.randn(2, 5, 4, dtype=F64)
    lin = torch.nn.Linear(6, 4, dtype=F64)
    norm = torch.nn.LayerNorm(4, eps=1e-6, dtype=F64)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
        want = norm(res + lin(x))
        got = linear(
            x, lin.weight, lin.bias, residual=res, norm_weight=norm.weight,
            norm_bias=norm.bias, eps=1e-6,
        )  # fmt: skip
        assert_rel_close(got, want, tol=1e-12)
        gelu = FORMULAS["gelu"](x @ lin.weight.T + lin.bias)
        assert_rel_close(linear(x, lin.weight, lin.bias, activation="gelu"), gelu, tol=1e-12)
        assert get_op("linear", "torch")(x, lin.weight).dtype == F64


def test_linear_keeps_low_precision_dtype_and_rejects_bad_input():
    x, w = torch.randn(3, 8, dtype=torch.bfloat16), torch.randn(4, 8, dtype=torch.bfloat16)
    assert linear(x, w).dtype == torch.bfloat16
    with pytest.raises(InputError, match=r"weight: expected shape"):
        linear(x, w.T)
    with pytest.raises(InputError, match="norm_weight, norm_bias"):
        linear(x, w, norm_bias=torch.zeros(4, dtype=torch.bfloat16))
    with pytest.raises(InputError, match=r"residual: expected shape"):
        linear(x, w, residual=torch.zeros(3, 8, dtype=torch.bfloat16))
