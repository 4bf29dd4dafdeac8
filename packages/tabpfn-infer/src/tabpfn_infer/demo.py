"""`tabpfn-infer demo`: joint sampling and joint density on an embedded default dataset with
the checkpoint shipped in the package, with timings and a plot of sample paths."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from tabattn_core.registry import registry
from tabpfn_infer.estimator import ARTabPFNRegressor
from tabpfn_infer.train import load_checkpoint

__all__ = ["CHECKPOINT", "default_dataset", "run_demo"]

CHECKPOINT = Path(__file__).parent / "data" / "demo_model.pt"


def default_dataset(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A fixed two-feature regression task: y = sin(1.5 x1) + 0.5 x2 + noise (sd 0.1);
    60 context rows at random, 25 target rows along a line through the feature space."""
    rng = np.random.default_rng(seed)
    f = lambda x: np.sin(1.5 * x[:, 0]) + 0.5 * x[:, 1]
    x_context = rng.uniform(-2, 2, size=(60, 2))
    y_context = f(x_context) + 0.1 * rng.normal(size=60)
    t = np.linspace(-2, 2, 25)
    x_target = np.stack([t, 0.5 * t], 1)
    y_target = f(x_target) + 0.1 * rng.normal(size=25)
    return x_context, y_context, x_target, y_target


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def run_demo(
    *,
    n_samples: int = 200,
    device: str = "auto",
    backend: str = "auto",
    out: Path | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Fit the default context, draw joint samples, evaluate joint and marginal densities of
    the held-out labels; print a summary and write a PNG of sample paths (needs matplotlib)."""
    x_context, y_context, x_target, y_target = default_dataset()
    est = ARTabPFNRegressor(model=load_checkpoint(CHECKPOINT), backend=backend, device=device)
    est.fit(x_context, y_context)
    choice = registry.choose(backend, device=est.device_, op="shared_context_attention")
    gen = torch.Generator(device=est.device_).manual_seed(seed)
    samples, t_sample = _timed(lambda: est.sample(x_target, n_samples, generator=gen))
    logp, t_density = _timed(lambda: est.log_density(x_target, y_target))
    pred, t_pred = _timed(lambda: est.predict(x_target, quantiles=(0.05, 0.95)))
    std = pred["std"].numpy()
    marginal = (
        -0.5 * np.log(2 * np.pi * std**2) - 0.5 * ((y_target - pred["mean"].numpy()) / std) ** 2
    )
    inside = float(
        (
            (y_target > pred["quantiles"][:, 0].numpy())
            & (y_target < pred["quantiles"][:, 1].numpy())
        ).mean()
    )
    summary = {
        "joint_log_density": float(logp.sum()),
        "marginal_gaussian_log_density": float(marginal.sum()),
        "coverage_90": inside,
        "sample_seconds": t_sample,
        "density_seconds": t_density,
        "predict_seconds": t_pred,
    }
    print(f"device {est.device_}, attention: {choice.reason}")
    print(f"context {len(x_context)} rows, targets {len(x_target)}, {n_samples} joint sample paths")
    print(f"joint log density of the held-out labels: {summary['joint_log_density']:.2f} nats")
    print(
        f"  (sum of Gaussian-approximated marginals: {summary['marginal_gaussian_log_density']:.2f})"
    )
    print(f"90% marginal intervals cover {100 * inside:.0f}% of the held-out labels")
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
    fig, ax = plt.subplots(figsize=(7, 4))
    t = x_target[:, 0]
    for path_y in samples[:30].numpy():
        ax.plot(t, path_y, color="tab:blue", alpha=0.15, lw=1)
    ax.fill_between(
        t,
        pred["quantiles"][:, 0],
        pred["quantiles"][:, 1],
        color="tab:orange",
        alpha=0.2,
        label="90% marginal",
    )
    ax.scatter(t, y_target, color="black", s=12, label="held-out labels", zorder=3)
    ax.set_xlabel("x1 along the target line")
    ax.set_ylabel("y")
    ax.set_title(f"AR-TabPFN joint sample paths (30 of {n_samples})")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot of sample paths written to {path}")
    return summary
