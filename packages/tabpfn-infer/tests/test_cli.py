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
    assert err == f"tabpfn-infer: error: {ctx}, line 2, column 2: expected a number, got 'oops'\n"


@pytest.fixture
def demo_checkpoint(checkpoint, monkeypatch):
    import tabpfn_infer.demo as demo

    monkeypatch.setattr(demo, "CHECKPOINT", checkpoint)
    return demo


def test_demo_runs_on_a_checkpoint(demo_checkpoint, tmp_path, capsys):
    import importlib.util

    png = tmp_path / "paths.png"
    assert (
        main(
            ["demo", "--n-samples", "8", "--device", "cpu", "--backend", "torch", "--out", str(png)]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "data: diabetes" in out and "features bmi, s5 -> label progression" in out
    assert "context 100 rows, targets 25, 8 joint sample paths" in out
    assert "joint log density of the held-out labels" in out and "90% marginal intervals" in out
    if importlib.util.find_spec("matplotlib") is None:
        assert "plot skipped: matplotlib is not installed" in out
    else:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_diabetes_split():
    from tabpfn_infer.demo import DIABETES, diabetes_dataset

    table = np.loadtxt(DIABETES, delimiter=",", skiprows=1)
    assert table.shape == (442, 11)
    d = diabetes_dataset(seed=3)
    assert d.x_context.shape == (100, 2) and d.x_target.shape == (25, 2)
    rows = {tuple(r) for r in table[:, [2, 8, 10]]}  # bmi, s5, progression: raw units
    context = np.column_stack([d.x_context, d.y_context])
    target = np.column_stack([d.x_target, d.y_target])
    assert all(tuple(r) in rows for r in np.concatenate([context, target]))
    assert not {tuple(r) for r in context} & {tuple(r) for r in target}
    again, other = diabetes_dataset(seed=3), diabetes_dataset(seed=4)
    assert np.array_equal(again.y_target, d.y_target)
    assert not np.array_equal(other.y_target, d.y_target)


def test_demo_reports_data_units(demo_checkpoint, tmp_path):
    """Labels scaled by 10: the model sees the same z-normalised task, so RMSE and interval
    widths scale by 10 and the joint log density moves by -Nt log 10."""
    data = demo_checkpoint.diabetes_dataset()
    kw = dict(n_samples=2, device="cpu", backend="torch", out=tmp_path / "p.png")
    base = demo_checkpoint.run_demo(data, **kw)
    data.y_context, data.y_target = 10 * data.y_context, 10 * data.y_target
    scaled = demo_checkpoint.run_demo(data, **kw)
    for key in ("rmse", "rmse_context_mean", "interval_width_90"):
        assert scaled[key] == pytest.approx(10 * base[key], rel=1e-6)
    for key in ("joint_log_density", "marginal_gaussian_log_density"):
        assert scaled[key] == pytest.approx(base[key] - 25 * np.log(10), rel=1e-6)
    assert scaled["coverage_90"] == base["coverage_90"]


def test_demo_on_a_user_csv(demo_checkpoint, tmp_path, capsys):
    rng = np.random.default_rng(0)
    table = write(tmp_path / "t.csv", rng.normal(size=(12, 4)).tolist(), header="a,b,c,y")
    args = ["demo", "--n-samples", "3", "--device", "cpu", "--backend", "torch"]
    assert main([*args, "--data", str(table), "--out", str(tmp_path / "p.png")]) == 0
    assert "context 10 rows, targets 2, 3 joint sample paths" in capsys.readouterr().out
    bad = write(tmp_path / "bad.csv", [[0.1, 1.0], [0.3, 2.0], [0.5, float("nan")]])
    assert main([*args, "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}, line 3, column 2: expected a finite number, got 'nan'" in err
    assert main([*args, "--data", "diabetis"]) == 2
    assert "expected diabetes, synthetic or a CSV file, got 'diabetis'" in capsys.readouterr().err
