"""All four packages installed together: versions agree with metadata, backends are visible."""

from __future__ import annotations

import importlib
import subprocess
import sys
from importlib import metadata

import pytest

PACKAGES = {
    "tabattn-core": "tabattn_core",
    "tabattn-triton": "tabattn_triton",
    "tabattn-fp8": "tabattn_fp8",
    "tabpfn-infer": "tabpfn_infer",
}


def test_all_packages_import_together_at_their_metadata_versions() -> None:
    for dist, module_name in PACKAGES.items():
        module = importlib.import_module(module_name)
        version = metadata.version(dist)
        # __version__ is optional for core (its author decides); where present it must agree.
        assert getattr(module, "__version__", version) == version, dist
    assert {dist: metadata.version(dist) for dist in PACKAGES} == dict.fromkeys(PACKAGES, "0.1.0")


def test_sibling_requirements_are_satisfied_by_installed_versions() -> None:
    """Each package's declared ranges on its siblings accept the versions installed."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    for dist in PACKAGES:
        for spec in metadata.requires(dist) or []:
            req = Requirement(spec)
            if req.name in PACKAGES and req.marker is None:
                installed = Version(metadata.version(req.name))
                assert req.specifier.contains(installed), f"{dist} needs {req}, has {installed}"


def test_backend_entry_points_visible_and_loadable() -> None:
    eps = {ep.name: ep for ep in metadata.entry_points(group="tabattn.backends")}
    assert eps["triton"].value == "tabattn_triton.backend:register"
    assert eps["fp8"].value == "tabattn_fp8.backend:register"
    assert eps["triton"].dist.name == "tabattn-triton"
    assert eps["fp8"].dist.name == "tabattn-fp8"

    class Registry:
        """Registry-like object; the 0.1.0 backends must accept it without failing."""

        def __getattr__(self, name: str):
            return lambda *args, **kwargs: None

    for name in ("triton", "fp8"):
        assert eps[name].load()(Registry()) is None


@pytest.mark.parametrize(
    "script, args, expected",
    [("tabpfn-infer", ["--version"], "tabattn-fp8 0.1.0")],
)
def test_console_script_sees_all_packages(script: str, args: list[str], expected: str) -> None:
    (ep,) = [ep for ep in metadata.entry_points(group="console_scripts") if ep.name == script]
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys; from {ep.module} import {ep.attr} as m; sys.exit(m({args!r}))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    for dist in PACKAGES:
        assert f"{dist} 0.1.0" in proc.stdout
    assert expected in proc.stdout


def test_core_does_not_import_triton() -> None:
    """Design rule: nothing in core imports triton, even with the kernel packages present."""
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, tabattn_core; print('triton' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout.strip() == "False"


@pytest.mark.gpu
def test_triton_compiles_and_runs_on_the_gpu() -> None:
    """The installed torch and triton agree on this GPU: a tiny kernel compiles and runs."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def scale_kernel(x_ptr, out_ptr, n, alpha, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) * alpha, mask=mask)

    torch.manual_seed(42)
    n = 1000  # not a multiple of BLOCK
    x = torch.randn(n, device="cuda")
    out = torch.full_like(x, float("nan"))
    scale_kernel[(triton.cdiv(n, 128),)](x, out, n, 0.5, BLOCK=128)
    torch.testing.assert_close(out, x * 0.5, rtol=0, atol=0)


@pytest.mark.gpu
def test_fp8_capability_check_agrees_with_the_gpu() -> None:
    import torch

    from tabattn_fp8 import require_sm90

    major, _ = torch.cuda.get_device_capability()
    if major == 9:
        assert require_sm90().type == "cuda"
    else:
        with pytest.raises(RuntimeError, match="compute capability"):
            require_sm90()
