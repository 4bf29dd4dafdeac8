"""The `predictor` suite's model, calls and correctness check.

The model: `ARTabPFN()` (or the smoke run's tiny one) with random weights from MODEL_SEED,
built once on the CPU and copied per dtype and device. A call: `sample_sequence` (a fresh
generator with SAMPLE_SEED every call, so every call does the same work) or
`evaluate_joint_density` on the case's data.

The check compares one number per call: error / bound (expected 0, bound 1), so the
`max rel err` column reads as the fraction of the bound; the provider's run record holds
the measured value and bound (`check`).
- density: max |log p - fp64| in nats over the first CHECK_ROWS rows, where fp64 is the
  torch backend run in float64 (same weights, same inputs). float32: bound 5e-3 nats (dots
  may run in TF32). bfloat16: FA3's rule, the bound is 2x the error of the torch backend
  run in bfloat16 on the same rows, + 1e-2 (as test_gpu_golden_joint_density).
- sample: shape [B, Nt] and finite; `triton-graph` in float32 also within 1e-3 of the
  `triton` backend's eager samples with the same generator seed (computed when first
  needed). The torch backend's samples are not compared with the kernels' (its rounding
  differs, so a mixture component choice may flip).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from bench.harness import Check, Inputs, RunConfig

SAMPLE, DENSITY = "sample", "density"
SMOKE_MODEL = {
    "d_model": 32,
    "n_heads": 2,
    "n_layers": 2,
    "d_ff": 48,
    "buffer_size": 3,
    "num_components": 3,
}
MODEL_SEED, SAMPLE_SEED = 0, 1234
CHECK_ROWS = 4  # density: rows compared with the fp64 run
FLOAT32_DENSITY_NATS = 5e-3
BF16_SLACK_NATS = 1e-2
GRAPH_SAMPLE_TOL = 1e-3  # triton-graph vs triton eager samples, float32


@functools.cache
def master(tiny: bool):
    """The float32 model on the CPU, built from MODEL_SEED (random weights)."""
    from tabpfn_infer.model import ARTabPFN

    torch.manual_seed(MODEL_SEED)
    return ARTabPFN(**(SMOKE_MODEL if tiny else {})).eval()


@functools.cache
def model(tiny: bool, dtype: torch.dtype, device: torch.device):
    return copy.deepcopy(master(tiny)).to(device=device, dtype=dtype)


def dtype_of(case: dict[str, Any]) -> torch.dtype:
    return getattr(torch, case["dtype"])


def call(case: dict[str, Any], inputs: Inputs, predictor) -> Callable[[], torch.Tensor]:
    """The case's call of `predictor` on its data."""
    d = inputs.extra["data"]
    xc, yc, xt, yt = d["x_context"], d["y_context"], d["x_target"], d["y_target"]
    if case["mode"] == DENSITY:
        return lambda: predictor.evaluate_joint_density(xc, yc, xt, yt)
    device = xt.device

    def sample() -> torch.Tensor:
        gen = torch.Generator(device=device).manual_seed(SAMPLE_SEED)
        return predictor.sample_sequence(xc, yc, xt, generator=gen)

    return sample


@dataclass
class Run:
    """One provider on one case: host-clock ms per call, and its correctness check."""

    provider: str
    ms: list[float] = field(default_factory=list)
    check: dict[str, Any] = field(default_factory=dict)


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _density_reference(case: dict[str, Any], inputs: Inputs, cfg: RunConfig):
    """(rows, their fp64 densities, the bound): the torch backend in float64 on the first
    CHECK_ROWS rows, and the bound in nats with its rule."""
    from tabpfn_infer.predictor import ARTabPFNPredictor

    rows = min(CHECK_ROWS, case["B"])
    first = {k: t[:rows] for k, t in inputs.extra["data"].items()}

    def densities(dtype: torch.dtype) -> torch.Tensor:
        m = model(case["tiny"], dtype, cfg.device)
        return ARTabPFNPredictor(m, backend="torch").evaluate_joint_density(
            *(first[k].to(dtype) for k in ("x_context", "y_context", "x_target", "y_target"))
        )

    exact = densities(torch.float64)
    if dtype_of(case) == torch.float32:
        bound = {"rule": "max |log p - fp64| <= 5e-3 nats", "bound": FLOAT32_DENSITY_NATS}
    else:
        torch_error = _max_abs(densities(dtype_of(case)), exact)
        bound = {
            "rule": "max |log p - fp64| <= 2 x the torch backend's at this dtype + 1e-2 nats",
            "bound": 2 * torch_error + BF16_SLACK_NATS,
            "torch_error": torch_error,
        }
    return rows, exact, bound


def _eager_samples(case: dict[str, Any], inputs: Inputs, cfg: RunConfig) -> torch.Tensor:
    """The triton backend's eager samples (same seed), computed once per case."""
    if "eager_samples" not in inputs.extra:
        from tabpfn_infer.predictor import ARTabPFNPredictor

        m = model(case["tiny"], dtype_of(case), cfg.device)
        eager = ARTabPFNPredictor(m, backend="triton", cuda_graph=False)
        inputs.extra["eager_samples"] = call(case, inputs, eager)()
    return inputs.extra["eager_samples"]


def _verdict(case: dict[str, Any], inputs: Inputs, density: tuple | None):
    """Check.select: the output of the provider that ran last -> [error / bound] (fp64; inf
    for a wrong shape or a non-finite value); records the measured value on its Run."""
    cfg: RunConfig = inputs.extra["cfg"]

    def select(got: torch.Tensor) -> torch.Tensor:
        run: Run = inputs.extra["last_run"]
        shape = (case["B"], case["Nt"])
        if tuple(got.shape) != shape or not bool(torch.isfinite(got).all()):
            run.check = {"rule": f"shape {list(shape)} and finite", "measured": float("inf")}
            return torch.full((1,), float("inf"), dtype=torch.float64)
        if density is not None:
            rows, exact, bound = density
            measured = _max_abs(got[:rows], exact)
        elif run.provider == "triton-graph" and dtype_of(case) == torch.float32:
            measured = _max_abs(got, _eager_samples(case, inputs, cfg))
            bound = {
                "rule": "finite; max |sample - triton eager sample| <= 1e-3",
                "bound": GRAPH_SAMPLE_TOL,
            }
        else:
            run.check = {"rule": f"shape {list(shape)} and finite", "measured": 0.0}
            return torch.zeros(1, dtype=torch.float64)
        run.check = {**bound, "measured": measured}
        return torch.tensor([measured / bound["bound"]], dtype=torch.float64)

    return select


def reference(case: dict[str, Any], inputs: Inputs, mode: str, cfg: RunConfig) -> dict[str, Check]:
    """The check of whichever provider ran last (`inputs.extra["last_run"]`)."""
    density = _density_reference(case, inputs, cfg) if mode == DENSITY else None
    return {"out": Check(torch.zeros(1, dtype=torch.float64), _verdict(case, inputs, density))}
