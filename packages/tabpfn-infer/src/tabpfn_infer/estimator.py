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

from tabattn_core.checks import InputError, check_positive_int
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


SCALE_FLOOR = 1e-6
"""A column's standardisation scale is at least SCALE_FLOOR times its largest |value| (see
`context_statistics`)."""


def _where(axes: tuple[str, ...], idx: tuple[int, ...]) -> str:
    return ", ".join(f"{axis} {i}" for axis, i in zip(axes, idx, strict=True))


def context_statistics(name: str, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and scale of each column of the context's `values` ([N, C] features or [N]
    labels, float64) for z-normalisation. The scale is the sample standard deviation
    (correction=1, as the training prior normalises), floored at SCALE_FLOOR (1e-6) times the
    column's largest |value|; 1 for a column of zeros or an empty context.

    The floor is relative, not absolute, so that a column's statistics scale with its units
    (labels in nanometres keep their spread; a constant label c and a constant label 1000c
    give log densities that differ by exactly log(1000)). A spread below a millionth of the
    magnitude is at the resolution of float32 data (one rounding is 6e-8 relative), so such a
    column is treated as constant at that resolution: a constant label's density at the
    constant is then bounded, about -log(1e-6 |c|) nats, instead of growing without bound as
    the spread goes to 0 (the former absolute floor 1e-8 gave +18 nats for any c). One
    context row counts as a constant column.

    The statistics are computed on the values divided by their largest magnitude, so values
    near float64's limit (1e200) do not overflow the squares; a scale that still leaves
    float64's range raises `InputError` naming the column."""
    unit = (
        values.abs().amax(0) if len(values) else torch.zeros(values.shape[1:], dtype=values.dtype)
    )
    zero = unit == 0
    unit = torch.where(zero, 1.0, unit)
    v = values / unit
    mean = (v.mean(0) if len(v) else torch.zeros_like(unit)) * unit
    spread = v.std(0) if len(v) > 1 else torch.zeros_like(unit)
    scale = torch.where(zero, 1.0, spread.clamp(min=SCALE_FLOOR) * unit)
    bad = ~torch.isfinite(scale) | (scale == 0)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0]) if bad.dim() else ()
        col = f" column {idx[0]}" if idx else ""
        what = "overflows" if bool(~torch.isfinite(scale[idx])) else "underflows to 0"
        raise InputError(
            f"{name}{col}: the standardisation scale (standard deviation "
            f"{float(spread[idx]):.3g} x largest |value| {float(unit[idx]):.3g}) {what} in float64"
        )
    return mean, scale


def standardise(
    name: str,
    values: torch.Tensor,
    mean: torch.Tensor,
    scale: torch.Tensor,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """(values - mean) / scale in `dtype` on `device`; a value whose standardised form is not
    finite there raises `InputError` naming its column (for features) and row, and why."""
    z = (values - mean) / scale
    out = z.to(dtype)
    bad = ~torch.isfinite(out)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        col = idx[1:]
        m, s, v = float(mean[col]), float(scale[col]), float(values[idx])
        where = f" column {col[0]}, row {idx[0]}" if col else f" row {idx[0]}"
        if torch.isfinite(z[idx]):
            cause = f"{float(z[idx]):.3g} scales from the context's mean, beyond {dtype}'s range"
        else:
            cause = "the standardisation overflows float64"
        raise InputError(
            f"{name}{where}: {v:.6g} standardises (mean {m:.6g}, scale {s:.3g}) to "
            f"{out[idx].item()}: {cause}"
        )
    return out.to(device)


def check_result(name: str, result: torch.Tensor, axes: tuple[str, ...], cause: str) -> None:
    """Raise `InputError` naming the first NaN/inf of a result and its cause."""
    bad = ~torch.isfinite(result)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise InputError(f"{name}: got {result[idx].item()} at {_where(axes, idx)}: {cause}")


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

    def x(self, name: str, X: torch.Tensor) -> torch.Tensor:
        return standardise(name, X, self.x_mean, self.x_std, self.dtype, self.device)

    def y(self, name: str, y: torch.Tensor) -> torch.Tensor:
        return standardise(name, y, self.y_mean, self.y_std, self.dtype, self.device)

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
        x_mean, x_std = context_statistics("X_context", X)
        y_mean, y_std = context_statistics("y_context", y)
        device = resolve_device(self.device)
        model = copy.deepcopy(self.model).to(device, self.dtype).eval()
        predictor = ARTabPFNPredictor(
            model,
            backend=self.backend,
            context_top_k=self.context_top_k,
            context_block_size=self.context_block_size,
        )
        empty = torch.empty(0)
        state = _Fitted(
            device, self.dtype, model, predictor, x_mean, x_std, y_mean, y_std, empty, empty
        )
        self._fitted = dataclasses.replace(
            state, X_context=state.x("X_context", X), y_context=state.y("y_context", y)
        )
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
        return state.x("X_target", X)

    def sample(
        self, X_target, n_samples: int, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Joint samples of the targets' labels, in order: [n_samples, Nt] (data units).
        The context K/V is computed once and shared by the n_samples paths."""
        state = self._state()
        X = self._targets(state, X_target)
        n_samples = check_positive_int("n_samples", n_samples)
        xc, yc = state.context(n_samples)
        z = state.predictor.sample_sequence(
            xc, yc, X.expand(n_samples, *X.shape), generator=generator
        )
        z = z.double().cpu()
        check_result("sample", z, ("sample", "target"), "the model's standardised sample")
        out = z * state.y_std + state.y_mean
        scale = f"{float(state.y_std):.3g}, mean {float(state.y_mean):.3g}"
        check_result(
            "sample", out, ("sample", "target"), f"overflows float64 in data units (scale {scale})"
        )
        return out

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
        z = state.y("y_target", y)
        logp = state.predictor.evaluate_joint_density(xc, yc, X[None], z[None])[0]
        logp = logp.double().cpu()
        zmax = float(z.abs().max()) if len(z) else 0.0
        check_result(
            "log_density",
            logp,
            ("target",),
            f"the model's log density in {state.dtype}, given standardised labels up to "
            f"{zmax:.3g} in magnitude (labels this far from the context's leave its range)",
        )
        return logp - torch.log(state.y_std)

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
        out = {
            "mean": m * state.y_std + state.y_mean,
            "std": var.sqrt() * state.y_std,
            "quantiles": q * state.y_std + state.y_mean,
        }
        scale = f"{float(state.y_std):.3g}, mean {float(state.y_mean):.3g}"
        for key, value in out.items():
            axes = ("target", "quantile")[: value.dim()]
            check_result(
                f"predict {key}", value, axes, f"the model's marginal in data units (scale {scale})"
            )
        return out
