"""The README's main job, as a user runs it: `tabpfn-infer demo` with the shipped checkpoint on
the embedded diabetes data."""

from __future__ import annotations

import os
import re
import subprocess
import sys


def test_demo_main_job(tmp_path):
    png = tmp_path / "demo.png"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tabpfn_infer",
            "demo",
            "--n-samples",
            "20",
            "--device",
            "cpu",
            "--out",
            str(png),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},  # as a user runs it
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "data: diabetes" in out and "context 100 rows, targets 25, 20 joint sample paths" in out
    assert "joint log density of the held-out labels" in out
    # the shipped checkpoint predicts held-out progression better than the context's mean
    rmse, baseline = map(float, re.search(r"RMSE (\S+) \(.*: (\S+)\)", out).groups())
    assert rmse < 0.8 * baseline, out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
