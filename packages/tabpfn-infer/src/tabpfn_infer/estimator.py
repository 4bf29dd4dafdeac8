"""An estimator face over `ARTabPFNPredictor` for people who think in datasets: fit a
context, then draw joint samples, evaluate joint densities or read marginal predictions for
target rows, in the data's own units."""

from __future__ import annotations

from collections.abc import Sequence

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


class ARTabPFNRegressor:
    """Joint predictions for one dataset: `fit(X, y)` stores the context (features and labels
    z-normalised with its statistics, as the model was trained), then `sample`,
    `log_density` and `predict` work on target rows.

    model: a trained `ARTabPFN`; backend: the attention backend ("auto", "torch", "triton");
    device: "auto" (CUDA when present), "cpu", "cuda", ...; dtype: the model's compute dtype.
    context_top_k, context_block_size: target rows attend to their top-k context blocks of
    that many rows (selection attention, for very large contexts); None (default) is exact.
    See `ARTabPFNPredictor`.
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

    def _device(self) -> torch.device:
        return resolve_device(self.device)

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
        self.device_ = self._device()
        self.model_ = self.model.to(self.device_, self.dtype).eval()
        self.predictor_ = ARTabPFNPredictor(
            self.model_,
            backend=self.backend,
            context_top_k=self.context_top_k,
            context_block_size=self.context_block_size,
        )
        self.n_features_in_ = X.shape[1]
        ones = torch.ones(X.shape[1], dtype=torch.float64)
        self.x_mean_ = X.mean(0) if len(X) else torch.zeros_like(ones)
        # Sample standard deviations (correction=1), as the training prior normalises.
        self.x_std_ = X.std(0).clamp(min=1e-8) if len(X) > 1 else ones
        self.y_mean_ = y.mean() if len(y) else torch.zeros((), dtype=torch.float64)
        self.y_std_ = y.std().clamp(min=1e-8) if len(y) > 1 else torch.ones((), dtype=torch.float64)
        self.X_context_ = self._x(X)
        self.y_context_ = self._y(y)
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "predictor_"):
            raise InputError("ARTabPFNRegressor: call fit(X_context, y_context) first")

    def _x(self, X: torch.Tensor) -> torch.Tensor:
        return ((X - self.x_mean_) / self.x_std_).to(self.device_, self.dtype)

    def _y(self, y: torch.Tensor) -> torch.Tensor:
        return ((y - self.y_mean_) / self.y_std_).to(self.device_, self.dtype)

    def _targets(self, X_target) -> torch.Tensor:
        self._check_fitted()
        X = table_tensor("X_target", X_target, 2, torch.float64)
        if X.shape[1] != self.n_features_in_:
            raise InputError(
                f"X_target: expected {self.n_features_in_} columns (as X_context), got {X.shape[1]}"
            )
        return self._x(X)

    def _context(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            self.X_context_.expand(batch, *self.X_context_.shape),
            self.y_context_.expand(batch, *self.y_context_.shape),
        )

    def sample(
        self, X_target, n_samples: int, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Joint samples of the targets' labels, in order: [n_samples, Nt] (data units).
        The context K/V is computed once and shared by the n_samples paths."""
        X = self._targets(X_target)
        if int(n_samples) != n_samples or n_samples < 1:
            raise InputError(f"n_samples: expected a positive int, got {n_samples!r}")
        xc, yc = self._context(n_samples)
        z = self.predictor_.sample_sequence(
            xc, yc, X.expand(n_samples, *X.shape), generator=generator
        )
        return z.double().cpu() * self.y_std_ + self.y_mean_

    def log_density(self, X_target, y_target) -> torch.Tensor:
        """Per-target conditionals log p(y_t | context, y_0..y_{t-1}) [Nt] in data units;
        the joint log density is their sum."""
        X = self._targets(X_target)
        y = table_tensor("y_target", y_target, 1, torch.float64)
        if y.shape[0] != X.shape[0]:
            raise InputError(
                f"y_target: expected {X.shape[0]} rows (as X_target), got {y.shape[0]}"
            )
        xc, yc = self._context(1)
        logp = self.predictor_.evaluate_joint_density(xc, yc, X[None], self._y(y)[None])[0]
        return logp.double().cpu() - torch.log(self.y_std_)

    def predict(
        self, X_target, *, quantiles: Sequence[float] = (0.05, 0.5, 0.95)
    ) -> dict[str, torch.Tensor]:
        """Marginal predictions p(y_t | context) per target row: {"mean" [Nt], "std" [Nt],
        "quantiles" [Nt, len(quantiles)]} in data units."""
        X = self._targets(X_target)
        xc, yc = self._context(1)
        log_w, mean, std = (
            t[0].double().cpu() for t in self.predictor_.marginal_mixture(xc, yc, X[None])
        )
        m, var = gmm_mean_var(log_w, mean, std)
        q = gmm_quantile(torch.tensor(list(quantiles), dtype=torch.float64), log_w, mean, std)
        return {
            "mean": m * self.y_std_ + self.y_mean_,
            "std": var.sqrt() * self.y_std_,
            "quantiles": q * self.y_std_ + self.y_mean_,
        }
