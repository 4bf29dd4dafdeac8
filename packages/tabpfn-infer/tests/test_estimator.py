"""ARTabPFNRegressor: data units, consistency with the predictor, marginals, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tabattn_core.checks import InputError
from tabattn_core.gmm import gmm_log_likelihood
from tabpfn_infer import ARTabPFN, ARTabPFNRegressor


@pytest.fixture
def fitted():
    torch.manual_seed(0)
    model = ARTabPFN(d_model=32, n_heads=2, n_layers=2, d_ff=48, buffer_size=4, num_components=3)
    rng = np.random.default_rng(0)
    X = rng.normal(3.0, 2.0, size=(25, 3))
    y = 10 + 5 * np.sin(X[:, 0]) + rng.normal(0, 0.5, 25)
    est = ARTabPFNRegressor(model=model, backend="torch", device="cpu", dtype=torch.float64)
    return est.fit(X, y), rng.normal(3.0, 2.0, size=(6, 3))


def test_log_density_is_in_data_units(fitted):
    est, X_target = fitted
    y = np.linspace(5, 15, 6)
    logp = est.log_density(X_target, y)
    assert logp.shape == (6,) and torch.isfinite(logp).all()
    # scaling the labels by a factor shifts each log density by -log(factor)
    X, yc = est.X_context_.clone(), est.y_context_.clone()
    est2 = ARTabPFNRegressor(model=est.model, backend="torch", device="cpu", dtype=torch.float64)
    est2.fit(
        X.numpy() * est.x_std_.numpy() + est.x_mean_.numpy(),
        2 * (yc.numpy() * float(est.y_std_) + float(est.y_mean_)),
    )
    torch.testing.assert_close(est2.log_density(X_target, 2 * y), logp - np.log(2.0))


def test_first_conditional_is_the_marginal(fitted):
    est, X_target = fitted
    y = np.full(6, 11.0)
    first = est.log_density(X_target, y)[0]
    xc, yc = est._context(1)
    log_w, mean, std = (
        t[0, 0] for t in est.predictor_.marginal_mixture(xc, yc, est._targets(X_target)[None])
    )
    z = (11.0 - est.y_mean_) / est.y_std_
    torch.testing.assert_close(
        first, gmm_log_likelihood(z, log_w, mean, std) - torch.log(est.y_std_)
    )


def test_predict_quantiles_and_samples(fitted):
    est, X_target = fitted
    pred = est.predict(X_target, quantiles=(0.1, 0.5, 0.9))
    assert pred["mean"].shape == (6,) and pred["quantiles"].shape == (6, 3)
    assert (pred["quantiles"].diff(dim=1) > 0).all() and (pred["std"] > 0).all()
    samples = est.sample(X_target, 3000, generator=torch.Generator().manual_seed(1))
    assert samples.shape == (3000, 6)
    # the first target's samples come from its marginal
    inside = (
        ((samples[:, 0] > pred["quantiles"][0, 0]) & (samples[:, 0] < pred["quantiles"][0, 2]))
        .double()
        .mean()
    )
    assert abs(inside.item() - 0.8) < 4 * (0.8 * 0.2 / 3000) ** 0.5


def test_bad_input(fitted):
    est, X_target = fitted
    bad = X_target.copy()
    bad[2, 1] = np.inf
    with pytest.raises(
        InputError, match="X_target: expected finite values, got inf at row 2, column 1"
    ):
        est.predict(bad)
    with pytest.raises(InputError, match="X_target: expected 3 columns"):
        est.predict(X_target[:, :2])
    with pytest.raises(InputError, match="n_samples"):
        est.sample(X_target, 0)
    with pytest.raises(InputError, match="y_target: expected 6 rows"):
        est.log_density(X_target, np.zeros(5))
    with pytest.raises(InputError, match="call fit"):
        ARTabPFNRegressor(model=est.model).predict(X_target)
    with pytest.raises(InputError, match="y_context: expected 4 rows"):
        ARTabPFNRegressor(model=est.model).fit(np.zeros((4, 2)), np.zeros(3))
    with pytest.raises(
        InputError, match=r"X_context: expected numbers, got .a. at row 0, column 0"
    ):
        ARTabPFNRegressor(model=est.model).fit(np.array([["a", "b"]]), np.zeros(1))
