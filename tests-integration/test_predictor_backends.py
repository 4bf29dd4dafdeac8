"""The predictor on every backend the registry offers here: the Triton kernels (under the
interpreter on CPU, natively on a GPU) agree with the PyTorch references end to end."""

from __future__ import annotations

import os

import pytest
import torch

from tabattn_core.registry import registry
from tabpfn_infer import ARTabPFN, ARTabPFNPredictor

DEVICE = (
    "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
)


def tiny_task(b=3, nc=11, nt=4, c=2, shared=True):
    gen = torch.Generator().manual_seed(3)
    xc = torch.randn(1 if shared else b, nc, c, generator=gen).expand(b, nc, c)
    yc = torch.randn(1 if shared else b, nc, generator=gen).expand(b, nc)
    return xc, yc, torch.randn(b, nt, c, generator=gen), torch.randn(b, nt, generator=gen)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return (
        ARTabPFN(d_model=32, n_heads=2, n_layers=2, d_ff=48, buffer_size=3, num_components=3)
        .to(DEVICE)
        .eval()
    )


def triton_available() -> bool:
    return any(
        b.name == "triton" and b.available(torch.device(DEVICE))[0] for b in registry.backends()
    )


@pytest.mark.skipif(
    not triton_available(), reason="triton backend unavailable (needs CUDA or TRITON_INTERPRET=1)"
)
@pytest.mark.parametrize("shared", [True, False])
def test_triton_backend_matches_torch(model, shared):
    task = [t.to(DEVICE) for t in tiny_task(shared=shared)]
    torch_pred = ARTabPFNPredictor(model, backend="torch")
    triton_pred = ARTabPFNPredictor(model, backend="triton")
    tol = 1e-4 if DEVICE == "cpu" else 5e-3  # GPU float32 dots may use TF32
    want = torch_pred.evaluate_joint_density(*task)
    torch.testing.assert_close(triton_pred.evaluate_joint_density(*task), want, rtol=tol, atol=tol)
    torch.testing.assert_close(triton_pred.stepwise_log_density(*task), want, rtol=tol, atol=tol)


def test_auto_backend_runs_and_says_why(model):
    task = [t.to(DEVICE) for t in tiny_task()]
    out = ARTabPFNPredictor(model).evaluate_joint_density(*task)
    assert out.shape == (3, 4) and torch.isfinite(out).all()
    assert (
        "auto ->" in registry.choose("auto", device=DEVICE, op="teacher_forcing_attention").reason
    )
