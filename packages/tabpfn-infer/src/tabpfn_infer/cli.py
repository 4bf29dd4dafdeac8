"""`tabpfn-infer` command line: train, train-tnp, sample, density, demo (and --version).

CSV files hold one row per data point, features first; the context file's last column is
the label y (so is the targets file's for `density`). Whether the first line is a header is
decided by `--header` / `--no-header`, else by one rule: a header is a first line none of
whose cells is a number. User errors (bad files, cells, options, configs, checkpoints) end
in one line on stderr naming the file, line and column, and an exit code (`EPILOG`); outputs
are written only once everything succeeded (a temporary file renamed into place).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, fields
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from tabattn_core.checks import InputError
from tabattn_core.registry import ENV_BACKEND, registry
from tabpfn_infer import __version__
from tabpfn_infer.estimator import ARTabPFNRegressor
from tabpfn_infer.model import ARTabPFN, load_peer_state_dict
from tabpfn_infer.training.train import (
    TrainConfig,
    config_from_dict,
    resolve_device,
    save_checkpoint,
    train,
)

#: Distributions of this project whose versions ``--version`` reports when installed.
TABATTN_DISTRIBUTIONS = ("tabattn-core", "tabattn-triton", "tabattn-fp8", "tabpfn-infer")

#: Exit codes (documented in `EPILOG` and the README).
EXIT_OK = 0
EXIT_USAGE = 2  # a bad option, data file, config or checkpoint
EXIT_FILE = 3  # a file that cannot be read, or a folder that cannot be written
EXIT_NONFINITE = 4  # the model gave NaN or inf

EPILOG = """\
CSV input: one row per data point, features first; the context's last column is the
label y (so is the targets' for density). Blank lines are skipped. The first line is a
header with --header, data with --no-header, and by default a header exactly when none of
its cells is a number. Every other cell must be a finite number and every row must have
as many columns as the first.

Errors: one line on standard error, no traceback:
  tabpfn-infer: error: FILE, line L, column C: what was expected, what was found
(line as an editor counts it, from 1, header included; column: the CSV column, from 1;
either is left out where it does not apply). Nothing is written on error: outputs go to
a temporary file beside the destination, renamed into place once everything succeeded.

Exit codes:
  0  success
  2  usage or input error: a bad option, device or backend (TABATTN_BACKEND too), a bad
     CSV cell (not a number, NaN, inf), a ragged row, a file without data rows, a bad
     training config, a bad checkpoint (unreadable, no model config, weights that do not
     fit its config, NaN/inf weights)
  3  a file that cannot be read, or an output folder that does not exist or is not
     writable (checked before any work starts)
  4  the model produced NaN or inf (samples, densities, trained weights)
"""


class CLIError(Exception):
    """A user error: `str(err)` is the one line printed, `code` the exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


def where(path: str | Path, line: int | None = None, column: int | None = None) -> str:
    """ "FILE, line L, column C" with the parts that apply."""
    parts = [str(path)]
    if line is not None:
        parts.append(f"line {line}")
    if column is not None:
        parts.append(f"column {column}")
    return ", ".join(parts)


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


def _number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


@dataclass
class Table:
    """A CSV file's data rows: `values` [rows, columns] (finite floats), `columns` the
    header's names (None without one), `lines` each row's line number in the file."""

    path: Path
    values: np.ndarray
    columns: tuple[str, ...] | None
    lines: list[int]

    @property
    def width(self) -> int:
        return self.values.shape[1]


def _read_text_rows(path: Path) -> list[tuple[int, list[str]]]:
    """Non-blank CSV records of a file with the line each ends on."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            try:
                return [(reader.line_num, row) for row in reader if any(c.strip() for c in row)]
            except csv.Error as err:
                raise CLIError(f"{where(path, reader.line_num)}: not valid CSV ({err})") from None
    except FileNotFoundError:
        raise CLIError(f"{path}: no such file", EXIT_FILE) from None
    except IsADirectoryError:
        raise CLIError(f"{path}: expected a CSV file, got a folder", EXIT_FILE) from None
    except UnicodeDecodeError as err:
        raise CLIError(
            f"{path}: expected UTF-8 text, got byte {err.object[err.start]:#x}"
        ) from None
    except OSError as err:
        raise CLIError(f"{path}: cannot read ({err.strerror})", EXIT_FILE) from None


def read_table(path: str | Path, *, header: bool | None = None) -> Table:
    """A CSV file of numbers. header: True (the first line is a header), False (it is data)
    or None (a header exactly when none of its cells is a number). Cells that are not
    finite numbers, ragged rows and files without data rows raise `CLIError` naming the
    file, line and column."""
    path = Path(path)
    records = _read_text_rows(path)
    columns = None
    if records and (header or (header is None and all(_number(c) is None for c in records[0][1]))):
        columns = tuple(c.strip() for c in records[0][1])
        records = records[1:]
    if not records:
        raise CLIError(f"{path}: expected at least one data row, got none" + (
            " (only a header line)" if columns else " (an empty file)"))  # fmt: skip
    width = len(columns) if columns else len(records[0][1])
    ref = "the header" if columns else f"line {records[0][0]}"
    values = np.empty((len(records), width))
    for i, (line, row) in enumerate(records):
        if len(row) != width:
            raise CLIError(
                f"{where(path, line, min(len(row), width) + 1)}: expected {width} columns "
                f"(as {ref}), got {len(row)}"
            )
        for j, cell in enumerate(row):
            value = _number(cell)
            if value is None or not math.isfinite(value):
                what = "a number" if value is None else "a finite number"
                name = f" ({columns[j]})" if columns else ""
                raise CLIError(f"{where(path, line, j + 1)}{name}: expected {what}, got {cell!r}")
            values[i, j] = value
    return Table(path, values, columns, [line for line, _ in records])


def check_device(name: str, source: str = "--device") -> str:
    """`name` if tensors can be made there ("auto" always passes)."""
    if name == "auto":
        return name
    try:
        torch.empty(0, device=torch.device(name))
    except (RuntimeError, AssertionError, ValueError, TypeError) as err:
        raise CLIError(
            f"{source}: expected auto, cpu or a usable device, got {name!r} ({_first_line(err)})"
        ) from None
    return name


def check_backend(name: str, device: str, source: str = "--backend") -> None:
    """The attention backend `name` (or the one TABATTN_BACKEND forces) runs on `device`."""
    forced = os.environ.get(ENV_BACKEND)
    if name == "auto" and forced:
        source = f"{ENV_BACKEND}={forced}"
    try:
        registry.choose(name, device=resolve_device(device))
    except InputError as err:
        raise CLIError(f"{source}: {err}") from None


def check_out(path: Path, option: str = "--out") -> None:
    """An output path whose folder exists and is writable (checked before any work)."""
    folder = path.parent
    if not folder.is_dir():
        raise CLIError(f"{option}: {path}: folder {folder} does not exist", EXIT_FILE)
    if path.is_dir():
        raise CLIError(f"{option}: {path}: expected a file path, got a folder", EXIT_FILE)
    if not os.access(folder, os.W_OK):
        raise CLIError(f"{option}: {path}: folder {folder} is not writable", EXIT_FILE)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` to a temporary file beside `path`, then rename it to `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> tuple[dict, str]:
    """A JSON object from a file, and its text (to find keys' lines)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CLIError(f"{path}: no such file", EXIT_FILE) from None
    except (OSError, UnicodeDecodeError) as err:
        raise CLIError(f"{path}: cannot read ({err})", EXIT_FILE) from None
    try:
        values = json.loads(text)
    except json.JSONDecodeError as err:
        raise CLIError(
            f"{where(path, err.lineno, err.colno)}: not valid JSON ({err.msg})"
        ) from None
    if not isinstance(values, dict):
        raise CLIError(f"{where(path, 1)}: expected a JSON object, got {type(values).__name__}")
    return values, text


def _key_line(text: str, key: str) -> int | None:
    for number, line in enumerate(text.splitlines(), 1):
        if f'"{key}"' in line:
            return number
    return None


def check_fields(values: dict, cls: type, path: Path | None, text: str = "") -> None:
    """Keys of `values` are fields of the dataclass `cls`, each of its default's type."""
    names = {f.name: f for f in fields(cls)}
    for key, value in values.items():
        at = where(path, _key_line(text, key)) if path else "options"
        if key not in names:
            raise CLIError(f"{at}: unknown key {key!r}; expected some of {sorted(names)}")
        default = names[key].default
        if default is MISSING or default is None:
            continue
        want = type(default)
        ok = isinstance(value, want) and isinstance(value, bool) == (want is bool)
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise CLIError(f"{at}: {key}: expected {want.__name__}, got {value!r}")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def load_model(path: Path, model_config: Path | None = None) -> ARTabPFN:
    """A model from a checkpoint of ours (it carries its config) or of the peer (a bare
    `{"step", "model"}` or state dict: the ARTabPFN arguments from `model_config`, a JSON
    file). Every error names the file."""
    if not path.is_file():
        got = "a folder" if path.is_dir() else "no such file"
        raise CLIError(f"{path}: expected a checkpoint file, got {got}", EXIT_FILE)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many kinds for a file that is not one
        raise CLIError(f"{path}: not a readable torch checkpoint ({_first_line(err)})") from None
    if not isinstance(data, dict):
        raise CLIError(f"{path}: expected a checkpoint dict, got {type(data).__name__}")
    state = data["model"] if isinstance(data.get("model"), dict) else data
    if model_config is not None:
        config, _ = read_json(model_config)
        source: Path = model_config
        print(f"tabpfn-infer: {path}: model config from {model_config}", file=sys.stderr)
    elif isinstance(data.get("config"), dict):
        config, source = data["config"], path
    else:
        raise CLIError(
            f"{path}: holds no model config (the peer's layout); pass --model-config "
            "FILE.json with the ARTabPFN arguments (d_model, n_heads, n_layers, ...)"
        )
    for name, value in state.items():
        floating = isinstance(value, torch.Tensor) and value.is_floating_point()
        if floating and not torch.isfinite(value).all():
            raise CLIError(f"{path}: weight {name!r} holds NaN or inf")
    try:
        model = ARTabPFN(**config)
    except (InputError, TypeError, ValueError) as err:
        raise CLIError(f"{source}: cannot build ARTabPFN from the model config ({err})") from None
    try:
        load_peer_state_dict(model, data)
    except RuntimeError as err:
        raise CLIError(
            f"{path}: weights do not fit the model config of {source} ({_first_line(err)})"
        ) from None
    return model.eval()


def build_parser() -> argparse.ArgumentParser:
    common = dict(epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser = argparse.ArgumentParser(
        prog="tabpfn-infer",
        description=(
            f"tabpfn-infer {__version__}: joint sampling and joint densities with AR-TabPFN. "
            "`demo` runs the shipped checkpoint on the embedded diabetes data."
        ),
        **common,
    )
    parser.add_argument(
        "--version", action="store_true", help="print the installed tabattn versions"
    )
    sub = parser.add_subparsers(dest="command")
    header = dict(
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the first line of each CSV is a header (--header) or data (--no-header); "
        "default: a header exactly when none of its cells is a number",
    )

    p_demo = sub.add_parser(
        "demo",
        help="joint samples and densities on the embedded diabetes data (or others)",
        **common,
    )
    p_demo.add_argument(
        "--data",
        default="diabetes",
        help="diabetes (embedded; bmi, s5 -> progression), synthetic, or a CSV: features..., y",
    )
    p_demo.add_argument("--header", **header)
    p_demo.add_argument("--n-samples", type=int, default=200)
    p_demo.add_argument("--seed", type=int, default=0, help="seed of the row split and sampler")
    p_demo.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    p_demo.add_argument("--backend", default="auto")
    p_demo.add_argument("--out", type=Path, help="PNG of sample paths (default tabpfn_demo.png)")

    p_train = sub.add_parser(
        "train", help="train on the synthetic prior and write a checkpoint", **common
    )
    p_train.add_argument("--config", type=Path, help="JSON file with TrainConfig fields")
    p_train.add_argument("--steps", type=int, help="override the number of steps")
    p_train.add_argument("--out", type=Path, required=True, help="checkpoint path to write")
    p_train.add_argument("--device", help="auto, cpu, cuda, ...")
    p_train.add_argument("--backend", help="attention backend: auto, torch, triton")

    p_tnp = sub.add_parser(
        "train-tnp",
        help="pretrain a TransformerNP on the synthetic prior (torchrun for several GPUs)",
        **common,
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
        p = sub.add_parser(name, help=text, **common)
        p.add_argument("--checkpoint", type=Path, required=True)
        p.add_argument(
            "--model-config",
            type=Path,
            help="JSON file with the ARTabPFN arguments, for a checkpoint without them "
            "(the peer's layout); overrides the checkpoint's own",
        )
        p.add_argument("--context", type=Path, required=True, help="CSV: features..., y")
        p.add_argument(
            "--targets",
            type=Path,
            required=True,
            help="CSV: features..." + (", y" if name == "density" else ""),
        )
        p.add_argument("--header", **header)
        p.add_argument("--out", type=Path, help="CSV to write (default: standard output)")
        p.add_argument("--backend", default="auto")
        p.add_argument("--device", default="auto")
        if name == "sample":
            p.add_argument("--n-samples", type=int, default=100)
            p.add_argument("--seed", type=int, default=0)
    return parser


def _write_csv(rows: np.ndarray, header: str, out: Path | None) -> None:
    if out is None:
        np.savetxt(sys.stdout, rows, delimiter=",", header=header, comments="", fmt="%.6g")
    else:
        write_atomic(
            out,
            lambda tmp: np.savetxt(
                tmp, rows, delimiter=",", header=header, comments="", fmt="%.6g"
            ),
        )


def _check_finite_output(values: np.ndarray, what: str, checkpoint: Path) -> None:
    bad = int((~np.isfinite(values)).sum())
    if bad:
        raise CLIError(
            f"{checkpoint}: the model gave {bad} non-finite {what} (NaN or inf) of "
            f"{values.size}; nothing written",
            EXIT_NONFINITE,
        )


def _predict(args: argparse.Namespace) -> int:
    if args.out is not None:
        check_out(args.out)
    if args.command == "sample" and args.n_samples < 1:
        raise CLIError(f"--n-samples: expected a positive int, got {args.n_samples}")
    check_device(args.device)
    check_backend(args.backend, args.device)
    context = read_table(args.context, header=args.header)
    targets = read_table(args.targets, header=args.header)
    if context.width < 2:
        raise CLIError(
            f"{where(context.path, context.lines[0])}: expected at least 2 columns "
            f"(features..., y), got {context.width}"
        )
    n_features = context.width - 1
    want = n_features + (args.command == "density")
    if targets.width != want:
        label = ", then y" if args.command == "density" else ""
        raise CLIError(
            f"{where(targets.path, targets.lines[0])}: expected {want} columns (the "
            f"context's {n_features} features{label}), got {targets.width}"
        )
    model = load_model(args.checkpoint, args.model_config)
    est = ARTabPFNRegressor(model=model, backend=args.backend, device=args.device)
    est.fit(context.values[:, :-1], context.values[:, -1])
    if args.command == "sample":
        gen = torch.Generator().manual_seed(args.seed)
        samples = est.sample(targets.values, args.n_samples, generator=gen).numpy()
        _check_finite_output(samples, "samples", args.checkpoint)
        _write_csv(samples, ",".join(f"y{t}" for t in range(samples.shape[1])), args.out)
    else:
        logp = est.log_density(targets.values[:, :-1], targets.values[:, -1]).numpy()
        _check_finite_output(logp, "log densities", args.checkpoint)
        rows = np.column_stack([np.arange(len(logp)), logp, np.cumsum(logp)])
        _write_csv(rows, "target,log_density,cumulative_joint", args.out)
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    from tabpfn_infer import demo

    check_out(args.out or Path("tabpfn_demo.png"))
    check_device(args.device)
    check_backend(args.backend, args.device)
    if args.data == "diabetes":
        data = demo.diabetes_dataset(seed=args.seed)
    elif args.data == "synthetic":
        data = demo.synthetic_dataset(seed=args.seed)
    elif not Path(args.data).is_file():
        raise CLIError(f"--data: expected diabetes, synthetic or a CSV file, got {args.data!r}")
    else:
        table = read_table(args.data, header=args.header)
        names = dict(columns=table.columns[:-1], label=table.columns[-1]) if table.columns else {}
        data = demo.split_table(table.values, name=args.data, seed=args.seed, **names)
    options = ("n_samples", "device", "backend", "out", "seed")
    demo.run_demo(data, **{key: getattr(args, key) for key in options})
    return EXIT_OK


def _train(args: argparse.Namespace) -> int:
    check_out(args.out)
    values, text = read_json(args.config) if args.config else ({}, "")
    check_fields(values, TrainConfig, args.config, text)
    for key in ("steps", "device", "backend"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    config = config_from_dict(values)
    source = str(args.config) if args.config else "the default config"
    if config.steps < 1 or config.warmup < 0:
        raise CLIError(
            f"{source}: steps, warmup: expected steps >= 1 and warmup >= 0, "
            f"got {config.steps}, {config.warmup}"
        )
    check_device(config.device, "--device" if args.device else f"{source}: device")
    check_backend(
        config.backend, config.device, "--backend" if args.backend else f"{source}: backend"
    )
    try:
        ARTabPFN(**config.model_config())
    except (InputError, TypeError, ValueError) as err:
        raise CLIError(f"{source}: cannot build ARTabPFN ({err})") from None
    model, log = train(config)
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise CLIError(
            f"{args.out}: training diverged (NaN or inf weights; final loss "
            f"{log[-1]['loss']:.4g}); nothing written",
            EXIT_NONFINITE,
        )
    write_atomic(
        args.out, lambda tmp: save_checkpoint(tmp, model, config.model_config(), config.steps)
    )
    print(f"final loss {log[-1]['loss']:.4f}; checkpoint written to {args.out}")
    return EXIT_OK


def _train_tnp(args: argparse.Namespace) -> int:
    from tabpfn_infer.training.train_tnp import TNPTrainConfig, train_tnp

    check_out(args.out)
    if args.resume is not None and not args.resume.is_file():
        raise CLIError(f"--resume: {args.resume}: no such file", EXIT_FILE)
    values, _ = read_json(args.config) if args.config else ({}, "")
    model = dict(values.get("model", {}))
    for key, target in (("steps", values), ("device", values), ("cuda_graph", values),
                        ("backend", model), ("checkpoint_blocks", model)):  # fmt: skip
        if getattr(args, key) is not None:
            target[key] = getattr(args, key)
    if "device" in values:
        check_device(values["device"], "--device" if args.device else f"{args.config}: device")
    try:
        config = TNPTrainConfig.from_dict({**values, "model": model})
    except (InputError, TypeError, ValueError) as err:
        raise CLIError(f"{args.config or 'options'}: {err}") from None
    _, log = train_tnp(config, out=args.out, resume=args.resume)
    if log:  # rank 0
        print(f"final loss {log[-1]['loss']:.4f}; checkpoint written to {args.out}")
    return EXIT_OK


COMMANDS = {"train": _train, "train-tnp": _train_tnp, "demo": _demo,
            "sample": _predict, "density": _predict}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code (`EPILOG` lists them). argparse's usage
    errors exit with 2 and its message, as argparse does."""
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors and --help exit here (SystemExit 2 / 0)
    if args.version:
        print(_version_text())
        return EXIT_OK
    if args.command not in COMMANDS:
        parser.print_help()
        return EXIT_OK
    try:
        return COMMANDS[args.command](args)
    except CLIError as err:
        message, code = str(err), err.code
    except InputError as err:  # raised past the CLI's own checks
        message, code = f"{args.command}: {err}", EXIT_USAGE
    print(f"tabpfn-infer: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
