"""Grouped MLP kernels against `tabattn_core.mlp.grouped_mlp`: y and dx, dw1, dw2.

CPU: under the Triton interpreter (fp32/fp16, small awkward shapes). GPU (`-m gpu`): the
mixture head of a TNP (K=10, 512 -> 1365 -> 3) in bf16 / fp16 / fp32. Outputs and
gradients are NaN-poisoned on allocation (conftest).
"""

from __future__ import annotations

import pytest
import torch

from tabattn_core import mlp as core_mlp
from tabattn_core.checks import InputError
from tabattn_core.testing import REL_TOL, assert_rel_close
from tabattn_triton.ops.grouped_mlp import grouped_mlp

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_weights(k, d_in, d_hidden, d_out, dtype, *, grouped=True):
    """w1 [K, d_in, d_hidden], w2 [K, d_hidden, d_out] (no K axis unless grouped), scaled
    so that activations stay O(1)."""
    lead = (k,) if grouped else ()
    w1 = torch.randn(*lead, d_in, d_hidden, device=DEVICE) * d_in**-0.5
    w2 = torch.randn(*lead, d_hidden, d_out, device=DEVICE) * d_hidden**-0.5
    return w1.to(dtype).requires_grad_(), w2.to(dtype).requires_grad_()


def compare_mlp(fn, ref_fn, leaves, dtype, *, ref_dtype=torch.float64):
    """fn(*leaves) against ref_fn on the same values in ref_dtype: the output, and the
    gradient of every leaf that requires grad (bound: twice the output's)."""
    y = fn(*leaves)
    dy = torch.randn_like(y)
    wanted = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad(y, wanted, dy)
    ref_leaves = [t.detach().to(ref_dtype).requires_grad_(t.requires_grad) for t in leaves]
    ref = ref_fn(*ref_leaves)
    ref_grads = torch.autograd.grad(
        ref, [t for t in ref_leaves if t.requires_grad], dy.to(ref_dtype)
    )
    tol = dtype if dtype != torch.float32 or DEVICE == "cpu" else "tf32"
    assert y.dtype == dtype
    assert_rel_close(y, ref, dtype=tol, name="y")
    for i, (g, rg) in enumerate(zip(grads, ref_grads, strict=True)):
        assert g.shape == rg.shape and g.dtype == dtype
        assert_rel_close(g, rg, tol=2 * REL_TOL[tol], name=f"grad {i}")


def run_grouped(k, n, d_in, d_hidden, d_out, dtype, activation="gelu"):
    x = torch.randn(n, d_in, device=DEVICE, dtype=dtype, requires_grad=True)
    w1, w2 = make_weights(k, d_in, d_hidden, d_out, dtype)
    compare_mlp(
        lambda *t: grouped_mlp(*t, activation=activation),
        lambda *t: core_mlp.grouped_mlp(*t, activation=activation),
        [x, w1, w2],
        dtype,
    )


@pytest.mark.parametrize("activation", ["gelu", "relu", "silu"])
def test_activations(activation):
    run_grouped(3, 37, 20, 45, 3, torch.float32, activation)


@pytest.mark.parametrize(
    "k, n, d_in, d_hidden, d_out",
    [(1, 1, 16, 16, 1), (10, 50, 24, 40, 3), (2, 70, 33, 17, 35)],
    ids=str,
)
def test_shapes(k, n, d_in, d_hidden, d_out):
    run_grouped(k, n, d_in, d_hidden, d_out, torch.float32)


def test_fp16():
    run_grouped(4, 45, 32, 48, 3, torch.float16)


def test_strided_operands_and_partial_gradients():
    k, n, d_in, d_hidden, d_out = 3, 29, 18, 40, 3
    # x as a transposed view, w1 from [K, d_hidden, d_in] storage (nn.Linear layout),
    # w2 a column slice; x alone requires grad.
    x = torch.randn(d_in, n, device=DEVICE).t().requires_grad_()
    w1 = (torch.randn(k, d_hidden, d_in, device=DEVICE) * d_in**-0.5).transpose(1, 2)
    w2 = (torch.randn(k, d_hidden, 2 * d_out, device=DEVICE) * d_hidden**-0.5)[..., ::2]
    assert not (x.is_contiguous() or w1.is_contiguous() or w2.is_contiguous())
    compare_mlp(grouped_mlp, core_mlp.grouped_mlp, [x, w1, w2], torch.float32)


def test_no_grad_and_empty_rows():
    x = torch.randn(6, 16, device=DEVICE)
    w1, w2 = make_weights(2, 16, 24, 3, torch.float32)
    with torch.no_grad():
        y = grouped_mlp(x, w1, w2, activation="silu")
    assert_rel_close(
        y, core_mlp.grouped_mlp(x.double(), w1.double(), w2.double(), activation="silu")
    )
    x = torch.randn(0, 16, device=DEVICE, requires_grad=True)
    y = grouped_mlp(x, w1, w2)
    assert y.shape == (2, 0, 3)
    y.sum().backward()
    assert torch.equal(w1.grad, torch.zeros_like(w1)) and torch.equal(w2.grad, torch.zeros_like(w2))


def test_input_errors():
    x = torch.randn(4, 16, device=DEVICE)
    w1, w2 = make_weights(2, 16, 24, 3, torch.float32)
    with pytest.raises(InputError, match="activation"):
        grouped_mlp(x, w1, w2, activation="tanh")
    with pytest.raises(InputError, match="w1: expected shape"):
        grouped_mlp(x[:, :8], w1, w2)
    with pytest.raises(InputError, match="x: expected dtype"):
        grouped_mlp(x.double(), w1.double(), w2.double())


# ---------------------------------------------------------------------------------------
# GPU: the TNP mixture head, K = 10 component MLPs 512 -> 1365 -> 3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("activation", ["gelu", "silu"])
def test_gpu_mixture_head(dtype, activation):
    run_grouped(10, 8000, 512, 1365, 3, dtype, activation)


@pytest.mark.gpu
def test_gpu_mixture_head_64k_rows():
    """64k rows against the fp32 reference (an fp64 one would need ~20 GB)."""
    x = torch.randn(65536, 512, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    w1, w2 = make_weights(10, 512, 1365, 3, torch.bfloat16)
    compare_mlp(
        grouped_mlp, core_mlp.grouped_mlp, [x, w1, w2], torch.bfloat16, ref_dtype=torch.float32
    )


@pytest.mark.gpu
def test_gpu_wide_output_relu():
    run_grouped(3, 3000, 256, 1000, 300, torch.bfloat16, "relu")
