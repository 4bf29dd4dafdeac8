"""Study: data-parallel scaling of TNP training under torchrun.

`python -m bench.studies.training_ddp [--worlds 1,2] [--steps 40] [--variants
sdpa,all-triton] [--out DIR] [--smoke]` trains the `training` suite's `sdpa` and
`all-triton` variants at the mid shape (B=4 tasks per rank, M=10000, N=1000; smoke: the
tiny model and shape on CPU, gloo) under `torchrun --standalone` (DDP, NCCL on GPUs) on
each number of ranks and writes training_ddp.json and .png (`ddp_scaling`). Each rank runs
`python -m bench.studies.training_ddp --worker VARIANT`.

Conclusion (two H200s, commit 6889910, `bench/results/training_ddp.json`): eager DDP
scales with the ranks: sdpa 276k -> 540k tokens/s (efficiency 0.98), all-triton 225k -> 451k
(1.00). A captured (CUDA-graph) step under DDP failed on two GPUs, so `train_tnp` refuses
that combination and runs DDP steps eagerly.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from bench.harness import RunConfig, study_header, write_json
from bench.plot import plot_lines
from bench.studies import print_runs, study_main
from bench.suites import training
from bench.suites.training import ALL, CASES, LR, SMOKE_CASES, Variant

DDP_VARIANTS = (Variant(()), Variant(ALL))
DDP_LOG_EVERY = 10
DDP_TIMEOUT_S = 1800  # per torchrun run (a hung process group fails the run, not the bench)


def ddp_scaling(
    cfg: RunConfig,
    *,
    worlds: tuple[int, ...],
    steps: int,
    out: Path,
    variants: tuple[str, ...] = tuple(v.name for v in DDP_VARIANTS),
) -> dict[str, Any]:
    """Tokens/s of eager training (`tabpfn_infer.training.train_tnp`) of `variants` (of
    `sdpa`, `all-triton`) at the mid shape (smoke: the tiny model and shape on CPU, gloo) on
    each number of ranks in `worlds`, each a `torchrun --standalone` run (DDP, NCCL on
    GPUs). Every rank trains B tasks per step (weak scaling), so tokens/s = world * B *
    (M + N) / step time. Per run: the log rows every DDP_LOG_EVERY steps (tokens/s over the
    window since the previous row, data sampling included); `tokens_per_s` is the median of
    the rows after the first (which holds warm-up and autotuning), `efficiency` tokens/s /
    (world * one rank's). Writes training_ddp.json and .png under `out`."""
    case = training.case_of(*(SMOKE_CASES[0] if cfg.smoke else CASES[1]), tiny=cfg.smoke)
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, Any] = {}
    for variant in (v for v in DDP_VARIANTS if v.name in variants):
        for world in worlds:
            log_path = out / f"ddp_log_{variant.name}_{world}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={world}", "-m", "bench.studies.training_ddp",
                   "--worker", variant.name, "--steps", str(steps), "--rows-out", str(log_path)]  # fmt: skip
            if cfg.smoke:
                cmd.append("--smoke")
            start = time.perf_counter()
            key = f"{variant.name} x{world}"
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=DDP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                runs[key] = {"status": "error", "reason": f"no result in {DDP_TIMEOUT_S} s"}
                continue
            if done.returncode != 0:
                runs[key] = {"status": "error", "reason": done.stderr[-2000:]}
                continue
            log = json.loads(log_path.read_text())
            log_path.unlink()
            runs[key] = {"status": "ok", "variant": variant.name, "world": world,
                         "seconds": time.perf_counter() - start, "log": log,
                         "tokens_per_s": statistics.median(r["tokens_per_s"] for r in log[1:])}  # fmt: skip
        one = runs.get(f"{variant.name} x{worlds[0]}", {})
        for world in worlds:
            run = runs[f"{variant.name} x{world}"]
            if run["status"] == "ok" and one.get("status") == "ok":
                run["efficiency"] = run["tokens_per_s"] / (world / worlds[0] * one["tokens_per_s"])
    header = study_header(
        "training_ddp", cfg, dtype=str(training.dtype(cfg)).removeprefix("torch."), case=case,
        steps=steps, worlds=list(worlds), log_every=DDP_LOG_EVERY,
        gpus_visible=torch.cuda.device_count(),
    )  # fmt: skip
    result = {"header": header, "runs": runs}
    write_json(out / "training_ddp.json", result)
    _plot(result, out / "training_ddp.png")
    return result


def ddp_worker(variant_name: str, *, steps: int, log: Path, smoke: bool) -> None:
    """One torchrun rank of `ddp_scaling`: train `variant_name` at its case; rank 0 writes
    its log rows to `log`."""
    from tabpfn_infer.training.train_tnp import TNPTrainConfig, train_tnp

    variant = {v.name: v for v in DDP_VARIANTS}[variant_name]
    _, b, m, n = SMOKE_CASES[0] if smoke else CASES[1]
    train = TNPTrainConfig(
        model=replace(training.model_config(smoke), **variant.backends()), batch=b,
        num_context=m, num_target=n, steps=steps, lr=LR, warmup=1, log_every=DDP_LOG_EVERY,
        device="cpu" if smoke else "cuda",
    )  # fmt: skip
    _, rows = train_tnp(train, progress=False)
    if rows:  # rank 0
        log.write_text(json.dumps(rows))


def _plot(result: dict[str, Any], path: Path) -> None:
    h, c = result["header"], result["header"]["case"]
    ok = [r for r in result["runs"].values() if r["status"] == "ok"]

    def draw(ax) -> None:
        for variant in dict.fromkeys(r["variant"] for r in ok):
            mine = [r for r in ok if r["variant"] == variant]
            ax.plot([r["world"] for r in mine], [r["tokens_per_s"] for r in mine], "o-",
                    label=variant)  # fmt: skip
        ax.set_xticks(h["worlds"])

    title = f"TNP training, DDP, B{c['B']} M{c['M']} N{c['N']} per rank"
    plot_lines(path, draw, h, title, size=(6, 4), xlabel="GPUs (DDP ranks)",
               ylabel="tokens/s (all ranks)")  # fmt: skip


def _measure(args, cfg: RunConfig) -> list[Path]:
    if args.worker:
        ddp_worker(args.worker, steps=args.steps, log=args.rows_out, smoke=args.smoke)
        return []
    worlds = tuple(int(w) for w in args.worlds.split(","))
    result = ddp_scaling(cfg, worlds=worlds, steps=args.steps, out=args.out,
                         variants=tuple(args.variants.split(",")))  # fmt: skip
    print_runs(result["runs"], lambda run: f"{run['tokens_per_s']:.4g} tokens/s, efficiency "
               f"{run.get('efficiency', float('nan')):.3f}")  # fmt: skip
    return [args.out / "training_ddp.json", args.out / "training_ddp.png"]


def main(argv: list[str] | None = None) -> int:
    def options(p) -> None:
        p.add_argument("--steps", type=int, default=40, help="training steps (default 40)")
        p.add_argument("--worlds", default="1,2", help="numbers of ranks (default 1,2)")
        p.add_argument("--variants", default="sdpa,all-triton", help="variants to train")
        p.add_argument("--worker", metavar="VARIANT", help="run as one torchrun rank")
        p.add_argument("--rows-out", type=Path, help="--worker: where rank 0 writes its log")

    return study_main("bench.studies.training_ddp", argv, _measure, doc=__doc__, options=options)


if __name__ == "__main__":
    raise SystemExit(main())
