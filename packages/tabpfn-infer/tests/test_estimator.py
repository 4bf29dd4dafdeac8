"""ARTabPFNRegressor: data units, consistency with the predictor, marginals, bad input, fit
leaving its arguments alone, refits atomic for concurrent readers."""

from __future__ import annotations

import threading

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
    state = est._state()
    xc, yc = state.context(1)
    log_w, mean, std = (
        t[0, 0]
        for t in est.predictor_.marginal_mixture(xc, yc, est._targets(state, X_target)[None])
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


def small_model() -> ARTabPFN:
    torch.manual_seed(0)
    return ARTabPFN(d_model=32, n_heads=2, n_layers=2, d_ff=48, buffer_size=4, num_components=3)


def task(seed: int, n: int = 25) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(3.0, 2.0, size=(n, 3))
    return X, 10 + 5 * np.sin(X[:, 0]) + rng.normal(0, 0.5, n), rng.normal(3.0, 2.0, (6, 3))


def test_fit_leaves_model_and_data_alone():
    model = small_model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    X, y, X_target = task(0)
    X_t, y_t = torch.tensor(X, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    X_copy, y_copy = X_t.clone(), y_t.clone()
    est = ARTabPFNRegressor(model=model, backend="torch", device="cpu", dtype=torch.float64)
    est.fit(X_t, y_t).predict(X_target)
    assert model.training and est.model_ is not model and not est.model_.training
    for k, v in model.state_dict().items():
        assert v.dtype == before[k].dtype and v.device == before[k].device, k
        assert torch.equal(v, before[k]), k
    assert torch.equal(X_t, X_copy) and torch.equal(y_t, y_copy)
    assert all(p.dtype == torch.float64 for p in est.model_.parameters())


def test_estimators_sharing_a_model_agree_with_each_alone():
    X, y, X_target = task(0)
    make = lambda model, dtype: ARTabPFNRegressor(
        model=model, backend="torch", device="cpu", dtype=dtype
    )
    alone = {
        dtype: make(small_model(), dtype).fit(X, y) for dtype in (torch.float32, torch.float64)
    }
    shared = small_model()
    est32 = make(shared, torch.float32).fit(X, y)
    est64 = make(shared, torch.float64).fit(X, y)
    for est, dtype in ((est32, torch.float32), (est64, torch.float64)):
        assert all(p.dtype == dtype for p in est.model_.parameters())
        got = est.log_density(X_target, np.full(6, 11.0))
        assert torch.equal(got, alone[dtype].log_density(X_target, np.full(6, 11.0)))
        assert torch.equal(est.predict(X_target)["mean"], alone[dtype].predict(X_target)["mean"])


def test_refit_is_atomic_for_concurrent_predictions():
    contexts = [task(1)[:2], task(2, n=17)[:2]]
    X_target = task(0)[2]
    est = ARTabPFNRegressor(model=small_model(), backend="torch", device="cpu", dtype=torch.float64)
    expected = [est.fit(*c).predict(X_target)["mean"] for c in contexts]
    assert not torch.equal(*expected)
    stop, failures, seen = threading.Event(), [], set()

    def refit():
        for i in range(40):
            est.fit(*contexts[i % 2])
        stop.set()

    def read():
        while not stop.is_set():
            mean = est.predict(X_target)["mean"]
            hits = [i for i, e in enumerate(expected) if torch.equal(mean, e)]
            seen.update(hits)
            if not hits:
                failures.append(mean)

    threads = [threading.Thread(target=refit), threading.Thread(target=read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, f"{len(failures)} predictions matched neither context"
    assert seen, "no prediction ran during the refits"


def test_values_near_float64s_limit_standardise():
    X, y, X_target = task(0)
    make = lambda: ARTabPFNRegressor(model=small_model(), backend="torch", device="cpu")
    est, big = make().fit(X, y), make().fit(X * 1e200, y * 1e200)
    torch.testing.assert_close(big.y_std_, est.y_std_ * 1e200)
    y_target = np.linspace(5, 15, 6)
    torch.testing.assert_close(
        big.log_density(X_target * 1e200, y_target * 1e200),
        est.log_density(X_target, y_target) - 200 * np.log(10.0),
    )
    torch.testing.assert_close(
        big.predict(X_target * 1e200)["mean"], est.predict(X_target)["mean"] * 1e200
    )


def test_label_scale_floor_is_relative():
    from tabpfn_infer.estimator import SCALE_FLOOR

    X, _, X_target = task(0)
    est = ARTabPFNRegressor(model=small_model(), backend="torch", device="cpu", dtype=torch.float64)
    at_5 = est.fit(X, np.full(25, 5.0)).log_density(X_target, np.full(6, 5.0))
    assert float(est.y_std_) == SCALE_FLOOR * 5.0
    assert torch.isfinite(at_5).all() and (at_5 < 15).all()
    # a constant label's density scales with its units (the old absolute floor did not)
    at_5000 = est.fit(X, np.full(25, 5000.0)).log_density(X_target, np.full(6, 5000.0))
    torch.testing.assert_close(at_5000, at_5 - np.log(1000.0))
    # one unit away: very unlikely, but finite
    assert torch.isfinite(est.fit(X, np.full(25, 5.0)).log_density(X_target, np.full(6, 6.0))).all()
    assert float(est.fit(X, np.zeros(25)).y_std_) == 1.0


def test_standardisation_overflow_names_the_column():
    X, y, X_target = task(0)
    est = ARTabPFNRegressor(model=small_model(), backend="torch", device="cpu")
    wide = X.copy()
    wide[:, 1] = 1e308
    wide[0, 1] = -1.7e308  # 2.6e308 below the column's mean
    with pytest.raises(InputError, match=r"X_context column 1, row 0: .* overflows float64"):
        est.fit(wide, y)
    with pytest.raises(InputError, match=r"y_context: the standardisation scale .* overflows"):
        est.fit(X, np.tile([1.79e308, -1.79e308], 13)[:25])
    est.fit(X, y)
    far = X_target.copy()
    far[3, 2] = 1e300
    with pytest.raises(InputError, match=r"X_target column 2, row 3: .*float32's range"):
        est.predict(far)
    with pytest.raises(InputError, match=r"y_target row 1: .*float32's range"):
        est.log_density(X_target, [10, 1e300, 10, 10, 10, 10])


def test_non_finite_results_raise_naming_the_cause():
    X, _, X_target = task(0)
    est = ARTabPFNRegressor(model=small_model(), backend="torch", device="cpu")
    est.fit(X, np.full(25, 5.0))
    with pytest.raises(InputError, match=r"log_density: got .* standardised labels up to"):
        est.log_density(X_target, [5.0, 5 + 1e15, 5, 5, 5, 5])
    est.fit(X, np.tile([1.5e308, -1.5e308], 13)[:25])
    with pytest.raises(InputError, match=r"sample: got .*inf at sample .* overflows float64"):
        est.sample(X_target, 200, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("n_samples", [True, 2.0, None, "3", 0])
def test_sample_count_must_be_a_positive_int(fitted, n_samples):
    est, X_target = fitted
    with pytest.raises(InputError, match="n_samples: expected a positive int"):
        est.sample(X_target, n_samples)
