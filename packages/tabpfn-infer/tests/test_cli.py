"""The command line end to end: train a tiny checkpoint, then sample and density from CSV."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tabpfn_infer.cli import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    config = path / "config.json"
    config.write_text(json.dumps({
        "d_model": 32, "n_heads": 2, "n_layers": 1, "d_ff": 32, "batch": 4, "num_context": 12,
        "num_buffer": 2, "num_target": 4, "warmup": 1, "backend": "torch", "device": "cpu",
    }))  # fmt: skip
    assert (
        main(["train", "--config", str(config), "--steps", "3", "--out", str(path / "m.pt")]) == 0
    )
    return path / "m.pt"


def write(path, rows, header=None):
    text = "\n".join(",".join(str(c) for c in row) for row in rows)
    path.write_text((header + "\n" if header else "") + text + "\n")
    return path


def test_sample_and_density(checkpoint, tmp_path):
    rng = np.random.default_rng(0)
    ctx = write(tmp_path / "ctx.csv", rng.normal(size=(10, 3)).tolist(), header="x1,x2,y")
    tgt = write(tmp_path / "tgt.csv", rng.normal(size=(4, 2)).tolist())
    out = tmp_path / "samples.csv"
    args = [
        "--checkpoint",
        str(checkpoint),
        "--context",
        str(ctx),
        "--backend",
        "torch",
        "--device",
        "cpu",
    ]
    assert (
        main(["sample", *args, "--targets", str(tgt), "--n-samples", "7", "--out", str(out)]) == 0
    )
    samples = np.loadtxt(out, delimiter=",", skiprows=1)
    assert samples.shape == (7, 4) and np.isfinite(samples).all()
    dens_in = write(tmp_path / "dens.csv", rng.normal(size=(4, 3)).tolist())
    dens_out = tmp_path / "dens_out.csv"
    assert main(["density", *args, "--targets", str(dens_in), "--out", str(dens_out)]) == 0
    table = np.loadtxt(dens_out, delimiter=",", skiprows=1)
    assert table.shape == (4, 3) and np.allclose(np.cumsum(table[:, 1]), table[:, 2], atol=1e-4)


def test_bad_cell_is_named(checkpoint, tmp_path, capsys):
    ctx = write(tmp_path / "ctx.csv", [[0.1, 0.2, 1.0], [0.3, "oops", 2.0], [0.5, 0.1, 0.0]])
    tgt = write(tmp_path / "tgt.csv", [[0.1, 0.2]])
    code = main(
        [
            "sample",
            "--checkpoint",
            str(checkpoint),
            "--context",
            str(ctx),
            "--targets",
            str(tgt),
            "--device",
            "cpu",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "ctx.csv" in err and "'oops' at row 1, column 1" in err


def test_demo_runs_on_a_checkpoint(checkpoint, tmp_path, monkeypatch, capsys):
    import importlib.util

    import tabpfn_infer.demo as demo

    monkeypatch.setattr(demo, "CHECKPOINT", checkpoint)
    png = tmp_path / "paths.png"
    assert (
        main(
            ["demo", "--n-samples", "8", "--device", "cpu", "--backend", "torch", "--out", str(png)]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "joint log density of the held-out labels" in out and "90% marginal intervals" in out
    if importlib.util.find_spec("matplotlib") is None:
        assert "plot skipped: matplotlib is not installed" in out
    else:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
