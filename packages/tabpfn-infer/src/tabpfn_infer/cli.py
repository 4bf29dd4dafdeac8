"""`tabpfn-infer` command line: train, train-tnp, sample, density, demo (and --version).

CSV files hold one row per data point, features first; the context file's last column is
the label y (so is the targets file's for `density`). A first line that is not all numbers
is taken as a header. Bad cells are reported by file, row and column.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from tabattn_core.checks import InputError
from tabpfn_infer import __version__
from tabpfn_infer.estimator import ARTabPFNRegressor
from tabpfn_infer.training.train import config_from_dict, load_checkpoint, train

#: Distributions of this project whose versions ``--version`` reports when installed.
TABATTN_DISTRIBUTIONS = ("tabattn-core", "tabattn-triton", "tabattn-fp8", "tabpfn-infer")


def installed_versions() -> dict[str, str | None]:
    """Version of each tabattn distribution, ``None`` where it is not installed."""
    versions: dict[str, str | None] = {}
    for dist in TABATTN_DISTRIBUTIONS:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def _version_text() -> str:
    lines = []
    for dist, version in installed_versions().items():
        lines.append(f"{dist} {version if version is not None else '(not installed)'}")
    return "\n".join(lines)


def read_csv(path: str | Path) -> np.ndarray:
    """A CSV file as a 2-D array of strings (header line dropped); cells are converted, and
    bad ones named, by the estimator."""
    rows = np.loadtxt(Path(path), delimiter=",", dtype=str, ndmin=2)
    if len(rows):
        try:
            [float(cell) for cell in rows[0]]
        except ValueError:
            rows = rows[1:]
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tabpfn-infer",
        description=(
            f"tabpfn-infer {__version__}: joint sampling and joint densities with AR-TabPFN. "
            "`demo` runs the shipped checkpoint on the embedded diabetes data."
        ),
    )
    parser.add_argument(
        "--version", action="store_true", help="print the installed tabattn versions"
    )
    sub = parser.add_subparsers(dest="command")

    p_demo = sub.add_parser(
        "demo", help="joint samples and densities on the embedded diabetes data (or others)"
    )
    p_demo.add_argument(
        "--data",
        default="diabetes",
        help="diabetes (embedded; bmi, s5 -> progression), synthetic, or a CSV: features..., y",
    )
    p_demo.add_argument("--n-samples", type=int, default=200)
    p_demo.add_argument("--seed", type=int, default=0, help="seed of the row split and sampler")
    p_demo.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    p_demo.add_argument("--backend", default="auto")
    p_demo.add_argument("--out", type=Path, help="PNG of sample paths (default tabpfn_demo.png)")

    p_train = sub.add_parser("train", help="train on the synthetic prior and write a checkpoint")
    p_train.add_argument("--config", type=Path, help="JSON file with TrainConfig fields")
    p_train.add_argument("--steps", type=int, help="override the number of steps")
    p_train.add_argument("--out", type=Path, required=True, help="checkpoint path to write")
    p_train.add_argument("--device", help="auto, cpu, cuda, ...")
    p_train.add_argument("--backend", help="attention backend: auto, torch, triton")

    p_tnp = sub.add_parser(
        "train-tnp",
        help="pretrain a TransformerNP on the synthetic prior (torchrun for several GPUs)",
    )
    p_tnp.add_argument(
        "--config", type=Path, help='JSON file with TNPTrainConfig fields ("model": TNPConfig)'
    )
    p_tnp.add_argument("--steps", type=int, help="override the number of steps")
    p_tnp.add_argument("--out", type=Path, required=True, help="checkpoint path to write")
    p_tnp.add_argument("--resume", type=Path, help="checkpoint to go on training from")
    p_tnp.add_argument("--device", help="auto, cpu, cuda, ...")
    p_tnp.add_argument("--backend", help="every kernel's backend: auto, torch, triton, ...")
    p_tnp.add_argument(
        "--cuda-graph", action="store_true", default=None, help="capture the step in a CUDA graph"
    )
    p_tnp.add_argument(
        "--checkpoint-blocks",
        action="store_true",
        default=None,
        help="recompute each block in the backward pass (less memory)",
    )

    for name, text in (("sample", "draw joint samples of the targets' labels"),
                       ("density", "per-target conditional log densities and their sum")):  # fmt: skip
        p = sub.add_parser(name, help=text)
        p.add_argument("--checkpoint", type=Path, required=True)
        p.add_argument("--context", type=Path, required=True, help="CSV: features..., y")
        p.add_argument(
            "--targets",
            type=Path,
            required=True,
            help="CSV: features..." + (", y" if name == "density" else ""),
        )
        p.add_argument("--out", type=Path, help="CSV to write (default: standard output)")
        p.add_argument("--backend", default="auto")
        p.add_argument("--device", default="auto")
        if name == "sample":
            p.add_argument("--n-samples", type=int, default=100)
            p.add_argument("--seed", type=int, default=0)
    return parser


def _write(rows: np.ndarray, header: str, out: Path | None) -> None:
    if out is None:
        np.savetxt(sys.stdout, rows, delimiter=",", header=header, comments="", fmt="%.6g")
    else:
        np.savetxt(out, rows, delimiter=",", header=header, comments="", fmt="%.6g")


def _predict(args: argparse.Namespace) -> int:
    model = load_checkpoint(args.checkpoint)
    context = read_csv(args.context)
    targets = read_csv(args.targets)
    est = ARTabPFNRegressor(model=model, backend=args.backend, device=args.device)
    where = args.context
    try:
        est.fit(context[:, :-1], context[:, -1])
        where = args.targets
        if args.command == "sample":
            gen = torch.Generator().manual_seed(args.seed)
            samples = est.sample(targets, args.n_samples, generator=gen).numpy()
            _write(samples, ",".join(f"y{t}" for t in range(samples.shape[1])), args.out)
        else:
            logp = est.log_density(targets[:, :-1], targets[:, -1]).numpy()
            rows = np.column_stack([np.arange(len(logp)), logp, np.cumsum(logp)])
            _write(rows, "target,log_density,cumulative_joint", args.out)
    except InputError as err:
        print(f"tabpfn-infer: {where}: {err}", file=sys.stderr)
        return 2
    return 0


def _demo(args: argparse.Namespace) -> int:
    from tabpfn_infer import demo

    try:
        if args.data == "diabetes":
            data = demo.diabetes_dataset(seed=args.seed)
        elif args.data == "synthetic":
            data = demo.synthetic_dataset(seed=args.seed)
        elif not Path(args.data).is_file():
            raise InputError(
                f"--data: expected diabetes, synthetic or a CSV file, got {args.data!r}"
            )
        else:
            data = demo.split_table(read_csv(args.data), name=args.data, seed=args.seed)
        demo.run_demo(
            data,
            n_samples=args.n_samples,
            device=args.device,
            backend=args.backend,
            out=args.out,
            seed=args.seed,
        )
    except InputError as err:
        print(f"tabpfn-infer: demo: {err}", file=sys.stderr)
        return 2
    return 0


def _train_tnp(args: argparse.Namespace) -> int:
    from tabpfn_infer.training.train_tnp import TNPTrainConfig, train_tnp

    values = json.loads(args.config.read_text()) if args.config else {}
    model = dict(values.get("model", {}))
    for key, target in (("steps", values), ("device", values), ("cuda_graph", values),
                        ("backend", model), ("checkpoint_blocks", model)):  # fmt: skip
        if getattr(args, key) is not None:
            target[key] = getattr(args, key)
    _, log = train_tnp(
        TNPTrainConfig.from_dict({**values, "model": model}), out=args.out, resume=args.resume
    )
    if log:  # rank 0
        print(f"final loss {log[-1]['loss']:.4f}; checkpoint written to {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        print(_version_text())
        return 0
    if args.command == "train":
        values = json.loads(args.config.read_text()) if args.config else {}
        for key in ("steps", "device", "backend"):
            if getattr(args, key) is not None:
                values[key] = getattr(args, key)
        _, log = train(config_from_dict(values), out=args.out)
        print(f"final loss {log[-1]['loss']:.4f}; checkpoint written to {args.out}")
        return 0
    if args.command == "train-tnp":
        return _train_tnp(args)
    if args.command == "demo":
        return _demo(args)
    if args.command in ("sample", "density"):
        return _predict(args)
    parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
