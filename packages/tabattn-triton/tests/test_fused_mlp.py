"""Feed-forward block `fused_mlp.mlp` against
`tabattn_core.mlp.mlp`: y and dx, dw1, dw2.

CPU: under the Triton interpreter (fp32/fp16, small shapes). GPU (`-m gpu`): the TNP FFN
512 -> 1365 -> 512 in bf16 / fp16.
"""

from __future__ import annotations

import pytest
import torch
from test_grouped_mlp import DEVICE, compare_mlp, make_weights

from tabattn_core import mlp as core_mlp
from tabattn_core.checks import InputError
from tabattn_triton.ops.fused_mlp import mlp


def run_ffn(shape, d_in, d_hidden, d_out, dtype, *, activation="gelu"):
    x = torch.randn(*shape, d_in, device=DEVICE, dtype=dtype, requires_grad=True)
    w1, w2 = make_weights(1, d_in, d_hidden, d_out, dtype, grouped=False)
    compare_mlp(
        lambda *t: mlp(*t, activation=activation),
        lambda *t: core_mlp.mlp(*t, activation=activation),
        [x, w1, w2],
        dtype,
    )


@pytest.mark.parametrize("activation", ["gelu", "relu", "silu"])
def test_leading_dims(activation):
    run_ffn((2, 13), 24, 40, 24, torch.float32, activation=activation)


def test_fp16():
    run_ffn((33,), 32, 48, 32, torch.float16)


def test_linear_layout_weights():
    """Weights as nn.Linear stores them ([out, in]), passed transposed without copies."""
    x = torch.randn(21, 24, device=DEVICE, requires_grad=True)
    w1 = (torch.randn(40, 24, device=DEVICE) * 24**-0.5).requires_grad_()
    w2 = (torch.randn(24, 40, device=DEVICE) * 40**-0.5).requires_grad_()
    compare_mlp(
        lambda a, b, c: mlp(a, b.t(), c.t()),
        lambda a, b, c: core_mlp.mlp(a, b.t(), c.t()),
        [x, w1, w2],
        torch.float32,
    )


def test_input_errors():
    x = torch.randn(4, 16, device=DEVICE)
    w1, w2 = make_weights(1, 16, 24, 16, torch.float32, grouped=False)
    with pytest.raises(InputError, match="activation"):
        mlp(x, w1, w2, activation="tanh")
    with pytest.raises(InputError, match="w2: expected shape"):
        mlp(x, w1, w2[:5])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_tnp_ffn(dtype):
    run_ffn((16, 512), 512, 1365, 512, dtype)


@pytest.mark.gpu
def test_gpu_fp32_many_rows():
    run_ffn((8192,), 512, 1365, 512, torch.float32)
