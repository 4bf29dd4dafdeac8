"""Gaussian mixture head math against torch.distributions, autograd and sampling statistics."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import Categorical, MixtureSameFamily, Normal

from tabattn_core.checks import InputError
from tabattn_core.gmm import (
    gmm_cdf,
    gmm_log_likelihood,
    gmm_mean_var,
    gmm_nll,
    gmm_quantile,
    gmm_sample,
    gmm_sample_from_noise,
)
from tabattn_core.testing import assert_rel_close

F64 = torch.float64


def random_mixture(batch, k, *, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*batch, k, generator=g, dtype=dtype) * 2
    loc = torch.randn(*batch, k, generator=g, dtype=dtype) * 3
    std = torch.rand(*batch, k, generator=g, dtype=dtype) * 2 + 0.05
    return logits, loc, std


def torch_mixture(logits, loc, std):
    return MixtureSameFamily(Categorical(logits=logits), Normal(loc, std))


batch_shapes = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(1, 8),
    batch=batch_shapes,
    scale_param=st.sampled_from(["std", "log_std"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_log_likelihood_matches_torch_distributions(k, batch, scale_param, seed):
    logits, loc, std = random_mixture(batch, k, seed=seed)
    y = torch.randn(batch, generator=torch.Generator().manual_seed(seed + 1), dtype=F64) * 4
    scale = std if scale_param == "std" else std.log()
    ll = gmm_log_likelihood(y, logits, loc, scale, scale_param=scale_param)
    assert ll.shape == y.shape and ll.dtype == F64
    assert_rel_close(ll, torch_mixture(logits, loc, std).log_prob(y), name="log p(y)")


def test_log_likelihood_broadcast_and_dtype_promotion():
    logits, loc, std = random_mixture((3, 1), 4, dtype=torch.float32)
    y = torch.randn(3, 5, dtype=F64)
    ll = gmm_log_likelihood(y, logits, loc, std)
    assert ll.shape == (3, 5) and ll.dtype == F64
    ref = torch_mixture(logits.double(), loc.double(), std.double()).log_prob(y)
    assert_rel_close(ll, ref, tol=1e-6)
    half = gmm_log_likelihood(y.half(), logits.half(), loc.half(), std.half())
    assert half.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_log_likelihood_extreme_values_finite(dtype):
    # Very peaked components far from y: every component density underflows to 0 on its
    # own, but log p(y) is finite and equals the best component's log-density.
    logits = torch.tensor([[0.0, 0.0], [30.0, -30.0], [0.0, 0.0]], dtype=dtype)
    loc = torch.tensor([[0.0, 1.0], [0.0, 1.0], [-1e4, 1e4]], dtype=dtype)
    std = torch.tensor([[1e-6, 1e-6], [1e-3, 1e-3], [1e-3, 2.0]], dtype=dtype)
    y = torch.tensor([1e3, -1e4, 1e6], dtype=dtype)
    ll = gmm_log_likelihood(y, logits, loc, std)
    assert torch.isfinite(ll).all(), ll
    ref = torch.logsumexp(
        torch.log_softmax(logits.double(), -1)
        + Normal(loc.double(), std.double()).log_prob(y.double()[:, None]),
        -1,
    )
    assert_rel_close(ll, ref, dtype=dtype)
    # Large logits and |y| well inside the range stay finite too.
    big = gmm_log_likelihood(
        torch.tensor([1e30], dtype=F64),
        torch.tensor([[1e4, -1e4]], dtype=F64),
        torch.tensor([[0.0, 1.0]], dtype=F64),
        torch.tensor([[1.0, 1.0]], dtype=F64),
    )
    assert torch.isfinite(big).all()


def test_log_likelihood_gradcheck():
    logits, loc, std = random_mixture((2, 3), 3, seed=1)
    y = torch.randn(2, 3, dtype=F64)
    for scale_param, scale in (("std", std), ("log_std", std.log())):
        inputs = tuple(t.clone().requires_grad_() for t in (y, logits, loc, scale))
        fn = lambda *a, sp=scale_param: gmm_log_likelihood(*a, scale_param=sp)
        assert torch.autograd.gradcheck(fn, inputs)
    inputs = tuple(t.clone().requires_grad_() for t in (logits, loc, std))
    assert torch.autograd.gradcheck(lambda *a: gmm_mean_var(*a)[1], inputs)


def test_nll_with_and_without_mask():
    logits, loc, std = random_mixture((4, 6), 3, seed=2)
    y = torch.randn(4, 6, dtype=F64)
    ll = torch_mixture(logits, loc, std).log_prob(y)
    assert_rel_close(gmm_nll(y, logits, loc, std), -ll.mean())
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(3)) > 0.4
    expect = -(ll * mask).sum() / mask.sum()
    assert_rel_close(gmm_nll(y, logits, loc, std, mask=mask), expect)
    weights = mask.to(F64) * 0.5
    expect_w = -(ll * weights).sum() / weights.sum().clamp_min(1)
    assert_rel_close(gmm_nll(y, logits, loc, std, mask=weights), expect_w)
    # An all-zero mask gives 0 (denominator clamped to 1), and masked-out padding with a
    # non-finite nll never leaks into the loss.
    assert gmm_nll(y, logits, loc, std, mask=torch.zeros(4, 6, dtype=torch.bool)) == 0
    y_pad = torch.where(mask, y, torch.tensor(float("nan"), dtype=F64))
    assert_rel_close(gmm_nll(y_pad, logits, loc, std, mask=mask), expect)


def test_sample_reproducible_with_generator():
    logits, loc, std = random_mixture((3, 5), 4)

    def draw(seed):
        return gmm_sample(
            logits, loc, std, num_samples=7, generator=torch.Generator().manual_seed(seed)
        )

    a, b, c = draw(0), draw(0), draw(1)
    assert a.shape == (3, 5, 7)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sample_rng_order_multinomial_then_randn():
    logits, loc, std = random_mixture((2, 3), 5)
    out = gmm_sample(logits, loc, std, num_samples=4, generator=torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    idx = torch.multinomial(torch.softmax(logits, -1).reshape(-1, 5), 4, True, generator=g)
    eps = torch.randn(idx.shape, generator=g, dtype=F64)
    expect = loc.reshape(-1, 5).gather(1, idx) + std.reshape(-1, 5).gather(1, idx) * eps
    assert_rel_close(out, expect.reshape(2, 3, 4))


@pytest.mark.parametrize("scale_param", ["std", "log_std"])
def test_sample_moments_match_mean_var(scale_param):
    logits = torch.tensor([[0.3, -0.5, 1.0], [2.0, 0.0, -1.0]], dtype=F64)
    loc = torch.tensor([[-2.0, 0.5, 3.0], [1.0, -4.0, 0.0]], dtype=F64)
    std = torch.tensor([[0.5, 1.5, 0.2], [1.0, 0.3, 2.5]], dtype=F64)
    scale = std if scale_param == "std" else std.log()
    n = 200_000
    gen = torch.Generator().manual_seed(1234)
    x = gmm_sample(logits, loc, scale, num_samples=n, generator=gen, scale_param=scale_param)
    mean, var = gmm_mean_var(logits, loc, scale, scale_param=scale_param)
    ref = torch_mixture(logits, loc, std)
    assert_rel_close(mean, ref.mean)
    assert_rel_close(var, ref.variance)
    # Standard errors: se(mean) = sqrt(var / n); se(sample var) = sqrt((m4 - var²) / n),
    # m4 the fourth central moment of the mixture (computed exactly per component).
    d = loc - mean[:, None]
    w = torch.softmax(logits, -1)
    m4 = (w * (d**4 + 6 * d**2 * std**2 + 3 * std**4)).sum(-1)
    z = 5.0
    assert ((x.mean(-1) - mean).abs() <= z * (var / n).sqrt()).all()
    assert ((x.var(-1) - var).abs() <= z * ((m4 - var**2) / n).sqrt()).all()


@pytest.mark.parametrize("scale_param", ["std", "log_std"])
def test_sample_from_noise_moments_match_mean_var(scale_param):
    """Uniform and normal noise in, mixture draws out: their mean and variance are the
    mixture's within 5 standard errors."""
    logits = torch.tensor([[0.3, -0.5, 1.0], [2.0, 0.0, -1.0]], dtype=F64)
    loc = torch.tensor([[-2.0, 0.5, 3.0], [1.0, -4.0, 0.0]], dtype=F64)
    std = torch.tensor([[0.5, 1.5, 0.2], [1.0, 0.3, 2.5]], dtype=F64)
    scale = std if scale_param == "std" else std.log()
    n = 200_000
    gen = torch.Generator().manual_seed(99)
    u = torch.rand(n, 2, generator=gen, dtype=F64)
    eps = torch.randn(n, 2, generator=gen, dtype=F64)
    draw = gmm_sample_from_noise(
        logits[None], loc[None], scale[None], u, eps, scale_param=scale_param
    )  # [n, 2]
    mean, var = gmm_mean_var(logits, loc, scale, scale_param=scale_param)
    d = loc - mean[:, None]
    w = torch.softmax(logits, -1)
    m4 = (w * (d**4 + 6 * d**2 * std**2 + 3 * std**4)).sum(-1)
    assert ((draw.mean(0) - mean).abs() <= 5 * (var / n).sqrt()).all()
    assert ((draw.var(0) - var).abs() <= 5 * ((m4 - var**2) / n).sqrt()).all()


def test_sample_from_noise_inverse_cdf():
    """The component is the first whose cumulative weight exceeds u (weights 0.2, 0, 0.5,
    0.3: a zero-weight component is never drawn; u near 1 falls in the last)."""
    logits = torch.tensor([0.2, 0.0, 0.5, 0.3], dtype=F64).log()
    loc = torch.tensor([10.0, 20.0, 30.0, 40.0], dtype=F64)
    std = torch.tensor([1.0, 1.0, 1.0, 2.0], dtype=F64)
    u = torch.tensor([0.0, 0.1999, 0.2001, 0.6999, 0.7001, 1.0 - 1e-12], dtype=F64)
    eps = torch.full_like(u, 0.5)
    out = gmm_sample_from_noise(logits, loc, std, u, eps)
    assert torch.equal(out, torch.tensor([10.5, 10.5, 30.5, 30.5, 41.0, 41.0], dtype=F64))


def test_mean_var_single_component():
    mean, var = gmm_mean_var(
        torch.zeros(3, 1), torch.tensor([[1.0], [2.0], [3.0]]), torch.full((3, 1), 2.0)
    )
    assert torch.equal(mean, torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(var, torch.full((3,), 4.0))


def test_cdf_matches_torch_cdf():
    logits, loc, std = random_mixture((4,), 3, seed=5)
    x = torch.linspace(-5, 5, 4, dtype=F64)
    w = torch.softmax(logits, -1)
    expect = (w * Normal(loc, std).cdf(x[:, None])).sum(-1)
    assert_rel_close(gmm_cdf(x, logits, loc, std), expect)


@settings(max_examples=30, deadline=None)
@given(
    k=st.integers(1, 8),
    batch=batch_shapes,
    scale_param=st.sampled_from(["std", "log_std"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_quantile_inverts_cdf(k, batch, scale_param, seed):
    logits, loc, std = random_mixture(batch, k, seed=seed)
    scale = std if scale_param == "std" else std.log()
    q = torch.tensor([1e-4, 0.025, 0.3, 0.5, 0.77, 0.975, 1 - 1e-4], dtype=F64)
    x = gmm_quantile(q, logits, loc, scale, scale_param=scale_param)
    assert x.shape == (*batch, 7)
    mixture = (t[..., None, :] for t in (logits, loc, scale))
    p = gmm_cdf(x, *mixture, scale_param=scale_param)
    assert (p - q).abs().max() < 1e-6
    assert (x.diff(dim=-1) >= 0).all()
    x_scalar = gmm_quantile(0.3, logits, loc, scale, scale_param=scale_param)
    assert x_scalar.shape == batch
    assert (x_scalar - x[..., 2]).abs().max() <= 1e-9


def test_quantile_single_component_matches_normal_icdf():
    loc = torch.tensor([[0.0], [3.0], [-1e3]], dtype=F64)
    std = torch.tensor([[1.0], [0.01], [50.0]], dtype=F64)
    q = torch.tensor([1e-6, 0.1, 0.5, 0.9, 0.999], dtype=F64)
    x = gmm_quantile(q, torch.zeros(3, 1, dtype=F64), loc, std)
    assert_rel_close(x, Normal(loc, std).icdf(q), tol=1e-12)


def _mix(k=3):
    return torch.zeros(2, k), torch.zeros(2, k), torch.ones(2, k)


@pytest.mark.parametrize(
    ("call", "arg"),
    [
        (lambda: gmm_log_likelihood(torch.zeros(2), *_mix()[:2], torch.ones(2, 4)), "scale"),
        (lambda: gmm_log_likelihood(torch.zeros(2), _mix()[0], *_mix(2)[1:]), "loc"),
        (
            lambda: gmm_log_likelihood(torch.zeros(2), _mix()[0], torch.zeros(3, 3), _mix()[2]),
            "loc",
        ),
        (
            lambda: gmm_log_likelihood(
                torch.zeros(2), *_mix()[:2], torch.ones(2, 3, device="meta")
            ),
            "scale",
        ),
        (lambda: gmm_log_likelihood(torch.zeros(2), *_mix(0)), "logits"),
        (lambda: gmm_log_likelihood(torch.zeros(2), torch.zeros(()), *_mix()[1:]), "logits"),
        (lambda: gmm_log_likelihood(torch.zeros(5), *_mix()), "y"),
        (lambda: gmm_log_likelihood(torch.zeros(2, dtype=torch.int64), *_mix()), "y"),
        (lambda: gmm_log_likelihood(torch.zeros(2), *_mix(), scale_param="var"), "scale_param"),
        (lambda: gmm_nll(torch.zeros(2), *_mix(), mask=torch.ones(3, dtype=torch.bool)), "mask"),
        (lambda: gmm_nll(torch.zeros(2), *_mix(), mask=torch.ones(2, dtype=torch.int64)), "mask"),
        (lambda: gmm_sample(*_mix(), num_samples=0), "num_samples"),
        (lambda: gmm_sample(*_mix(), num_samples=2.0), "num_samples"),
        (lambda: gmm_mean_var(*_mix(), scale_param="variance"), "scale_param"),
        (lambda: gmm_cdf(torch.zeros(3), *_mix()), "x"),
        (lambda: gmm_quantile(0.0, *_mix()), "q"),
        (lambda: gmm_quantile(1.0, *_mix()), "q"),
        (lambda: gmm_quantile(float("nan"), *_mix()), "q"),
        (lambda: gmm_quantile(torch.tensor([0.5, 1.5]), *_mix()), "q"),
        (lambda: gmm_quantile(torch.full((2, 2), 0.5), *_mix()), "q"),
        (lambda: gmm_quantile(0.5, *_mix(), tol=0.0), "tol"),
        (lambda: gmm_quantile(0.5, *_mix(), max_iter=-1), "max_iter"),
    ],
)
def test_bad_input_names_argument(call, arg):
    with pytest.raises(InputError, match=rf"^{arg}: expected"):
        call()


def test_bad_input_messages_give_expected_and_actual():
    with pytest.raises(InputError, match=r"scale: expected K = 3 .* got 4"):
        gmm_log_likelihood(torch.zeros(2), torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 4))
    with pytest.raises(InputError, match=r"q: expected .*\(0, 1\).*got 1\.0"):
        gmm_quantile(1.0, *_mix())
    assert math.isfinite(gmm_quantile(0.5, *_mix()).sum().item())
