"""The benchmark harness end to end on tiny shapes: `python -m bench context_target --smoke`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


def test_bench_smoke_writes_checked_timings_json_and_png(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "context_target", "--smoke", "--out", str(tmp_path)],
        cwd=REPO_ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "| shape | mode | provider |" in proc.stdout

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
