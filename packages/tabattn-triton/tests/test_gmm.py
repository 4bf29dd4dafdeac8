"""Fused GMM loss kernel against `tabattn_core.gmm.gmm_nll`: loss and gradients of y, logits,
loc and scale.

CPU: under the Triton interpreter (fp32/fp16, small row counts). GPU (`-m gpu`): bf16 / fp16
/ fp32 at the TNP sizes. Gradients are NaN-poisoned on allocation (conftest).
"""

from __future__ import annotations

import pytest
import torch

from tabattn_core import gmm
from tabattn_core.checks import InputError
from tabattn_core.testing import REL_TOL, assert_rel_close, rel_error
from tabattn_triton.ops.gmm import gmm_nll

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("dy", "dlogits", "dloc", "dscale")


def make_mixture(batch, k, *, scale_param="std", dtype=torch.float32, spread=1.0):
    """y [batch], logits/loc/scale [batch, K] (leaves requiring grad)."""
    y = torch.randn(*batch, device=DEVICE) * 2 * spread
    logits = torch.randn(*batch, k, device=DEVICE) * 2
    loc = torch.randn(*batch, k, device=DEVICE) * 2
    std = torch.rand(*batch, k, device=DEVICE) + 0.1
    scale = std if scale_param == "std" else std.log()
    return [t.to(dtype).requires_grad_() for t in (y, logits, loc, scale)]


def reference(inputs, dtype, *, scale_param, mask):
    """Loss and gradients of the core reference on the input values cast to `dtype`."""
    ref_inputs = [t.detach().to(dtype).requires_grad_() for t in inputs]
    ref_mask = mask if mask is None or mask.dtype == torch.bool else mask.to(dtype)
    ref = gmm.gmm_nll(*ref_inputs, scale_param=scale_param, mask=ref_mask)
    return [ref, *torch.autograd.grad(ref * 1.7, ref_inputs)]


def compare(inputs, *, scale_param="std", mask=None):
    """Kernel vs the fp64 reference on the same input values: loss and every gradient.

    Bound per quantity (FA3's rule): REL_TOL of its dtype (fp32 for the loss), or twice the
    error of the reference itself run in fp32 (ill-conditioned inputs such as peaked
    components far from y) or in the inputs' dtype (fp16 gradients of a mean over 1e5+ rows
    are subnormal), whichever is larger."""
    loss = gmm_nll(*inputs, scale_param=scale_param, mask=mask)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    got = [loss, *torch.autograd.grad(loss * 1.7, inputs)]
    ref64 = reference(inputs, torch.float64, scale_param=scale_param, mask=mask)
    ref32 = reference(inputs, torch.float32, scale_param=scale_param, mask=mask)
    own = reference(inputs, inputs[0].dtype, scale_param=scale_param, mask=mask)
    dtypes = [torch.float32, *(t.dtype for t in inputs)]
    for name, g, r64, r32, r_own, dtype in zip(
        ("loss", *NAMES), got, ref64, ref32, own, dtypes, strict=True
    ):
        assert g.shape == r64.shape and (name == "loss" or g.dtype == dtype)
        bound = max(REL_TOL[dtype], 2 * rel_error(r32, r64), 2 * rel_error(r_own, r64))
        assert_rel_close(g, r64, tol=bound, name=name)


@pytest.mark.parametrize("k", [1, 10, 37])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_matches_reference(k, mask_kind):
    rows = 301  # odd; several programs at K <= 10
    inputs = make_mixture((rows,), k)
    mask = {
        "none": None,
        "bool": torch.rand(rows, device=DEVICE) > 0.4,
        "float": torch.rand(rows, device=DEVICE) * (torch.rand(rows, device=DEVICE) > 0.3),
    }[mask_kind]
    compare(inputs, mask=mask)


@pytest.mark.parametrize("k", [1, 10])
def test_log_std_and_leading_shape(k):
    inputs = make_mixture((3, 17), k, scale_param="log_std")
    compare(inputs, scale_param="log_std", mask=torch.rand(3, 17, device=DEVICE) > 0.5)


def test_fp16_inputs():
    compare(make_mixture((70,), 10, dtype=torch.float16), mask=None)


def test_peaked_components_and_far_away_y():
    y, logits, loc, scale = make_mixture((64,), 10, spread=1.0)
    with torch.no_grad():
        scale[:, :3] = 1e-3  # peaked
        scale[:, 3:] = 5.0
        y[:32] += 1e3  # far from every component
        loc[40:, 0] = y[40:]  # y exactly at a peaked mean
    compare([y, logits, loc, scale])
    log_scale = scale.detach().log().requires_grad_()
    compare([y, logits, loc, log_scale], scale_param="log_std")


def test_masked_rows_add_exact_zero_even_when_not_finite():
    y, logits, loc, scale = make_mixture((40,), 10)
    mask = torch.ones(40, dtype=torch.bool, device=DEVICE)
    mask[::3] = False
    with torch.no_grad():
        scale[0] = 0.0  # nll +inf on a masked row
        loc[3] = float("nan")
    loss = gmm_nll(y, logits, loc, scale, mask=mask)
    loss.backward()
    keep = mask.nonzero().squeeze(1)
    sub = [t.detach()[keep].requires_grad_() for t in (y, logits, loc, scale)]
    ref = gmm.gmm_nll(*sub)
    assert_rel_close(loss, ref.detach(), dtype=torch.float32)
    for t in (y, logits, loc, scale):
        assert torch.equal(t.grad[~mask], torch.zeros_like(t.grad[~mask]))
        assert torch.isfinite(t.grad).all()


def test_one_row_all_masked_and_empty():
    compare(make_mixture((1,), 10))
    inputs = make_mixture((9,), 4)
    loss = gmm_nll(*inputs, mask=torch.zeros(9, device=DEVICE))
    loss.backward()
    assert loss.item() == 0.0 and all(torch.equal(t.grad, torch.zeros_like(t)) for t in inputs)
    for batch in [(0,), (0, 5)]:
        inputs = make_mixture(batch, 3)
        loss = gmm_nll(*inputs)
        loss.backward()
        assert loss.item() == 0.0 and all(t.grad.shape == t.shape for t in inputs)


def test_strided_head_slices_broadcast_and_no_dy():
    k, rows = 10, 45
    head = torch.randn(rows, 3 * k + 1, device=DEVICE)  # one [rows, 3K+1] head output
    head[:, 2 * k : 3 * k] = head[:, 2 * k : 3 * k].abs() + 0.2
    head.requires_grad_()
    logits, loc, scale = head[:, :k], head[:, k : 2 * k], head[:, 2 * k : 3 * k]
    y = torch.randn(rows, 2, device=DEVICE)[:, 1]  # row stride 2, no grad
    loss = gmm_nll(y, logits, loc, scale)
    (grad,) = torch.autograd.grad(loss, head)
    head64 = head.detach().double().requires_grad_()
    ref = gmm.gmm_nll(y.double(), head64[:, :k], head64[:, k : 2 * k], head64[:, 2 * k : 3 * k])
    (ref_grad,) = torch.autograd.grad(ref, head64)
    assert_rel_close(loss, ref, dtype=torch.float32)
    assert_rel_close(grad, ref_grad, dtype=torch.float32)
    # parameters shared by every target of a dataset: [B, 1, K] against y [B, N]
    y, logits, loc, scale = make_mixture((2, 1), 5)
    compare([y.detach().expand(2, 7).contiguous().requires_grad_(), logits, loc, scale])


def test_deterministic():
    inputs = make_mixture((1000,), 10)
    first = gmm_nll(*inputs)
    assert torch.equal(first, gmm_nll(*inputs))


def test_input_errors():
    y, logits, loc, scale = make_mixture((5,), 3)
    with pytest.raises(InputError, match="scale_param"):
        gmm_nll(y, logits, loc, scale, scale_param="var")
    with pytest.raises(InputError, match="loc: expected K = 3"):
        gmm_nll(y, logits, loc[:, :2], scale)
    with pytest.raises(InputError, match="y: expected a batch shape"):
        gmm_nll(y[:4], logits, loc, scale)
    with pytest.raises(InputError, match="mask: expected shape"):
        gmm_nll(y, logits, loc, scale, mask=torch.ones(4, dtype=torch.bool, device=DEVICE))
    with pytest.raises(InputError, match="mask: expected dtype"):
        gmm_nll(y, logits, loc, scale, mask=torch.ones(5, dtype=torch.int64, device=DEVICE))
    with pytest.raises(InputError, match="logits: expected dtype"):
        gmm_nll(y, logits.double(), loc, scale)


# ---------------------------------------------------------------------------------------
# GPU: real sizes (B*N target rows of a TNP batch), low precision, many programs


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [8000, 65536, 1_000_003])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_sizes(rows, dtype):
    mask = torch.rand(rows, device=DEVICE) > 0.1
    compare(make_mixture((rows,), 10, dtype=dtype), mask=mask)


@pytest.mark.gpu
@pytest.mark.parametrize("k", [1, 3, 64, 100, 513])
@pytest.mark.parametrize("scale_param", ["std", "log_std"])
def test_gpu_components(k, scale_param):
    inputs = make_mixture((16, 500), k, scale_param=scale_param, dtype=torch.bfloat16)
    compare(inputs, scale_param=scale_param, mask=torch.rand(16, 500, device=DEVICE))


@pytest.mark.gpu
def test_gpu_head_slices_bf16_deterministic():
    k, rows = 10, 64 * 1000 + 7
    head = torch.randn(rows, 3 * k, device=DEVICE, dtype=torch.bfloat16)
    head[:, 2 * k :] = head[:, 2 * k :].abs() + 0.05
    head.requires_grad_()
    y = torch.randn(rows, device=DEVICE, dtype=torch.bfloat16)
    args = (y, head[:, :k], head[:, k : 2 * k], head[:, 2 * k :])
    losses = [gmm_nll(*args) for _ in range(3)]
    grads = [torch.autograd.grad(loss, head)[0] for loss in losses]
    assert all(torch.equal(losses[0], x) for x in losses) and all(
        torch.equal(grads[0], g) for g in grads
    )
    head64 = head.detach().double().requires_grad_()
    ref = gmm.gmm_nll(y.double(), head64[:, :k], head64[:, k : 2 * k], head64[:, 2 * k :])
    (ref_grad,) = torch.autograd.grad(ref, head64)
    assert_rel_close(losses[0], ref, tol=REL_TOL[torch.float32])
    assert_rel_close(grads[0], ref_grad, dtype=torch.bfloat16)
