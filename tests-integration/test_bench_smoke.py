"""The benchmark harness end to end on tiny shapes: `python -m bench <suite> --smoke`
(every suite) and `python -m bench.studies.<study> --smoke` (the studies that run on the
CPU)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HEADER_FIELDS = (
    "suite",
    "gpu",
    "compute_capability",
    "torch",
    "triton",
    "cuda",
    "git_commit",
    "date",
    "command",
    "timing",
    "baselines",
)


def _run(*args: str, interpret: bool = False, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m <args>` from the repository root (with TRITON_INTERPRET=1 if asked)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"} if interpret else dict(os.environ)
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def _run_ok(*args: str, interpret: bool = False) -> subprocess.CompletedProcess:
    """`_run`, which must exit 0 (its output shown otherwise)."""
    proc = _run(*args, interpret=interpret)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def _run_smoke(suite: str, out: Path) -> subprocess.CompletedProcess:
    proc = _run_ok("bench", suite, "--smoke", "--out", str(out))
    assert "| shape | mode | provider |" in proc.stdout
    return proc


def test_bench_smoke_writes_checked_timings_json_and_png(tmp_path: Path) -> None:
    _run_smoke("context_target", tmp_path)

    result = json.loads((tmp_path / "context_target.json").read_text())
    header, rows = result["header"], result["rows"]
    for name in HEADER_FIELDS:
        assert header.get(name) not in (None, ""), name
    assert header["suite"] == "context_target"

    timed = [
        r
        for r in rows
        if r["provider"] == "reference"
        and r["status"] == "ok"
        and r["ms"] is not None
        and r["ms"] > 0
        and r["tflops"] is not None
    ]
    assert timed, rows
    for row in timed:
        assert row["errors"], row
        assert row["max_error"] <= row["rel_tol"], row
        assert row["flops"] > 0
    assert {r["mode"] for r in timed} == {"fwd", "fwd+bwd"}
    assert all({"dq", "dk", "dv"} <= set(r["errors"]) for r in timed if r["mode"] == "fwd+bwd")
    # Every provider has a row per case and mode, timed or saying why not.
    for row in rows:
        assert row["status"] in ("ok", "skipped", "failed", "error"), row
        assert row["status"] == "ok" or row["reason"], row

    png = tmp_path / "context_target.png"
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_bench_smoke_shared_context(tmp_path: Path) -> None:
    proc = _run_smoke("shared_context", tmp_path)
    assert "floor µs" in proc.stdout

    result = json.loads((tmp_path / "shared_context.json").read_text())
    header, rows = result["header"], result["rows"]
    assert result["complete"] is True
    for name in HEADER_FIELDS:
        assert header.get(name) not in (None, ""), name
    assert header["suite"] == "shared_context"
    assert set(header["baselines"]) == {"decode", "teacher_forcing"}
    calibration = header["calibration"]
    assert calibration["copy_bandwidth_gbps"] > 0 and calibration["gemm_tflops"] > 0

    for row in rows:
        assert row["status"] in ("ok", "skipped", "failed", "error"), row
        assert row["status"] == "ok" or row["reason"], row
        if not row["provider"].startswith("tabattn"):  # the baselines all pass their check
            assert row["status"] not in ("failed", "error"), row
        assert row["floor_us"] > 0, row
        for key in ("speedup_vs", "ratio_to_floor", "floor_plus_launch_us", "best_flex"):
            assert key in row, (key, row)
    # Providers appear only in their modes.
    by_mode = {m: {r["provider"] for r in rows if r["mode"] == m} for m in header["baselines"]}
    assert {"sdpa-materialised", "sdpa-concat", "flex-split", "tabattn-graph"} <= by_mode["decode"]
    assert {"flex-tf", "sdpa-mask"} <= by_mode["teacher_forcing"]
    assert not by_mode["decode"] & {"flex-tf", "sdpa-mask"}

    timed = [r for r in rows if r["status"] == "ok"]
    assert {r["mode"] for r in timed if r["provider"] == "reference"} == {
        "decode",
        "teacher_forcing",
    }
    for row in timed:
        assert row["ms"] > 0 and row["max_error"] <= row["rel_tol"], row
        assert set(row["errors"]) >= {"out"}, row
        assert row["ratio_to_floor"] > 0, row
    # The references return an LSE, which is checked; SDPA returns none.
    assert all("lse" in r["errors"] for r in timed if r["provider"] == "reference")
    decode_sdpa = [r for r in timed if r["provider"] == "sdpa-materialised"]
    assert decode_sdpa and all(r["speedup"] == 1.0 for r in decode_sdpa)
    for row in timed:
        others = {r["provider"] for r in timed if r["case"] == row["case"]} - {row["provider"]}
        assert set(row["speedup_vs"]) == others, row

    png = tmp_path / "shared_context.png"
    assert png.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("suite", ["selection", "training_kernels", "training", "fp8", "predictor"])
def test_bench_smoke_other_suites(suite: str, tmp_path: Path) -> None:
    """Every other suite runs end to end on tiny shapes: a complete JSON with its header,
    every row timed or saying why not, and no provider erroring."""
    _run_smoke(suite, tmp_path)
    result = json.loads((tmp_path / f"{suite}.json").read_text())
    header, rows = result["header"], result["rows"]
    assert result["complete"] is True
    assert header["suite"] == suite and header.get("git_commit")
    assert rows
    for row in rows:
        assert row["status"] in ("ok", "skipped", "failed"), row
        assert row["status"] == "ok" or row["reason"], row
    assert any(r["status"] == "ok" and r["ms"] for r in rows), rows


def test_predictor_top_k_accuracy_smoke(tmp_path: Path) -> None:
    """`python -m bench.studies.selection_predictor_accuracy --smoke`: top-k densities differ
    from dense with few blocks and equal them (float64) when k covers the context."""
    _run_ok("bench.studies.selection_predictor_accuracy", "--smoke", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "selection_predictor_accuracy.json").read_text())["rows"]
    assert {r["task"] for r in rows} == {"golden", "synthetic"}
    for r in rows:
        if r["context_fraction"] == 1.0:
            assert r["max_abs_target_nats"] < 1e-9, r
        else:
            assert r["max_abs_target_nats"] > 1e-6, r


def test_selection_crossover_smoke(tmp_path: Path) -> None:
    """`python -m bench.studies.selection_crossover --smoke` (Triton interpreter on CPU):
    op and predictor cells checked and timed on both paths, per-series crossovers, and both
    rules fitted with the names of the constants they fill."""
    _run_ok("bench.studies.selection_crossover", "--smoke", "--device", "cpu",
            "--out", str(tmp_path), interpret=True)  # fmt: skip
    result = json.loads((tmp_path / "selection_crossover.json").read_text())
    assert result["header"]["suite"] == "selection_crossover"
    for level, sizes in (("op", "dense_scores"), ("predictor", "Nc")):
        rows = result[level]["rows"]
        assert rows and all(r["status"] == "ok" for r in rows), rows
        assert all(r["sparse_ms"] > 0 and r["dense_ms"] > 0 and r[sizes] > 0 for r in rows)
        assert result[level]["crossovers"]
    for r in result["op"]["rows"]:
        assert max(r["check"]["rel_err_sparse_vs_dense"].values()) <= r["check"]["bound"]
    assert set(result["rules"]["op"]) >= {"DENSE_MAX_SCORES", "SPARSE_MAX_FRACTION"}
    assert set(result["rules"]["predictor"]) >= {"DENSE_CONTEXT_BELOW", "DENSE_CONTEXT_FRACTION"}


def test_training_ddp_scaling_smoke(tmp_path: Path) -> None:
    """`python -m bench.studies.training_ddp --smoke`: torchrun with 1 and 2 ranks (gloo on
    CPU) trains the tiny model; every run logs tokens/s and the 2-rank run has an efficiency
    against the 1-rank one."""
    _run_ok("bench.studies.training_ddp", "--smoke", "--variants", "sdpa",
            "--worlds", "1,2", "--steps", "21", "--out", str(tmp_path))  # fmt: skip
    result = json.loads((tmp_path / "training_ddp.json").read_text())
    assert result["header"]["worlds"] == [1, 2]
    runs = result["runs"]
    assert set(runs) == {"sdpa x1", "sdpa x2"}, runs
    for run in runs.values():
        assert run["status"] == "ok", run
        assert [r["step"] for r in run["log"]] == [0, 9, 19, 20]
        assert run["tokens_per_s"] > 0 and run["efficiency"] > 0
    assert runs["sdpa x1"]["efficiency"] == 1.0
    assert (tmp_path / "training_ddp.png").read_bytes()[:8] == PNG_MAGIC


def test_graph_timing_needs_cuda(tmp_path: Path) -> None:
    """`--graph` (time CUDA-graph replays) is refused on a CPU device, naming the reason."""
    proc = _run("bench", "training_kernels", "--smoke", "--device", "cpu", "--graph",
                "--out", str(tmp_path), timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "--graph needs a CUDA device" in proc.stderr, proc.stderr


def test_selection_floor_smoke(tmp_path: Path) -> None:
    """`python -m bench.studies.selection_floor --smoke` (Triton interpreter on CPU): the
    gather-floor kernel's sums checked against torch under every config (the command exits
    non-zero otherwise), then dense, selection and floor timed per GQA group."""
    _run_ok("bench.studies.selection_floor", "--smoke", "--device", "cpu",
            "--out", str(tmp_path), interpret=True)  # fmt: skip
    result = json.loads((tmp_path / "selection_floor.json").read_text())
    assert result["header"]["suite"] == "selection_floor"
    assert [r["G"] for r in result["rows"]] == [1, 2]
    for r in result["rows"]:
        assert len(r["floor_ms_by_config"]) == len(result["header"]["floor_configs"])
        assert r["floor_ms"] == min(r["floor_ms_by_config"].values()) > 0
        assert r["dense_ms"] > 0 and r["selection_ms"] > 0
        assert r["dense_over_floor"] == r["dense_ms"] / r["floor_ms"]


def test_training_loss_curve_smoke(tmp_path: Path) -> None:
    """`python -m bench.studies.training_loss_curve --smoke`: the baseline and all-Triton
    tiny models train from one seed (the FP8 one is skipped off sm90, saying why); the two
    logs are compared step by step."""
    _run_ok("bench.studies.training_loss_curve", "--smoke", "--steps", "3",
            "--out", str(tmp_path), interpret=True)  # fmt: skip
    result = json.loads((tmp_path / "training_loss_curve.json").read_text())
    assert result["header"]["suite"] == "training_loss_curve"
    runs = result["runs"]
    assert [runs[v]["status"] for v in ("sdpa", "all-triton")] == ["ok", "ok"], runs
    assert runs["fp8-attention+triton"]["status"] == "ok" or runs["fp8-attention+triton"]["reason"]
    assert [r["step"] for r in runs["sdpa"]["log"]] == [0, 1, 2]
    assert result["max_abs_loss_difference"] >= 0
    assert (tmp_path / "training_loss_curve.png").read_bytes()[:8] == PNG_MAGIC


def test_every_study_records_its_conclusion() -> None:
    """Each study (bench/studies/<name>.py) says how to run it and what it concluded, and
    the studies' index lists it."""
    studies = REPO_ROOT / "bench" / "studies"
    index = ast.get_docstring(ast.parse((studies / "__init__.py").read_text()))
    for path in sorted(studies.glob("[!_]*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert f"python -m bench.studies.{path.stem}" in doc, path.name
        assert "Conclusion" in doc, path.name
        assert f"`{path.stem}`" in index, path.name
