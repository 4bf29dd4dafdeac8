"""The Hopper (Gluon) forward of flash attention.

CPU (CI): every shipped forward config and the backward compile for sm90 under the
installed Triton, without register spills (one exception, named in the test), within shared
memory, with the warp-group register budgets they ask for.
GPU (`-m gpu`, Hopper only): forward, LSE and gradients against the fp64 reference over the
portable kernel's mask matrix, with the sm90 kernels forced (the Gluon forward and
backward); NaN-poisoned outputs (conftest).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from test_attention import compare, compare_varlen, make_inputs

from tabattn_core import masks
from tabattn_core.testing import AttentionShape
from tabattn_triton.ops.attention import flash_attention
from tabattn_triton.ops.attention.dispatch import ENV_KERNEL, choose_kernel
from tabattn_triton.ops.attention.interface import PrefixMask

HOPPER_SMEM_BYTES = 227 * 1024


@pytest.fixture(scope="module")
def compile_report() -> list[dict]:
    """kernel_sm90's compile report, from a fresh Python without the Triton interpreter
    (which replaces Triton's language builtins and so cannot compile Gluon)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-m", "tabattn_triton.ops.attention.kernel_sm90"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_every_config_compiles_for_sm90_without_spills(compile_report):
    from tabattn_triton.ops.attention import kernel_sm90_bwd
    from tabattn_triton.ops.attention.kernel_sm90 import CONSUMER_REGS, compile_cases

    reported = [(kernel, dtype, d, tuple(config), mask) for kernel, dtype, d, config, mask in
                (r["case"] for r in compile_report)]  # fmt: skip
    assert reported == compile_cases()
    for row in compile_report:
        kernel, _, d, config, _ = row["case"]
        spills = row["spill_stores"] + row["spill_loads"]
        # The one known exception: the backward at D=128 (dK, dV [64, 128] fp32 per thread
        # group) spills a few bytes: <= 12 under Triton 3.6, 40-64 under 3.9.
        allowed = 64 if (kernel, d) == ("bwd", 128) else 0
        assert spills <= allowed, row
        assert row["shared"] <= HOPPER_SMEM_BYTES, row
        regs = CONSUMER_REGS[config[2]] if kernel == "fwd" else kernel_sm90_bwd.CONSUMER_REGS
        assert regs in row["setmaxnreg_inc"], row


# ---- GPU (Hopper): the sm90 forward forced -------------------------------------------

SM90_CASES = [
    ("context-d64", AttentionShape(4, 8, 8, 1500, 1000, 64), "context"),
    ("context-d128", AttentionShape(2, 8, 8, 2500, 2000, 128), "context"),
    ("context-odd", AttentionShape(3, 4, 2, 333, 129, 64), "context"),
    ("context-one-key", AttentionShape(2, 2, 1, 70, 1, 128), "context"),
    # M < Lk, and the last CTA's second consumer holds no row (1200 % 128 = 48): it must
    # still take the CTA's key tiles, not the Lk // BLOCK_N tiles its missing rows allow.
    ("context-short-m", AttentionShape(2, 4, 4, 1200, 1000, 64), "context-short-m"),
    ("per-dataset", AttentionShape(3, 8, 8, 1200, 1000, 64), "per-dataset"),
    ("per-dataset-d128", AttentionShape(4, 4, 4, 301, 257, 128), "per-dataset"),
    ("none-gqa4", AttentionShape(2, 8, 2, 777, 1025, 64), "none"),
    ("none-one-query", AttentionShape(5, 4, 4, 1, 300, 128), "none"),
    ("none-b1", AttentionShape(1, 1, 1, 64, 64, 64), "none"),
    ("causal", AttentionShape(2, 8, 2, 1024, 1024, 64), "causal"),
    ("causal-long-keys", AttentionShape(2, 4, 4, 200, 1100, 128), "causal"),
    ("causal-top-left", AttentionShape(2, 4, 4, 300, 190, 64), "causal-top-left"),
    ("ar-rows", AttentionShape(2, 4, 4, 64 + 32 + 512, 64 + 32 + 512, 64), "ar-rows"),
    ("ar-rows-chunked", AttentionShape(2, 4, 2, 7 + 16 + 200, 7 + 16 + 200, 128), "ar-chunks"),
]


def _mask(kind: str, s: AttentionShape):
    if kind == "none":
        return None
    if kind == "context":
        return masks.ContextTargetMask(s.Lq, s.Lk, s.Lk)
    if kind == "context-short-m":
        return masks.ContextTargetMask(s.Lq, s.Lk, 300)
    if kind == "per-dataset":  # one dataset with an empty context: its rows see no key
        lens = torch.tensor([s.Lk, 0, 17, s.Lk // 2][: s.B])
        return masks.ContextTargetMask(s.Lq, s.Lk, lens)
    if kind == "causal":
        return masks.CausalMask(s.Lq, s.Lk)
    if kind == "causal-top-left":
        return masks.CausalMask(s.Lq, s.Lk, align="top_left")
    if kind == "ar-rows":
        return masks.ARTrainingRowMask(64, 32, 512)
    return masks.ARTrainingRowMask(7, 16, 200, attending_chunks=3)


@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name, shape, kind", SM90_CASES, ids=[c[0] for c in SM90_CASES])
def test_gpu_sm90_against_reference(name, shape, kind, dtype, monkeypatch):
    monkeypatch.setenv(ENV_KERNEL, "sm90")
    q, k, v = make_inputs(shape, dtype)
    assert choose_kernel(q, k, v, None, PrefixMask(), lse=True) == "sm90"
    compare(q, k, v, _mask(kind, shape), dtype)


@pytest.mark.gpu
@pytest.mark.sm90
def test_gpu_sm90_rows_that_see_no_key(monkeypatch):
    shape = AttentionShape(2, 4, 4, 300, 200, 64)
    q, k, v = make_inputs(shape, torch.bfloat16)
    mask = masks.ContextTargetMask(300, 200, torch.tensor([0, 130]))
    out, lse = flash_attention(q, k, v, mask=mask, return_lse=True, kernel="sm90")
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[0]).all()
    assert torch.isfinite(lse[1]).all() and torch.isfinite(out).all()


@pytest.mark.gpu
@pytest.mark.sm90
def test_gpu_sm90_strided_layout_matches_portable():
    shape = AttentionShape(2, 8, 4, 513, 700, 128)
    q, k, v = make_inputs(shape, torch.bfloat16, layout="blhd")
    assert not q.is_contiguous()
    mask = masks.ContextTargetMask(513, 700, 650)
    fast = flash_attention(q, k, v, mask=mask, return_lse=True, kernel="sm90")
    plain = flash_attention(q, k, v, mask=mask, return_lse=True, kernel="portable")
    torch.testing.assert_close(fast[1], plain[1], atol=2e-3, rtol=0)
    torch.testing.assert_close(fast[0], plain[0], atol=2e-2, rtol=2e-2)
    compare(q, k, v, mask, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_sm90_varlen(causal, monkeypatch):
    monkeypatch.setenv(ENV_KERNEL, "sm90")
    ms, ns = [1000, 37, 4000, 0, 513], [500, 11, 1000, 64, 700]
    compare_varlen(
        [m + n for m, n in zip(ms, ns, strict=True)], ms, 8, 2, 64, causal, torch.bfloat16
    )


@pytest.mark.gpu
@pytest.mark.sm90
def test_gpu_sm90_deterministic_backward_repeats_bit_for_bit():
    """With torch's deterministic algorithms on, sm90 forced takes the portable backward
    (no dQ atomics): two backward passes give identical gradients."""
    shape = AttentionShape(2, 8, 8, 1500, 1000, 64)
    q, k, v = make_inputs(shape, torch.bfloat16)
    mask = masks.ContextTargetMask(shape.Lq, shape.Lk, shape.Lk)
    grads = []
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        for _ in range(2):
            q.grad = k.grad = v.grad = None
            out = flash_attention(q, k, v, mask=mask, kernel="sm90")
            out.backward(torch.ones_like(out))
            grads.append([t.grad.clone() for t in (q, k, v)])
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
