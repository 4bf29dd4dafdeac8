"""Fused inference linear layer `linear` against `tabattn_core.mlp.linear` (fp64): every
epilogue (bias, activation, residual, layer norm) alone and together.

CPU: under the Triton interpreter (fp32/fp16, small awkward shapes). GPU (`-m gpu`): the
predictor's decode rows (2048 x 128, d_ff 256) and TNP widths (512: the norm unfused) in
bf16 / fp16 / fp32. Outputs are NaN-poisoned on allocation (conftest).
"""

from __future__ import annotations

import pytest
import torch

from tabattn_core import mlp as core_mlp
from tabattn_core.checks import InputError
from tabattn_core.testing import assert_rel_close
from tabattn_triton.ops.linear import linear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPILOGUES = {
    "plain": {},
    "bias": {"bias"},
    "bias+gelu": {"bias", "activation"},
    "residual+norm": {"residual", "norm"},
    "bias+residual+norm": {"bias", "residual", "norm"},
    "gelu+residual": {"activation", "residual"},
}


def run_linear(lead, d_in, d_out, dtype, parts, *, activation="gelu", transposed=False):
    """One call against the fp64 reference on the same values."""
    x = torch.randn(*lead, d_in, device=DEVICE).to(dtype)
    if transposed:  # weight given as a transposed view (any strides)
        weight = (torch.randn(d_in, d_out, device=DEVICE) * d_in**-0.5).to(dtype).t()
    else:
        weight = (torch.randn(d_out, d_in, device=DEVICE) * d_in**-0.5).to(dtype)
    kwargs = {}
    if "bias" in parts:
        kwargs["bias"] = torch.randn(d_out, device=DEVICE).to(dtype)
    if "activation" in parts:
        kwargs["activation"] = activation
    if "residual" in parts:
        kwargs["residual"] = torch.randn(*lead, d_out, device=DEVICE).to(dtype)
    if "norm" in parts:
        kwargs["norm_weight"] = (1 + 0.1 * torch.randn(d_out, device=DEVICE)).to(dtype)
        kwargs["norm_bias"] = (0.1 * torch.randn(d_out, device=DEVICE)).to(dtype)
        kwargs["eps"] = 1e-5
    y = linear(x, weight, **kwargs)
    wide = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    ref = core_mlp.linear(x.double(), weight.double(), **wide)
    assert y.shape == (*lead, d_out) and y.dtype == dtype
    assert_rel_close(y, ref, dtype=dtype, name="y")


@pytest.mark.parametrize("epilogue", list(EPILOGUES))
@pytest.mark.parametrize(
    ("lead", "d_in", "d_out"), [((7,), 24, 48), ((1,), 48, 80), ((3, 11), 96, 96)]
)
def test_epilogues_fp32(epilogue, lead, d_in, d_out):
    run_linear(lead, d_in, d_out, torch.float32, EPILOGUES[epilogue])


@pytest.mark.parametrize("epilogue", ["bias+gelu", "bias+residual+norm"])
def test_fp16_transposed_weight(epilogue):
    run_linear((33,), 40, 48, torch.float16, EPILOGUES[epilogue], transposed=True)


@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_other_activations(activation):
    run_linear((5,), 16, 24, torch.float32, {"bias", "activation"}, activation=activation)


def test_wide_rows_norm_after_launch():
    """d_out above the fused norm's row limit: the norm runs after the launch, same result."""
    run_linear((5,), 16, 300, torch.float32, EPILOGUES["bias+residual+norm"])


def test_no_rows_and_empty_input_dim():
    assert linear(torch.randn(0, 8, device=DEVICE), torch.randn(4, 8, device=DEVICE)).shape == (
        0,
        4,
    )
    x = torch.randn(3, 0, device=DEVICE)
    bias = torch.randn(5, device=DEVICE)
    y = linear(x, torch.randn(5, 0, device=DEVICE), bias, activation="relu")
    assert torch.equal(y, torch.relu(bias).expand(3, 5))


def test_input_errors():
    x, w = torch.randn(4, 16, device=DEVICE), torch.randn(8, 16, device=DEVICE)
    with pytest.raises(InputError, match=r"weight: expected shape"):
        linear(x, torch.randn(8, 12, device=DEVICE))
    with pytest.raises(InputError, match=r"bias: expected shape"):
        linear(x, w, torch.randn(7, device=DEVICE))
    with pytest.raises(InputError, match=r"residual: expected shape"):
        linear(x, w, residual=torch.randn(4, 16, device=DEVICE))
    with pytest.raises(InputError, match="norm_weight, norm_bias"):
        linear(x, w, norm_weight=torch.ones(8, device=DEVICE))
    with pytest.raises(InputError, match="activation"):
        linear(x, w, activation="tanh")
    with pytest.raises(InputError, match="weight: expected dtype"):
        linear(x, w.double())
    with pytest.raises(InputError, match="eps"):
        linear(x, w, eps=0.0)
    with pytest.raises(InputError, match="forward-only"):
        linear(x, w.requires_grad_())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("epilogue", list(EPILOGUES))
def test_gpu_predictor_rows(dtype, epilogue):
    """The decode step of the default predictor: 1024 paths x 2 rows, d_model 128, d_ff 256."""
    run_linear((1024, 2), 128, 128, dtype, EPILOGUES[epilogue])
    run_linear((2048,), 256, 128, dtype, EPILOGUES[epilogue])
    run_linear((2048,), 128, 256, dtype, EPILOGUES[epilogue])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_wide_and_odd(dtype):
    run_linear((4097,), 512, 512, dtype, EPILOGUES["bias+residual+norm"])
    run_linear((1,), 80, 200, dtype, EPILOGUES["bias+residual+norm"])
    run_linear((333,), 128, 384, dtype, EPILOGUES["plain"])
