"""The README's main job, as a user runs it: `tabpfn-infer demo` with the shipped checkpoint."""

from __future__ import annotations

import os
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
    assert "joint log density of the held-out labels" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
