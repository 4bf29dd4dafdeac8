"""Which kernel runs a flash-attention call (dispatch.py): the requested kernel is checked,
forced kernels that cannot run say why, and "auto" follows the measured rules.

CPU: the choice with the device probes replaced. GPU (Hopper): a call routed to SDPA on
cuDNN matches the fp64 reference in the output and the gradients.
"""

from __future__ import annotations

import pytest
import torch
from test_attention import make_inputs

from tabattn_core import masks, reference
from tabattn_core.checks import InputError
from tabattn_core.testing import AttentionShape, assert_rel_close
from tabattn_triton.ops.attention import dispatch, flash_attention
from tabattn_triton.ops.attention.interface import PrefixMask
from tabattn_triton.ops.common import MASK_AR_ROWS, MASK_CAUSAL, MASK_CONTEXT

ENV = dispatch.ENV_KERNEL


def _qkv(keys: int, d: int = 64, kv_heads: int = 2, grad: bool = False):
    q = torch.zeros(1, 2, 8, d, requires_grad=grad)
    k = torch.zeros(1, kv_heads, keys, d)
    return q, k, k


def test_requested_kernel_is_validated(monkeypatch):
    q, k, v = _qkv(4)
    with pytest.raises(InputError, match="kernel: expected one of"):
        dispatch.choose_kernel(q, k, v, "gluon", PrefixMask(), lse=False)
    monkeypatch.setenv(ENV, "fast")
    with pytest.raises(InputError, match=ENV):
        dispatch.choose_kernel(q, k, v, None, PrefixMask(), lse=False)
    assert dispatch.choose_kernel(q, k, v, "portable", PrefixMask(), lse=False) == "portable"


def test_forced_kernels_say_why_they_cannot_run():
    q, k, v = _qkv(4)
    with pytest.raises(InputError, match="kernel: 'sm90' needs a Hopper"):
        dispatch.choose_kernel(q, k, v, "sm90", PrefixMask(), lse=False)
    with pytest.raises(InputError, match="kernel: 'cudnn' returns no LSE"):
        dispatch.choose_kernel(q, k, v, "cudnn", PrefixMask(), lse=True)
    per_dataset = PrefixMask(MASK_CONTEXT, ctx_lens=torch.tensor([2]))
    with pytest.raises(InputError, match="kernel: 'cudnn' expresses no mask but"):
        dispatch.choose_kernel(q, k, v, "cudnn", per_dataset, lse=False)
    bottom_right = PrefixMask(MASK_CAUSAL, causal_offset=3)
    with pytest.raises(InputError, match="needs Lq = Lk"):
        dispatch.choose_kernel(q, k, v, "cudnn", bottom_right, lse=False)
    with pytest.raises(InputError, match="at least one query and one visible key"):
        dispatch.choose_kernel(q, k, v, "cudnn", PrefixMask(MASK_CONTEXT, ctx_len=0), lse=False)
    with pytest.raises(InputError, match="without GQA"):
        dispatch.choose_kernel(q, k[:, :1], v[:, :1], "cudnn", PrefixMask(), lse=False)
    with pytest.raises(InputError, match="needs fp16 or bf16 CUDA tensors"):
        dispatch.choose_kernel(q, k, v, "cudnn", PrefixMask(), lse=False)


@pytest.fixture
def hopper(monkeypatch):
    """Pretend to be on the measured GPU with both the sm90 kernel and cuDNN available."""
    monkeypatch.setattr(dispatch, "_hopper", lambda q: True)
    monkeypatch.setattr(dispatch, "sm90_unsupported", lambda q, k, v: None)
    monkeypatch.setattr(dispatch, "cudnn_unsupported", lambda q, k, v, pm, lse, varlen: None)


@pytest.mark.parametrize(
    "keys, d, grad, expected",
    [
        (50_000, 64, False, "sm90"),  # our forward is measured faster at D=64, many keys
        (dispatch.OURS_OVER_CUDNN_KEYS[(64, False)], 64, False, "sm90"),
        (dispatch.OURS_OVER_CUDNN_KEYS[(64, False)] - 1, 64, False, "cudnn"),
        (50_000, 64, True, "cudnn"),  # a backward follows: cuDNN measured faster
        (50_000, 128, False, "cudnn"),
        (50_000, 96, False, "sm90"),  # not measured against cuDNN: ours
        (dispatch.SM90_MIN_KEYS - 1, 96, False, "portable"),
    ],
)
def test_auto_follows_the_measured_rules(hopper, keys, d, grad, expected):
    q, k, v = _qkv(keys, d, kv_heads=2, grad=grad)
    assert dispatch.choose_kernel(q, k, v, None, PrefixMask(), lse=False) == expected


def test_auto_without_cudnn_picks_sm90_by_key_count(hopper, monkeypatch):
    monkeypatch.setattr(dispatch, "cudnn_unsupported", lambda *args: "returns no LSE")
    q, k, v = _qkv(dispatch.SM90_MIN_KEYS)
    ar = PrefixMask(MASK_AR_ROWS, ctx_len=2, ar_buffer=1)
    assert dispatch.choose_kernel(q, k, v, None, PrefixMask(), lse=True) == "sm90"
    assert dispatch.choose_kernel(q, k, v, None, ar, lse=True) == "sm90"
    short = PrefixMask(MASK_CONTEXT, ctx_len=dispatch.SM90_MIN_KEYS - 1)  # visible keys count
    assert dispatch.choose_kernel(q, k, v, None, short, lse=True) == "portable"
    monkeypatch.setenv(ENV, "portable")
    assert dispatch.choose_kernel(q, k, v, None, PrefixMask(), lse=False) == "portable"


def test_auto_off_hopper_keeps_our_kernels(hopper, monkeypatch):
    monkeypatch.setattr(dispatch, "_hopper", lambda q: False)
    q, k, v = _qkv(1000)
    assert dispatch.choose_kernel(q, k, v, None, PrefixMask(), lse=False) == "portable"


def test_the_sm90_backward_runs_only_when_sm90_is_forced(monkeypatch):
    assert dispatch.backward_kernel("sm90", "sm90") == "sm90"
    assert dispatch.backward_kernel("sm90", None) == "portable"  # auto: measured slower
    assert dispatch.backward_kernel("portable", None) == "portable"
    monkeypatch.setenv(ENV, "sm90")
    assert dispatch.backward_kernel("sm90", None) == "sm90"


def test_deterministic_algorithms_take_the_portable_backward(monkeypatch):
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert dispatch.backward_kernel("sm90", "sm90") == "portable"
    monkeypatch.setenv(ENV, "sm90")
    assert dispatch.backward_kernel("sm90", None) == "portable"


# ---- GPU (Hopper): calls routed to cuDNN -------------------------------------------------


@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize(
    "shape, mask",
    [
        (AttentionShape(2, 4, 4, 700, 600, 64), masks.ContextTargetMask(700, 600, 450)),
        (AttentionShape(1, 2, 2, 333, 333, 128), masks.CausalMask(333, 333)),
        (AttentionShape(3, 2, 2, 65, 129, 64), None),
    ],
    ids=["context-short-m", "causal", "none"],
)
def test_gpu_cudnn_route_matches_reference(shape, mask):
    q, k, v = make_inputs(shape, torch.bfloat16)
    out = flash_attention(q, k, v, mask=mask, kernel="cudnn")
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_out, _ = reference.attention(q64, k64, v64, mask=mask)
    ref_grads = torch.autograd.grad(ref_out, (q64, k64, v64), do.double())
    assert_rel_close(out, ref_out, dtype=torch.bfloat16, name="out")
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        assert_rel_close(g, rg, dtype=torch.bfloat16, name=name)
