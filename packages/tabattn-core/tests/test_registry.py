"""The op registry: the torch backend, automatic choice and its reason, forcing by name or
environment variable, discovery through entry points and known modules, broken backends,
the backends' capability fields."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import sys
import types

import pytest
import torch

from tabattn_core import mlp, reference
from tabattn_core.checks import InputError
from tabattn_core.registry import ATTENTION_OPS, DENSE_OPS, OPS, Backend, Registry, registry


@pytest.fixture
def fresh(monkeypatch):
    """A registry with the torch backend and no discovery."""
    monkeypatch.delenv("TABATTN_BACKEND", raising=False)
    reg = Registry()
    reg.register_backend(next(b for b in registry.backends() if b.name == "torch"))
    reg._discovered = True
    return reg


def fake(name, priority, ops=("attention",), device_type=None):
    def available(device):
        if device_type is None or device.type == device_type:
            return True, "test backend"
        return False, f"needs {device_type}, got {device.type}"

    return Backend(name, priority, {op: (lambda *a, _n=name, **k: _n) for op in ops}, available)


def test_torch_backend_implements_every_op():
    torch_backend = next(b for b in registry.backends() if b.name == "torch")
    assert set(torch_backend.ops) == set(OPS)
    assert torch_backend.ops["attention"] is reference.attention


# (materialises_scores, graph_safe, fused_dense) of the backends shipped in this workspace.
DECLARED = {
    "torch": (True, False, False),
    "triton": (False, True, True),
    "fp8": (False, True, False),
}


@pytest.mark.parametrize("name", DECLARED)
def test_every_backend_declares_its_capabilities(name):
    """Each shipped backend (the kernel packages where they load) declares what it can do,
    consistently with its ops: a backend registering a reference attention op materialises
    the scores and is not graph-safe (the references read tensor lengths on the host); its
    dense ops are fused exactly when they are not core's references."""
    backends = {b.name: b for b in registry.backends()}
    if name not in backends:
        pytest.skip(f"backend {name!r} did not load here ({registry.load_errors})")
    backend = backends[name]
    declared = (backend.materialises_scores, backend.graph_safe, backend.fused_dense)
    assert declared == DECLARED[name]
    references = [op for op in ATTENTION_OPS if backend.ops.get(op) is getattr(reference, op)]
    assert backend.materialises_scores == bool(references)
    assert not (backend.graph_safe and references)
    dense = [op for op in DENSE_OPS if op in backend.ops]
    assert backend.fused_dense == any(backend.ops[op] is not getattr(mlp, op) for op in dense)
    with pytest.raises(dataclasses.FrozenInstanceError):
        backend.graph_safe = not backend.graph_safe


def test_capability_ops_are_registry_ops():
    assert set(ATTENTION_OPS) | set(DENSE_OPS) <= set(OPS)


def test_auto_on_cpu_picks_torch_and_says_why(fresh):
    choice = fresh.choose("auto", device="cpu", op="attention")
    assert choice.backend.name == "torch"
    assert "auto -> torch on cpu" in choice.reason


def test_auto_prefers_priority_then_availability_then_op(fresh):
    fresh.register_backend(fake("gpuonly", 10, device_type="cuda"))
    fresh.register_backend(fake("fast", 5, ops=("attention",)))
    choice = fresh.choose("auto", device="cpu", op="attention")
    assert choice.backend.name == "fast"
    assert "gpuonly: needs cuda, got cpu" in choice.reason
    assert fresh.choose("auto", device="cpu", op="merge_states").backend.name == "torch"
    assert fresh.get_op("attention", device="cpu")() == "fast"


def test_named_and_forced_backends(fresh, monkeypatch):
    fresh.register_backend(fake("fast", 5))
    assert fresh.get_backend("torch", device="cpu").name == "torch"
    monkeypatch.setenv("TABATTN_BACKEND", "torch")
    choice = fresh.choose("auto", device="cpu", op="attention")
    assert choice.backend.name == "torch" and "TABATTN_BACKEND" in choice.reason


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda r: r.choose("nope", device="cpu"), "backend: expected 'auto' or one of"),
        (lambda r: r.choose("gpuonly", device="cpu"), "cannot run on cpu: needs cuda"),
        (
            lambda r: r.choose("fast", device="cpu", op="merge_states"),
            "does not implement op 'merge_states'",
        ),
        (lambda r: r.choose("auto", device="cpu", op="flash"), "op: expected one of"),
        (lambda r: r.register_backend(Backend("x", 1, {"flash": print})), "backend.ops"),
        (
            lambda r: r.register_backend(Backend("x", 1, {"mlp": print}, graph_safe=1)),
            "backend.graph_safe: expected a bool, got 1",
        ),
        (
            lambda r: r.register_backend(Backend("x", 1, {"mlp": print}, materialises_scores=True)),
            "backend.materialises_scores: expected False for a backend without any of",
        ),
        (
            lambda r: r.register_backend(Backend("x", 1, {"attention": print}, fused_dense=True)),
            "backend.fused_dense: expected False for a backend without any of",
        ),
    ],
)
def test_errors_name_the_problem(fresh, call, match):
    fresh.register_backend(fake("gpuonly", 10, device_type="cuda"))
    fresh.register_backend(fake("fast", 5))
    with pytest.raises(InputError, match=match):
        call(fresh)


def test_entry_point_discovery_and_broken_backend(monkeypatch):
    monkeypatch.delenv("TABATTN_BACKEND", raising=False)
    good = types.ModuleType("tabattn_fake_good")
    good.register = lambda reg: reg.register_backend(fake("good", 7))
    bad = types.ModuleType("tabattn_fake_bad")

    def broken(reg):
        raise RuntimeError("no GPU toolchain")

    bad.register = broken
    monkeypatch.setitem(sys.modules, "tabattn_fake_good", good)
    monkeypatch.setitem(sys.modules, "tabattn_fake_bad", bad)
    eps = importlib.metadata.EntryPoints(
        [
            importlib.metadata.EntryPoint("good", "tabattn_fake_good:register", "tabattn.backends"),
            importlib.metadata.EntryPoint("bad", "tabattn_fake_bad:register", "tabattn.backends"),
        ]
    )
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: eps)
    # Only these entry points: the workspace's installed backends (tabattn-triton, -fp8)
    # would otherwise be found as known modules too.
    monkeypatch.setattr(sys.modules["tabattn_core.registry"], "KNOWN_BACKEND_MODULES", ())
    reg = Registry()
    assert [b.name for b in reg.backends()] == ["good"]
    assert "RuntimeError: no GPU toolchain" in reg.load_errors["bad"]


def test_known_module_found_from_source(monkeypatch):
    """Without installed entry points, known backend modules on the path are imported."""
    monkeypatch.delenv("TABATTN_BACKEND", raising=False)
    module = types.ModuleType("tabattn_fake_src")
    module.register = lambda reg: reg.register_backend(fake("fromsource", 3))
    monkeypatch.setitem(sys.modules, "tabattn_fake_src", module)
    monkeypatch.setattr(
        sys.modules["tabattn_core.registry"], "KNOWN_BACKEND_MODULES", ("tabattn_fake_src",)
    )
    monkeypatch.setattr(
        importlib.metadata, "entry_points", lambda group: importlib.metadata.EntryPoints([])
    )
    module.__spec__ = importlib.machinery.ModuleSpec("tabattn_fake_src", None)
    reg = Registry()
    assert [b.name for b in reg.backends()] == ["fromsource"]


def test_get_backend_logs_reason_once(fresh, caplog):
    caplog.set_level("INFO", logger="tabattn")
    fresh.get_backend(device="cpu", op="attention")
    fresh.get_backend(device="cpu", op="attention")
    assert sum("auto -> torch" in r.message for r in caplog.records) == 1


def test_cli_main_job_passes_on_cpu(capsys):
    from tabattn_core.__main__ import main

    assert main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "all ops match the fp64 reference" in out
    assert all(op in out for op in OPS)


def test_core_does_not_import_triton():
    import subprocess

    code = "import sys, tabattn_core, tabattn_core.__main__; print('triton' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"


def test_default_device_follows_cuda_availability():
    choice = registry.choose(device=None)
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert f"on {want}" in choice.reason


def test_package_attribute_registry_is_the_module():
    """`tabattn_core.registry` stays the module (the Registry instance is `.registry` in it)."""
    import tabattn_core

    assert isinstance(tabattn_core.registry, types.ModuleType)
    assert isinstance(tabattn_core.registry.registry, Registry)


def test_self_check_covers_every_op():
    """`tabattn` checks every registry op; a new op without a default problem would be
    skipped silently."""
    from tabattn_core.__main__ import default_problems

    assert set(default_problems(torch.device("cpu"), torch.float32)) == set(OPS)
