"""An estimator face over `ARTabPFNPredictor` for people who think in datasets: fit a
context, then draw joint samples, evaluate joint densities or read marginal predictions for
target rows, in the data's own units."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tabattn_core.checks import InputError
from tabattn_core.gmm import gmm_mean_var, gmm_quantile
from tabpfn_infer.model import ARTabPFN
from tabpfn_infer.predictor import ARTabPFNPredictor, check_finite
from tabpfn_infer.training.train import resolve_device

__all__ = ["ARTabPFNRegressor", "table_tensor"]


def table_tensor(name: str, value: object, ndim: int, dtype: torch.dtype) -> torch.Tensor:
    """An array-like of numbers as a tensor; non-numbers and NaN/inf are rejected naming the
    first bad cell by row (and column)."""
    axes = ("row", "column")[:ndim]
    arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if arr.ndim != ndim:
        want = "[rows, columns]" if ndim == 2 else "[rows]"
        raise InputError(f"{name}: expected {ndim} dims {want}, got shape {list(arr.shape)}")
    if arr.dtype.kind not in "fiu":
        for idx in np.ndindex(arr.shape):
            try:
                float(arr[idx])
            except (TypeError, ValueError):
                at = ", ".join(f"{axis} {i}" for axis, i in zip(axes, idx, strict=True))
                raise InputError(
                    f"{name}: expected numbers, got {str(arr[idx])!r} at {at}"
                ) from None
    t = torch.from_numpy(arr.astype(np.float64))
    check_finite(name, t, axes)
    return t.to(dtype)


@dataclass(frozen=True)
class _Fitted:
    """One fit's state, built completely before it replaces the previous one: the estimator's
    private copy of the model (converted to the device and dtype), its predictor, the
    context's standardisation statistics (float64, CPU) and the standardised context."""

    device: torch.device
    dtype: torch.dtype
    model: ARTabPFN
    predictor: ARTabPFNPredictor
    x_mean: torch.Tensor
    x_std: torch.Tensor
    y_mean: torch.Tensor
    y_std: torch.Tensor
    X_context: torch.Tensor
    y_context: torch.Tensor

    def x(self, X: torch.Tensor) -> torch.Tensor:
        return ((X - self.x_mean) / self.x_std).to(self.device, self.dtype)

    def y(self, y: torch.Tensor) -> torch.Tensor:
        return ((y - self.y_mean) / self.y_std).to(self.device, self.dtype)

    def context(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            self.X_context.expand(batch, *self.X_context.shape),
            self.y_context.expand(batch, *self.y_context.shape),
        )


class ARTabPFNRegressor:
    """Joint predictions for one dataset: `fit(X, y)` stores the context (features and labels
    z-normalised with its statistics, as the model was trained), then `sample`,
    `log_density` and `predict` work on target rows.

    model: a trained `ARTabPFN`; backend: the attention backend ("auto", "torch", "triton");
    device: "auto" (CUDA when present), "cpu", "cuda", ...; dtype: the model's compute dtype.
    context_top_k, context_block_size: target rows attend to their top-k context blocks of
    that many rows (selection attention, for very large contexts); None (default) is exact.
    See `ARTabPFNPredictor`.

    `fit` leaves its arguments alone: it converts a private copy of `model` (the caller's
    model keeps its device, dtype, values and training mode, so estimators may share one
    model), and copies X and y. A refit builds the new state completely, then replaces the
    old one in one assignment; each of `sample`, `log_density` and `predict` reads the state
    once, so a call running during a refit (in another thread) uses the old fit or the new
    one entirely, never a mixture.
    """

    def __init__(
        self,
        *,
        model: ARTabPFN,
        backend: str = "auto",
        device: str | torch.device = "auto",
        dtype: torch.dtype = torch.float32,
        context_top_k: int | None = None,
        context_block_size: int = 64,
    ):
        self.model = model
        self.backend = backend
        self.device = device
        self.dtype = dtype
        self.context_top_k = context_top_k
        self.context_block_size = context_block_size
        self._fitted: _Fitted | None = None

    def fit(self, X_context, y_context) -> ARTabPFNRegressor:
        """X_context [N, C], y_context [N] (array-likes or tensors, finite)."""
        X = table_tensor("X_context", X_context, 2, torch.float64)
        y = table_tensor("y_context", y_context, 1, torch.float64)
        if y.shape[0] != X.shape[0]:
            raise InputError(
                f"y_context: expected {X.shape[0]} rows (as X_context), got {y.shape[0]}"
            )
        if X.shape[1] == 0:
            raise InputError("X_context: expected at least one column, got 0")
        device = resolve_device(self.device)
        model = copy.deepcopy(self.model).to(device, self.dtype).eval()
        predictor = ARTabPFNPredictor(
            model,
            backend=self.backend,
            context_top_k=self.context_top_k,
            context_block_size=self.context_block_size,
        )
        ones = torch.ones(X.shape[1], dtype=torch.float64)
        x_mean = X.mean(0) if len(X) else torch.zeros_like(ones)
        # Sample standard deviations (correction=1), as the training prior normalises.
        x_std = X.std(0).clamp(min=1e-8) if len(X) > 1 else ones
        y_mean = y.mean() if len(y) else torch.zeros((), dtype=torch.float64)
        y_std = y.std().clamp(min=1e-8) if len(y) > 1 else torch.ones((), dtype=torch.float64)
        empty = torch.empty(0)
        state = _Fitted(
            device, self.dtype, model, predictor, x_mean, x_std, y_mean, y_std, empty, empty
        )
        self._fitted = dataclasses.replace(state, X_context=state.x(X), y_context=state.y(y))
        return self

    def _state(self) -> _Fitted:
        state = self._fitted
        if state is None:
            raise InputError("ARTabPFNRegressor: call fit(X_context, y_context) first")
        return state

    # The fitted attributes, read from the current state.
    device_ = property(lambda self: self._state().device)
    model_ = property(lambda self: self._state().model)
    predictor_ = property(lambda self: self._state().predictor)
    n_features_in_ = property(lambda self: self._state().X_context.shape[1])
    x_mean_ = property(lambda self: self._state().x_mean)
    x_std_ = property(lambda self: self._state().x_std)
    y_mean_ = property(lambda self: self._state().y_mean)
    y_std_ = property(lambda self: self._state().y_std)
    X_context_ = property(lambda self: self._state().X_context)
    y_context_ = property(lambda self: self._state().y_context)

    def _targets(self, state: _Fitted, X_target) -> torch.Tensor:
        X = table_tensor("X_target", X_target, 2, torch.float64)
        n_features = state.X_context.shape[1]
        if X.shape[1] != n_features:
            raise InputError(
                f"X_target: expected {n_features} columns (as X_context), got {X.shape[1]}"
            )
        return state.x(X)

    def sample(
        self, X_target, n_samples: int, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Joint samples of the targets' labels, in order: [n_samples, Nt] (data units).
        The context K/V is computed once and shared by the n_samples paths."""
        state = self._state()
        X = self._targets(state, X_target)
        if int(n_samples) != n_samples or n_samples < 1:
            raise InputError(f"n_samples: expected a positive int, got {n_samples!r}")
        xc, yc = state.context(n_samples)
        z = state.predictor.sample_sequence(
            xc, yc, X.expand(n_samples, *X.shape), generator=generator
        )
        return z.double().cpu() * state.y_std + state.y_mean

    def log_density(self, X_target, y_target) -> torch.Tensor:
        """Per-target conditionals log p(y_t | context, y_0..y_{t-1}) [Nt] in data units;
        the joint log density is their sum."""
        state = self._state()
        X = self._targets(state, X_target)
        y = table_tensor("y_target", y_target, 1, torch.float64)
        if y.shape[0] != X.shape[0]:
            raise InputError(
                f"y_target: expected {X.shape[0]} rows (as X_target), got {y.shape[0]}"
            )
        xc, yc = state.context(1)
        logp = state.predictor.evaluate_joint_density(xc, yc, X[None], state.y(y)[None])[0]
        return logp.double().cpu() - torch.log(state.y_std)

    def predict(
        self, X_target, *, quantiles: Sequence[float] = (0.05, 0.5, 0.95)
    ) -> dict[str, torch.Tensor]:
        """Marginal predictions p(y_t | context) per target row: {"mean" [Nt], "std" [Nt],
        "quantiles" [Nt, len(quantiles)]} in data units."""
        state = self._state()
        X = self._targets(state, X_target)
        xc, yc = state.context(1)
        log_w, mean, std = (
            t[0].double().cpu() for t in state.predictor.marginal_mixture(xc, yc, X[None])
        )
        m, var = gmm_mean_var(log_w, mean, std)
        q = gmm_quantile(torch.tensor(list(quantiles), dtype=torch.float64), log_w, mean, std)
        return {
            "mean": m * state.y_std + state.y_mean,
            "std": var.sqrt() * state.y_std,
            "quantiles": q * state.y_std + state.y_mean,
        }
