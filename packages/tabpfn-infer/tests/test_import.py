from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import pytest

import tabpfn_infer
from tabpfn_infer.cli import installed_versions, main


def test_version_matches_metadata() -> None:
    assert tabpfn_infer.__version__ == metadata.version("tabpfn-infer") == "0.1.0"


def test_cli_version_lists_installed_packages(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert "tabpfn-infer 0.1.0" in out
    assert f"tabattn-core {metadata.version('tabattn-core')}" in out


def test_installed_versions_reports_missing_as_none() -> None:
    versions = installed_versions()
    assert versions["tabpfn-infer"] == "0.1.0"
    assert versions["tabattn-core"] is not None
    for dist in ("tabattn-triton", "tabattn-fp8"):
        try:
            expected = metadata.version(dist)
        except metadata.PackageNotFoundError:
            expected = None
        assert versions[dist] == expected


def test_cli_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in ("demo", "train", "sample", "density"))


def test_module_entry_runs() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tabpfn_infer", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "tabpfn-infer 0.1.0" in proc.stdout
