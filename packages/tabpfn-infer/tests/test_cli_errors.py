"""The command line's error contract: each user error gives one line on stderr naming the
file (line, column), a documented exit code, no traceback and no output file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tabpfn_infer import cli
from tabpfn_infer.cli import EXIT_FILE, EXIT_NONFINITE, EXIT_USAGE, main
from tabpfn_infer.model import ARTabPFN
from tabpfn_infer.training.train import save_checkpoint

MODEL = {"d_model": 32, "n_heads": 2, "n_layers": 1, "d_ff": 32, "num_features": 2}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "m.pt"
    torch.manual_seed(0)
    save_checkpoint(path, ARTabPFN(**MODEL), MODEL, step=0)
    return path


@pytest.fixture
def files(tmp_path):
    """Good context and targets files, and the output path."""
    ctx = tmp_path / "ctx.csv"
    ctx.write_text("x1,x2,y\n0.1,0.2,1.0\n0.3,0.4,2.0\n0.5,0.1,0.5\n")
    tgt = tmp_path / "tgt.csv"
    tgt.write_text("0.2,0.3\n0.4,0.1\n")
    return ctx, tgt, tmp_path / "out.csv"


def run(command, checkpoint, ctx, tgt, out, *extra):
    return main(
        [command, "--checkpoint", str(checkpoint), "--context", str(ctx), "--targets", str(tgt),
         "--out", str(out), "--device", "cpu", "--backend", "torch", *extra]
    )  # fmt: skip


def error_line(capsys) -> str:
    """The one stderr line of a failed command (asserting there is exactly one)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("tabpfn-infer: error: ")
    return err[len("tabpfn-infer: error: ") : -1]


def test_good_files_work(checkpoint, files):
    ctx, tgt, out = files
    assert run("sample", checkpoint, ctx, tgt, out, "--n-samples", "3") == 0
    assert out.read_text().splitlines()[0] == "y0,y1" and len(out.read_text().splitlines()) == 4
    assert [p.name for p in out.parent.iterdir() if p.suffix == ".tmp"] == []


@pytest.mark.parametrize(
    ("command", "which", "text", "why"),
    [
        ("sample", 0, "x1,x2,y\n", "only a header line"),
        ("sample", 1, "x1,x2\n\n", "only a header line"),
        ("density", 1, "", "an empty file"),
    ],
    ids=["header-only-context", "header-only-targets", "empty-targets"],
)
def test_file_without_data_rows_is_an_error(checkpoint, files, capsys, command, which, text, why):
    ctx, tgt, out = files
    files[which].write_text(text)
    assert run(command, checkpoint, ctx, tgt, out) == EXIT_USAGE
    assert error_line(capsys) == f"{files[which]}: expected at least one data row, got none ({why})"
    assert not out.exists()


def test_bad_cell_on_the_first_line_is_not_taken_for_a_header(checkpoint, files, capsys):
    ctx, tgt, out = files
    ctx.write_text("0.1,oops,1.0\n0.3,0.4,2.0\n")
    assert run("sample", checkpoint, ctx, tgt, out) == EXIT_USAGE
    assert error_line(capsys) == f"{ctx}, line 1, column 2: expected a number, got 'oops'"
    assert not out.exists()


def test_header_flags(checkpoint, files, capsys):
    ctx, tgt, out = files
    ctx.write_text("1,2,3\n0.1,0.2,1.0\n0.3,0.4,2.0\n")  # a numeric header: --header says so
    tgt.write_text("0.2,0.3\n")
    assert run("sample", checkpoint, ctx, tgt, out, "--header") == EXIT_USAGE  # tgt has none
    assert error_line(capsys).startswith(f"{tgt}: expected at least one data row")
    tgt.write_text("a,b\n0.2,0.3\n")
    assert run("sample", checkpoint, ctx, tgt, out, "--header") == 0
    ctx.write_text("x1,x2,y\n0.1,0.2,1.0\n")
    assert run("sample", checkpoint, ctx, tgt, out, "--no-header") == EXIT_USAGE
    assert error_line(capsys) == f"{ctx}, line 1, column 1: expected a number, got 'x1'"


@pytest.mark.parametrize("cell", ["nan", "inf", "-Infinity"])
def test_non_finite_cell_is_named(checkpoint, files, capsys, cell):
    ctx, tgt, out = files
    ctx.write_text(f"x1,x2,y\n0.1,0.2,1.0\n0.3,0.4,{cell}\n")
    assert run("sample", checkpoint, ctx, tgt, out) == EXIT_USAGE
    assert error_line(capsys) == (
        f"{ctx}, line 3, column 3 (y): expected a finite number, got '{cell}'"
    )
    assert not out.exists()


def test_ragged_row_is_named(checkpoint, files, capsys):
    ctx, tgt, out = files
    ctx.write_text("x1,x2,y\n0.1,0.2,1.0\n\n0.3,0.4\n")
    assert run("sample", checkpoint, ctx, tgt, out) == EXIT_USAGE
    assert (
        error_line(capsys) == f"{ctx}, line 4, column 3: expected 3 columns (as the header), got 2"
    )
    assert not out.exists()


def test_targets_width_is_checked_against_the_context(checkpoint, files, capsys):
    ctx, tgt, out = files
    assert run("density", checkpoint, ctx, tgt, out) == EXIT_USAGE
    assert error_line(capsys) == (
        f"{tgt}, line 1: expected 3 columns (the context's 2 features, then y), got 2"
    )


def test_missing_input_file(checkpoint, files, capsys):
    ctx, tgt, out = files
    missing = ctx.parent / "nope.csv"
    assert run("sample", checkpoint, missing, tgt, out) == EXIT_FILE
    assert error_line(capsys) == f"{missing}: no such file"
    assert run("sample", ctx.parent / "nope.pt", ctx, tgt, out) == EXIT_FILE
    assert (
        error_line(capsys)
        == f"{ctx.parent / 'nope.pt'}: expected a checkpoint file, got no such file"
    )
    assert not out.exists()


def test_output_in_a_missing_folder(checkpoint, files, capsys):
    ctx, tgt, _ = files
    out = ctx.parent / "no" / "out.csv"
    assert run("sample", checkpoint, ctx, tgt, out) == EXIT_FILE
    assert error_line(capsys) == f"--out: {out}: folder {out.parent} does not exist"
    assert not out.parent.exists()


def test_train_out_in_a_missing_folder_fails_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "train", lambda *a, **k: pytest.fail("trained before the check"))
    out = tmp_path / "no" / "m.pt"
    assert main(["train", "--steps", "1", "--device", "cpu", "--out", str(out)]) == EXIT_FILE
    assert error_line(capsys) == f"--out: {out}: folder {out.parent} does not exist"


@pytest.mark.parametrize("device", ["gpu7", "cuda:99"])
def test_bad_device(checkpoint, files, capsys, device):
    ctx, tgt, out = files
    code = main(["sample", "--checkpoint", str(checkpoint), "--context", str(ctx),
                 "--targets", str(tgt), "--out", str(out), "--device", device])  # fmt: skip
    assert code == EXIT_USAGE
    assert error_line(capsys).startswith(
        f"--device: expected auto, cpu or a usable device, got '{device}'"
    )
    assert not out.exists()


def nan_weights(data):
    name = next(iter(data["model"]))
    data["model"][name] = torch.full_like(data["model"][name], float("nan"))
    return f"weight {name!r} holds NaN or inf"


def more_layers(data):
    data["config"] = {**MODEL, "n_layers": 2}
    return "weights do not fit the model config of {bad}"


@pytest.mark.parametrize(
    "spoil", [None, nan_weights, more_layers], ids=["unreadable", "nan", "misfit"]
)
def test_bad_checkpoint(checkpoint, files, capsys, spoil):
    ctx, tgt, out = files
    bad = ctx.parent / "bad.pt"
    if spoil is None:
        bad.write_bytes(b"not a checkpoint")
        message = "not a readable torch checkpoint ("
    else:
        data = torch.load(checkpoint, weights_only=True)
        message = spoil(data).format(bad=bad)
        torch.save(data, bad)
    assert run("sample", bad, ctx, tgt, out) == EXIT_USAGE
    assert error_line(capsys).startswith(f"{bad}: {message}")
    assert not out.exists()


def test_peer_checkpoint_needs_and_takes_a_model_config(checkpoint, files, capsys):
    ctx, tgt, out = files
    data = torch.load(checkpoint, weights_only=True)
    peer = ctx.parent / "peer.pt"
    torch.save({"step": 0, "model": data["model"]}, peer)
    assert run("sample", peer, ctx, tgt, out) == EXIT_USAGE
    assert error_line(capsys).startswith(f"{peer}: holds no model config (the peer's layout)")
    assert not out.exists()
    config = ctx.parent / "model.json"
    config.write_text(json.dumps(MODEL))
    assert run("sample", peer, ctx, tgt, out, "--model-config", str(config)) == 0
    assert capsys.readouterr().err == f"tabpfn-infer: {peer}: model config from {config}\n"
    assert out.exists()


def test_nan_outputs_are_not_written(checkpoint, files, capsys, monkeypatch):
    ctx, tgt, out = files
    nan = lambda self, X, n, generator=None: torch.full((n, len(X)), float("nan"))
    monkeypatch.setattr(cli.ARTabPFNRegressor, "sample", nan)
    assert run("sample", checkpoint, ctx, tgt, out, "--n-samples", "2") == EXIT_NONFINITE
    assert error_line(capsys) == (
        f"{checkpoint}: the model gave 4 non-finite samples (NaN or inf) of 4; nothing written"
    )
    assert not out.exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"steps": 1,\n "lr": }', "line 2, column 8: not valid JSON (Expecting value)"),
        ('{"steps": 1,\n "lrate": 0.1}', "line 2: unknown key 'lrate'; expected some of"),
        ('{"steps": 1,\n "d_model": "big"}', "line 2: d_model: expected int, got 'big'"),
        ('{"n_heads": 5}', "cannot build ARTabPFN (n_heads: expected a divisor of d_model=64"),
        ("[1, 2]", "line 1: expected a JSON object, got list"),
    ],
)
def test_bad_training_config(tmp_path, capsys, text, message):
    config = tmp_path / "config.json"
    config.write_text(text)
    out = tmp_path / "m.pt"
    assert main(["train", "--config", str(config), "--device", "cpu", "--out", str(out)]) == 2
    line = error_line(capsys)
    assert line.startswith(f"{config}") and message in line, line
    assert not out.exists()


def test_unknown_backend_from_the_environment(checkpoint, files, capsys, monkeypatch):
    ctx, tgt, out = files
    monkeypatch.setenv("TABATTN_BACKEND", "nope")
    code = main(["sample", "--checkpoint", str(checkpoint), "--context", str(ctx),
                 "--targets", str(tgt), "--out", str(out), "--device", "cpu"])  # fmt: skip
    assert code == EXIT_USAGE
    assert error_line(capsys).startswith(
        "TABATTN_BACKEND=nope: backend: expected 'auto' or one of ["
    )
    assert not out.exists()


def test_module_entry_reports_without_a_traceback(tmp_path):
    out = tmp_path / "m.pt"
    env = {**os.environ, "TABATTN_BACKEND": "nope"}
    proc = subprocess.run(
        [sys.executable, "-m", "tabpfn_infer", "train", "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert proc.returncode == EXIT_USAGE and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("tabpfn-infer: error: TABATTN_BACKEND=nope: backend:")
    assert not out.exists()


def test_help_documents_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = capsys.readouterr().out
    assert "Exit codes:" in text and "--header, --no-header" in text
    assert "tabpfn-infer: error: FILE, line L, column C" in text
