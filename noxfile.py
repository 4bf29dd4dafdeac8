"""nox sessions of the tabattn workspace.

``uv run nox`` runs the CPU set: ``tests`` (each package alone), ``integration`` (all
together), ``wheels`` (each built wheel installed alone) and ``lint``. GPU sessions are
opt-in: ``uv run nox -s "gpu(arch='sm90')"``.

Session environments are filled from the workspace lock (``uv sync --locked``) by pointing
``UV_PROJECT_ENVIRONMENT`` at the session's venv; each package's ``test`` dependency group
brings pytest and hypothesis.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import nox

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

nox.needs_version = ">=2025.2.9"
nox.options.default_venv_backend = "uv"
nox.options.error_on_missing_interpreters = True

ROOT = Path(__file__).parent
PACKAGES = {
    "tabattn-core": "tabattn_core",
    "tabattn-triton": "tabattn_triton",
    "tabattn-fp8": "tabattn_fp8",
    "tabpfn-infer": "tabpfn_infer",
}
# Packages whose tests run Triton kernels; on CPU they run under the interpreter.
TRITON_PACKAGES = {"tabattn-triton", "tabattn-fp8"}
ARCH_MAJOR = {"sm80": 8, "sm90": 9}

nox.options.sessions = ["tests", "integration", "wheels", "lint"]


def _sync(session: nox.Session, *args: str) -> None:
    """Install from uv.lock into this session's venv (fails if the lock is stale)."""
    session.run_install(
        "uv",
        "sync",
        "--locked",
        "--no-default-groups",
        "--group",
        "test",
        *args,
        env={"UV_PROJECT_ENVIRONMENT": session.virtualenv.location},
    )


def _version(package: str) -> str:
    with open(ROOT / "packages" / package / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["version"]


@nox.session
@nox.parametrize("package", list(PACKAGES))
def tests(session: nox.Session, package: str) -> None:
    """One package alone: only it, what it declares, and its test group."""
    _sync(session, "--package", package)
    env = {"TRITON_INTERPRET": "1"} if package in TRITON_PACKAGES else {}
    session.run(
        "pytest",
        f"packages/{package}/tests",
        "-m",
        "not gpu",
        *session.posargs,
        env=env,
    )


@nox.session
def integration(session: nox.Session) -> None:
    """All packages installed together: cross-package tests (the bench smoke run included)."""
    _sync(session, "--all-packages", "--group", "bench")
    session.run(
        "pytest",
        "tests-integration",
        "-m",
        "not gpu",
        *session.posargs,
        env={"TRITON_INTERPRET": "1"},
    )


_WHEEL_CHECK = """\
import importlib, importlib.util, json, sys
from importlib import metadata

dist, module, versions = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
mod = importlib.import_module(module)
assert metadata.version(dist) == versions[dist], (dist, metadata.version(dist))
# Siblings present here are the freshly built ones (same versions as the work tree).
for other, version in versions.items():
    try:
        assert metadata.version(other) == version, (other, metadata.version(other), version)
    except metadata.PackageNotFoundError:
        pass
if dist == "tabattn-core":
    assert importlib.util.find_spec("triton") is None, "triton is installed"
    assert "triton" not in sys.modules, "import tabattn_core imported triton"
    assert not any("triton" in r for r in metadata.requires(dist) or []), metadata.requires(dist)
if dist == "tabpfn-infer":  # the triton extra was not asked for
    assert importlib.util.find_spec("tabattn_triton") is None, "tabattn-triton is installed"
    assert "triton" not in sys.modules, "import tabpfn_infer imported triton"
print(f"ok: {dist} {metadata.version(dist)} imports alone from {mod.__file__}")
"""


@nox.session
def wheels(session: nox.Session) -> None:
    """Build every wheel and sdist; install each wheel alone in a fresh venv and import it.

    Siblings come from the freshly built dist dir (``--find-links``), everything else from
    the package index, unlocked, as a user would get it. torch on Linux pulls triton; the
    tabattn-core venv removes it again to prove core imports without triton.
    """
    tmp = Path(session.create_tmp()).resolve()
    dist = tmp / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    session.run("uv", "build", "--all-packages", "--out-dir", str(dist), external=True)

    check = tmp / "check_wheel.py"
    check.write_text(_WHEEL_CHECK)
    versions = {package: _version(package) for package in PACKAGES}
    for package, module in PACKAGES.items():
        version = versions[package]
        stem = f"{module}-{version}"
        wheels_found = sorted(dist.glob(f"{module}-*.whl"))
        sdists_found = sorted(dist.glob(f"{module}-*.tar.gz"))
        if [w.name for w in wheels_found] != [f"{stem}-py3-none-any.whl"]:
            session.error(f"{package}: expected wheel {stem}-py3-none-any.whl, got {wheels_found}")
        if [s.name for s in sdists_found] != [f"{stem}.tar.gz"]:
            session.error(f"{package}: expected sdist {stem}.tar.gz, got {sdists_found}")

        venv = tmp / f"venv-{package}"
        python = str(venv / "bin" / "python")
        session.run("uv", "venv", "--quiet", "--clear", str(venv), external=True)
        session.run(
            "uv",
            "pip",
            "install",
            "--quiet",
            "--python",
            python,
            "--find-links",
            str(dist),
            # the siblings keep one version while in development: never reuse a cached build
            *(arg for name in PACKAGES for arg in ("--refresh-package", name)),
            str(wheels_found[0]),
            external=True,
        )
        if package == "tabattn-core":
            # torch's Linux wheels depend on triton; core must work without it.
            session.run("uv", "pip", "uninstall", "--python", python, "triton", external=True)
        # Run outside the repository so the source tree cannot shadow the installed wheel.
        with session.chdir(tmp):
            session.run(python, str(check), package, module, json.dumps(versions), external=True)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check over the whole repository."""
    session.run_install(
        "uv",
        "sync",
        "--locked",
        "--only-group",
        "dev",
        env={"UV_PROJECT_ENVIRONMENT": session.virtualenv.location},
    )
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


_GPU_PROBE = """
import sys, torch
want = int(sys.argv[1])
if not torch.cuda.is_available():
    print(f"torch.cuda.is_available()=False (torch {torch.__version__})")
    sys.exit(3)
major, minor = torch.cuda.get_device_capability()
name = torch.cuda.get_device_name()
if major != want:
    print(f"{name} has compute capability {major}.{minor}, want {want}.x")
    sys.exit(3)
print(f"ok: {name} (compute capability {major}.{minor})")
"""


@nox.session
@nox.parametrize("arch", list(ARCH_MAJOR))
def gpu(session: nox.Session, arch: str) -> None:
    """GPU tests of every package; skipped cleanly without a GPU of that architecture."""
    _sync(session, "--all-packages")
    probe = session.run(
        "python",
        "-c",
        _GPU_PROBE,
        str(ARCH_MAJOR[arch]),
        silent=True,
        success_codes=[0, 3],
    )
    probe = (probe or "").strip()
    if not probe.startswith("ok: "):
        session.skip(f"no {arch} GPU here: {probe}; GPU tests not run")
    session.log(f"running {arch} GPU tests on {probe[4:]}")
    marks = "gpu and not sm90" if arch == "sm80" else "gpu"
    # One pytest process per test dir: each package's conftest.py stays its own, and test
    # modules of different packages may share basenames. A package without GPU tests of
    # this kind exits 5 (nothing selected), which is fine here; tests-integration always
    # holds GPU tests, so the session cannot pass having run nothing.
    for package in PACKAGES:
        session.run(
            "pytest",
            f"packages/{package}/tests",
            "-m",
            marks,
            *session.posargs,
            env={"TRITON_INTERPRET": "0"},  # compiled kernels, even if the shell sets it
            success_codes=[0, 5],
        )
    session.run(
        "pytest",
        "tests-integration",
        "-m",
        marks,
        *session.posargs,
        env={"TRITON_INTERPRET": "0"},
    )


@nox.session
def bench(session: nox.Session) -> None:
    """A benchmark suite on this machine's GPU: `nox -s bench -- context_target --out DIR`."""
    _sync(session, "--all-packages", "--group", "bench")
    session.run("python", "-m", "bench", *(session.posargs or ["--help"]))
