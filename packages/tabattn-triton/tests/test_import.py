from __future__ import annotations

import os
from importlib import metadata

import pytest
import torch

import tabattn_triton
from tabattn_triton.backend import register


def test_version_matches_metadata() -> None:
    assert tabattn_triton.__version__ == metadata.version("tabattn-triton") == "0.1.0"


def test_entry_point_declared() -> None:
    eps = metadata.entry_points(group="tabattn.backends")
    (ep,) = [ep for ep in eps if ep.name == "triton"]
    assert ep.value == "tabattn_triton.backend:register"
    assert ep.load() is register


def test_register_adds_the_triton_backend() -> None:
    from tabattn_core.registry import OPS, Registry

    registry = Registry()
    registry._discovered = True  # only what register() adds
    register(registry)
    (backend,) = registry.backends()
    assert backend.name == "triton" and set(backend.ops) <= set(OPS)
    assert {"attention", "context_target_attention"} <= set(backend.ops)
    ok, why = backend.available(torch.device("meta"))
    assert not ok and "CUDA" in why


def test_core_registry_finds_triton_backend() -> None:
    from tabattn_core.registry import registry

    assert "triton" in {b.name for b in registry.backends()}
    if os.environ.get("TRITON_INTERPRET") == "1":
        choice = registry.choose("auto", device="cpu", op="context_target_attention")
        assert choice.backend.name == "triton" and "interpreter" in choice.reason


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs TRITON_INTERPRET=1 (set by nox) or a CUDA GPU",
)
def test_triton_add_kernel_runs() -> None:
    """A tiny @triton.jit kernel runs: under the interpreter on CPU, natively on a GPU."""
    import triton
    import triton.language as tl

    @triton.jit
    def add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask)
        y = tl.load(y_ptr + offs, mask=mask)
        tl.store(out_ptr + offs, x + y, mask=mask)

    device = (
        "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    )
    torch.manual_seed(42)
    n = 111  # not a multiple of BLOCK: exercises the mask
    x = torch.randn(n, device=device)
    y = torch.randn(n, device=device)
    out = torch.full_like(x, float("nan"))
    add_kernel[(triton.cdiv(n, 32),)](x, y, out, n, BLOCK=32)
    torch.testing.assert_close(out, x + y, rtol=0, atol=0)
