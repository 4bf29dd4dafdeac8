"""Studies: one-off investigations, each run as `python -m bench.studies.<name>`, whose
conclusion is recorded in its module docstring (with the committed result it came from).

| study | question | result |
|---|---|---|
| `sm90_fwd_configs` | which sm90 forward config is fastest at the context-target shapes | `bench/results/sm90_fwd_configs.json` |
| `selection_crossover` | where dense attention beats the selection (the path rules) | `bench/results/selection_crossover.json` |
| `selection_floor` | what gathering the selected K/V alone costs | `bench/results/selection_floor.json` |
| `selection_predictor_accuracy` | how far the predictor's top-k context is from dense | `bench/results/selection_predictor_accuracy.json` |
| `training_loss_curve` | do the Triton and FP8 models train as the baseline does | `bench/results/training_loss_curve.json` |
| `training_ddp` | data-parallel scaling under torchrun | `bench/results/training_ddp.json` |
| `fp8_emulated_accuracy` | the FP8 reference's error on the CPU, rotation on and off | printed |

They time through the harness's timer (`bench.harness.median_ms`), check before they time,
write their header with `bench.harness.study_header` and share the command line below
(`study_main`).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.harness import RunConfig, resolve_device


def study_config(
    module: str,
    argv: Sequence[str] | None,
    *,
    doc: str,
    device: str = "auto",
    smoke_reps: int | None = None,
    options: Callable[[argparse.ArgumentParser], None] | None = None,
) -> tuple[argparse.Namespace, RunConfig]:
    """The command line every study shares, `python -m <module> [--out DIR] [--smoke]
    [--seed N] [--device auto|cuda|cpu]` plus the study's own `options(parser)`: the parsed
    arguments and the RunConfig. `doc` is the module docstring (its first line describes the
    command); `device` the default of --device (auto: CUDA when available, except the CPU
    for --smoke); `smoke_reps` the timer's CPU calls under --smoke (cfg.reps)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench/out"), help="output folder")
    p.add_argument("--smoke", action="store_true", help="tiny shapes: the machinery, not speed")
    p.add_argument("--seed", type=int, default=0, help="input seed (default 0)")
    p.add_argument(
        "--device",
        choices=("auto", "cuda", "cpu"),
        default=device,
        help=f"auto: CUDA when available, except the CPU for --smoke (default: {device})",
    )
    if options is not None:
        options(p)
    args = p.parse_args(argv)
    try:
        resolved = resolve_device(args.device, args.smoke)
    except ValueError as exc:
        p.error(str(exc))
    cfg = RunConfig(
        device=resolved,
        smoke=args.smoke,
        seed=args.seed,
        reps=smoke_reps if args.smoke else None,
        command=shlex.join(["python", "-m", module, *argv]),
    )
    return args, cfg


def study_main(
    module: str,
    argv: Sequence[str] | None,
    run: Callable[[argparse.Namespace, RunConfig], Sequence[Path]],
    **config: Any,
) -> int:
    """A study's `main`: `run(args, cfg)` with `study_config(module, argv, **config)`'s
    arguments; it measures and prints its summary, and returns the files it wrote, which
    are named last. Exit status 0."""
    args, cfg = study_config(module, argv, **config)
    for path in run(args, cfg):
        print(f"wrote {path}")
    return 0


def print_runs(runs: dict[str, dict[str, Any]], summary: Callable[[dict[str, Any]], str]) -> None:
    """One line per run of a study that trains (status "ok", "skipped" or "error"):
    `summary(run)` for the runs that finished, else the status and the reason."""
    for name, run in runs.items():
        done = run["status"] == "ok"
        print(f"{name}: " + (summary(run) if done else f"{run['status']}: {run['reason']}"))
