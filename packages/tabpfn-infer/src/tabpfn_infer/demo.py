"""`tabpfn-infer demo`: joint sampling and joint density with the checkpoint shipped in the
package, on the diabetes data embedded with it (default), the synthetic task it used to show,
or a user's CSV file; with timings and a plot of sample paths.

The shipped model embeds a row as the mean over its columns of a linear embedding of each
z-normalised feature, so it sees the row's mean feature value: it was trained with 2 features,
and columns that raise the label together suit it. From the diabetes data the demo therefore
takes bmi and s5 (log serum triglycerides), the first two variables Least Angle Regression
selects in Efron et al. (2004), both rising with the label.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tabattn_core.checks import InputError
from tabattn_core.registry import registry
from tabpfn_infer.estimator import ARTabPFNRegressor, table_tensor
from tabpfn_infer.training.train import load_checkpoint

__all__ = [
    "CHECKPOINT",
    "DIABETES",
    "DIABETES_COLUMNS",
    "DemoData",
    "diabetes_dataset",
    "run_demo",
    "split_table",
    "synthetic_dataset",
]

CHECKPOINT = Path(__file__).parent / "data" / "demo_model.pt"
#: 442 patients: age, sex, bmi, bp, s1..s6 (raw units) and progression (the label), last.
DIABETES = Path(__file__).parent / "data" / "diabetes.csv"
DIABETES_COLUMNS = ("bmi", "s5")


@dataclass
class DemoData:
    """One task for the demo: features x_* [N, C] and labels y_* [N] in the data's units.
    plot_x [Nt] places the targets on the plot's x axis; None sorts them by predicted mean."""

    name: str
    columns: tuple[str, ...]
    label: str
    x_context: np.ndarray
    y_context: np.ndarray
    x_target: np.ndarray
    y_target: np.ndarray
    plot_x: np.ndarray | None = None
    plot_xlabel: str = "target rows, sorted by predicted mean"


def synthetic_dataset(seed: int = 0) -> DemoData:
    """A fixed two-feature regression task: y = sin(1.5 x1) + 0.5 x2 + noise (sd 0.1);
    60 context rows at random, 25 target rows along a line through the feature space."""
    rng = np.random.default_rng(seed)
    f = lambda x: np.sin(1.5 * x[:, 0]) + 0.5 * x[:, 1]
    x_context = rng.uniform(-2, 2, size=(60, 2))
    y_context = f(x_context) + 0.1 * rng.normal(size=60)
    t = np.linspace(-2, 2, 25)
    x_target = np.stack([t, 0.5 * t], 1)
    y_target = f(x_target) + 0.1 * rng.normal(size=25)
    return DemoData(
        "synthetic: y = sin(1.5 x1) + 0.5 x2 + noise",
        ("x1", "x2"),
        "y",
        x_context,
        y_context,
        x_target,
        y_target,
        plot_x=t,
        plot_xlabel="x1 along the target line",
    )


def split_table(
    table,
    *,
    name: str,
    columns: tuple[str, ...] | None = None,
    label: str = "y",
    n_context: int = 100,
    n_target: int = 25,
    seed: int = 0,
) -> DemoData:
    """A table [N, C + 1] (features, then the label; array-like of numbers) split at random
    (seeded) into n_target target rows and n_context context rows; a table with fewer rows
    keeps a fifth of them (at least one) as targets and the rest as context. Bad cells are
    named by row and column of the table."""
    values = table_tensor(name, table, 2, torch.float64).numpy()
    n = len(values)
    if n < 2 or values.shape[1] < 2:
        raise InputError(
            f"{name}: expected at least 2 rows and 2 columns (features..., y), "
            f"got {n} x {values.shape[1]}"
        )
    if n < n_context + n_target:
        n_target = max(1, min(n_target, n // 5))
    n_context = min(n_context, n - n_target)
    rows = np.random.default_rng(seed).permutation(n)
    target, context = values[rows[:n_target]], values[rows[n_target : n_target + n_context]]
    return DemoData(
        name,
        columns or tuple(f"x{c + 1}" for c in range(values.shape[1] - 1)),
        label,
        context[:, :-1],
        context[:, -1],
        target[:, :-1],
        target[:, -1],
    )


def diabetes_dataset(*, n_context: int = 100, n_target: int = 25, seed: int = 0) -> DemoData:
    """The diabetes data (Efron et al. 2004; see data/README.md), columns DIABETES_COLUMNS,
    label the disease progression one year after baseline, split by `split_table`."""
    header = DIABETES.read_text().split("\n", 1)[0].split(",")
    table = np.loadtxt(DIABETES, delimiter=",", skiprows=1)
    keep = [header.index(c) for c in DIABETES_COLUMNS] + [len(header) - 1]
    return split_table(
        table[:, keep],
        name="diabetes (Efron et al. 2004)",
        columns=DIABETES_COLUMNS,
        label=header[-1],
        n_context=n_context,
        n_target=n_target,
        seed=seed,
    )


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def run_demo(
    data: DemoData | None = None,
    *,
    n_samples: int = 200,
    device: str = "auto",
    backend: str = "auto",
    out: Path | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Fit the context of `data` (default: `diabetes_dataset(seed=seed)`; the estimator
    z-normalises features and labels with the context's statistics, as the model was trained),
    draw joint samples, evaluate joint and marginal densities of the held-out labels; print a
    summary in the data's units and write a PNG of sample paths (needs matplotlib)."""
    data = data or diabetes_dataset(seed=seed)
    y_target = data.y_target
    est = ARTabPFNRegressor(model=load_checkpoint(CHECKPOINT), backend=backend, device=device)
    est.fit(data.x_context, data.y_context)
    choice = registry.choose(backend, device=est.device_, op="shared_context_attention")
    gen = torch.Generator(device=est.device_).manual_seed(seed)
    samples, t_sample = _timed(lambda: est.sample(data.x_target, n_samples, generator=gen))
    logp, t_density = _timed(lambda: est.log_density(data.x_target, y_target))
    pred, t_pred = _timed(lambda: est.predict(data.x_target, quantiles=(0.05, 0.95)))
    mean, std = pred["mean"].numpy(), pred["std"].numpy()
    lo, hi = pred["quantiles"][:, 0].numpy(), pred["quantiles"][:, 1].numpy()
    marginal = -0.5 * np.log(2 * np.pi * std**2) - 0.5 * ((y_target - mean) / std) ** 2
    summary = {
        "joint_log_density": float(logp.sum()),
        "marginal_gaussian_log_density": float(marginal.sum()),
        "coverage_90": float(((y_target > lo) & (y_target < hi)).mean()),
        "interval_width_90": float((hi - lo).mean()),
        "rmse": float(np.sqrt(((mean - y_target) ** 2).mean())),
        "rmse_context_mean": float(np.sqrt(((data.y_context.mean() - y_target) ** 2).mean())),
        "sample_seconds": t_sample,
        "density_seconds": t_density,
        "predict_seconds": t_pred,
    }
    print(f"device {est.device_}, attention: {choice.reason}")
    print(f"data: {data.name}; features {', '.join(data.columns)} -> label {data.label}")
    print(
        f"context {len(data.x_context)} rows, targets {len(y_target)}, "
        f"{n_samples} joint sample paths"
    )
    print(f"joint log density of the held-out labels: {summary['joint_log_density']:.2f} nats")
    print(
        f"  (sum of Gaussian-approximated marginals: {summary['marginal_gaussian_log_density']:.2f})"
    )
    print(
        f"90% marginal intervals cover {100 * summary['coverage_90']:.0f}% of the held-out "
        f"labels (mean width {summary['interval_width_90']:.3g} in {data.label}'s units)"
    )
    print(
        f"predicted means: RMSE {summary['rmse']:.3g} "
        f"(predicting the context labels' mean: {summary['rmse_context_mean']:.3g})"
    )
    print(
        f"time: sample {t_sample * 1e3:.1f} ms, density {t_density * 1e3:.1f} ms, predict {t_pred * 1e3:.1f} ms"
    )
    path = out or Path("tabpfn_demo.png")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"plot skipped: matplotlib is not installed (pip install matplotlib to write {path})")
        return summary
    if data.plot_x is None:
        order = np.argsort(mean)
        t = np.arange(len(order))
    else:
        order = np.argsort(data.plot_x)
        t = data.plot_x[order]
    fig, ax = plt.subplots(figsize=(7, 4))
    for path_y in samples[:30, order].numpy():
        ax.plot(t, path_y, color="tab:blue", alpha=0.15, lw=1)
    ax.fill_between(t, lo[order], hi[order], color="tab:orange", alpha=0.2, label="90% marginal")
    ax.scatter(t, y_target[order], color="black", s=12, label="held-out labels", zorder=3)
    ax.set_xlabel(data.plot_xlabel)
    ax.set_ylabel(data.label)
    ax.set_title(f"AR-TabPFN joint sample paths (30 of {n_samples}): {data.name}", fontsize=9)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot of sample paths written to {path}")
    return summary
