"""The SDPA drop-in: same results as torch's function for supported calls (our kernel ran),
torch's own function (and one message) for the rest."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

import tabattn_triton.sdpa as sdpa
from tabattn_core.testing import assert_rel_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []
    real = sdpa.flash_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("mask"))
        return real(*args, **kwargs)

    monkeypatch.setattr(sdpa, "flash_attention", spy)
    return calls


@pytest.mark.parametrize(
    "lq, lk, is_causal, gqa",
    [
        (7, 7, True, False),
        (5, 11, True, False),
        (11, 5, True, False),
        (9, 13, False, True),
        (1, 3, False, False),
    ],
)
def test_supported_calls_match_torch(kernel_calls, lq, lk, is_causal, gqa):
    hkv = 2 if gqa else 4
    q = torch.randn(2, 4, lq, 32, device=DEVICE, dtype=torch.float64).float().requires_grad_()
    k = torch.randn(2, hkv, lk, 32, device=DEVICE).requires_grad_()
    v = torch.randn(2, hkv, lk, 32, device=DEVICE).requires_grad_()
    out = sdpa.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=0.2, enable_gqa=gqa)
    assert len(kernel_calls) == 1
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(
        q64, k64, v64, is_causal=is_causal, scale=0.2, enable_gqa=gqa
    )
    tol = torch.float32 if DEVICE == "cpu" else "tf32"
    assert_rel_close(out, ref, dtype=tol)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    for g, rg in zip(grads, ref_grads, strict=True):
        assert_rel_close(g, rg, tol=1e-4 if DEVICE == "cpu" else 1e-3)


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"attn_mask": torch.ones(3, 3, dtype=torch.bool)}, "attn_mask"),
        ({"dropout_p": 0.5}, "dropout_p"),
    ],
)
def test_unsupported_calls_fall_back_and_say_why(kernel_calls, caplog, kwargs, reason):
    q = torch.randn(1, 2, 3, 16, device=DEVICE)
    if "attn_mask" in kwargs:
        kwargs = {"attn_mask": kwargs["attn_mask"].to(DEVICE)}
    caplog.set_level(logging.WARNING, logger="tabattn")
    sdpa._said.clear()
    torch.manual_seed(0)
    out = sdpa.scaled_dot_product_attention(q, q, q, **kwargs)
    torch.manual_seed(0)
    assert torch.equal(out, F.scaled_dot_product_attention(q, q, q, **kwargs))
    sdpa.scaled_dot_product_attention(q, q, q, **kwargs)
    assert kernel_calls == []
    assert sum(reason in r.message for r in caplog.records) == 1


def test_unsupported_reasons():
    q = torch.randn(1, 2, 3, 16, device=DEVICE)
    assert sdpa.unsupported_reason(q[0], q[0], q[0]) is not None
    assert "head dim" in sdpa.unsupported_reason(q[..., :8], q[..., :8], q[..., :8])
    assert "enable_gqa" in sdpa.unsupported_reason(q, q[:, :1], q[:, :1])
    assert sdpa.unsupported_reason(q, q[:, :1], q[:, :1], enable_gqa=True) is None
    assert "dtypes" in sdpa.unsupported_reason(q.double(), q.double(), q.double())
