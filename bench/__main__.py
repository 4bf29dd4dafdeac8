"""`python -m bench <suite> [--out DIR] [--smoke] [--providers a,b] [--reps N] [--graph]`.

Run from the repository root with the packages on PYTHONPATH (see bench/README.md).
Writes <out>/<suite>.json and <out>/<suite>.png and prints a markdown table.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from bench import harness
from bench.plot import plot_result


def _parser(suite_names: list[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="tabattn benchmarks: correctness-checked timings as JSON, PNG and markdown.",
    )
    p.add_argument("suite", choices=[*suite_names, "all"], help="suite to run ('all': every one)")
    p.add_argument("--out", default="bench/out", help="output folder (default: bench/out)")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shapes (fp32 on CPU, bf16 on CUDA): checks the machinery, not performance",
    )
    p.add_argument("--providers", help="comma-separated subset of the suite's providers")
    p.add_argument(
        "--reps",
        type=int,
        help=(
            "timing budget: on CUDA do_bench's rep in ms (default "
            f"{harness.DEFAULT_REP_MS}; warm-up max({harness.DEFAULT_WARMUP_MS}, reps/4) ms); "
            f"on CPU the number of timed calls (default {harness.DEFAULT_CPU_REPS}, "
            f"{harness.SMOKE_CPU_REPS} with --smoke)"
        ),
    )
    p.add_argument(
        "--device",
        choices=("auto", "cuda", "cpu"),
        default="auto",
        help="auto: CUDA when available, except CPU for --smoke",
    )
    p.add_argument(
        "--only",
        help="comma-separated substrings: run only the cases whose shape label contains one",
    )
    p.add_argument("--seed", type=int, default=0, help="input seed of the first case (default 0)")
    p.add_argument(
        "--strict", action="store_true", help="exit 1 when any provider failed or errored"
    )
    p.add_argument(
        "--graph",
        action="store_true",
        help=(
            "CUDA only: time replays of each provider's call captured in a CUDA graph (GPU "
            "time without Python launch cost); correctness and peak memory stay eager"
        ),
    )
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    known = harness.suites()
    args = _parser(sorted(known)).parse_args(argv)
    try:
        device = harness.resolve_device(args.device, args.smoke)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.graph and device.type != "cuda":
        print("error: --graph needs a CUDA device", file=sys.stderr)
        return 2
    providers = None
    if args.providers:
        providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    cfg = harness.RunConfig(
        device=device,
        smoke=args.smoke,
        providers=providers,
        reps=args.reps,
        seed=args.seed,
        only=args.only.split(",") if args.only else None,
        graph=args.graph,
        command=shlex.join(["python", "-m", "bench", *argv]),
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bad = 0
    for name in sorted(known) if args.suite == "all" else [args.suite]:
        suite = known[name]
        json_path = out / f"{name}.json"

        def save(result, json_path=json_path):
            harness.write_json(json_path, result)

        try:
            result = harness.run_suite(suite, cfg, on_case=save)
        except KeyError as exc:  # unknown provider names
            print(f"error: {exc.args[0]}", file=sys.stderr)
            return 2
        save(result)
        png_path = plot_result(result, out / f"{name}.png")
        print(harness.markdown_table(result))
        print(f"\nwrote {json_path} and {png_path}")
        bad += sum(r["status"] in ("failed", "error") for r in result["rows"])
    if bad:
        print(f"\n{bad} row(s) failed the correctness check or errored", file=sys.stderr)
    return 1 if args.strict and bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
