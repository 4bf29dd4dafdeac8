"""Which kernel runs a flash-attention call: the Hopper forward of kernel_sm90.py, the
portable Triton kernels, or torch's SDPA on cuDNN for the calls it can express.

`kernel` (an argument, else the TABATTN_ATTENTION_KERNEL environment variable, else
"auto") is one of KERNELS. "sm90", "portable" and "cudnn" force that kernel (an
`InputError` says why it cannot run a call); "auto" takes the fastest of them by the
measured rules below, and logs each choice once.
"""

from __future__ import annotations

import logging
import os
from functools import cache

import torch

from tabattn_core.checks import InputError
from tabattn_core.logs import LogOnce
from tabattn_triton.ops.common import MASK_CAUSAL, MASK_CONTEXT, MASK_NONE

__all__ = [
    "ENV_KERNEL",
    "backward_kernel",
    "KERNELS",
    "choose_kernel",
    "cudnn_attention",
    "cudnn_unsupported",
    "requested_kernel",
    "sm90_unsupported",
]

ENV_KERNEL = "TABATTN_ATTENTION_KERNEL"
KERNELS = ("auto", "sm90", "portable", "cudnn")

# Measured rules of "auto" (bench/results/context_target.json: H200, bf16, H=8, context-
# target shapes with Lk = 1024 ... 50000 keys; tests-integration checks them against it).
# The sm90 forward beats the portable one from SM90_MIN_KEYS keys on (below, its CTAs are
# mostly prologue and epilogue: 0.80x vs 0.86x cuDNN at D=64, 0.53x vs 0.68x at D=128 with
# 1024 keys). cuDNN beats both except in the forward at D=64 from OURS_OVER_CUDNN_KEYS keys
# on (1.07-1.09x at 10k-50k keys); with a backward to run (ours is the portable one) it
# wins at every measured shape. Head dims that were not measured keep our kernels.
# The sm90 backward (kernel_sm90_bwd.py) runs only when "sm90" is forced: it is slower
# than the portable backward (fwd+bwd 21.7 vs 18.4 ms at D=64, 20k keys; 39.6 vs 30.2 ms
# at D=128; bench/results/context_target_sm90_bwd.json), so "auto" pairs the sm90 forward
# with the portable backward.
SM90_MIN_KEYS = 4096
CUDNN_HEAD_DIMS = (64, 128)
OURS_OVER_CUDNN_KEYS = {(64, False): 8192}  # (head dim, backward follows) -> keys

_said = LogOnce()


@cache
def _sm90_device(index: int) -> bool:
    """A Hopper GPU and a Triton with Gluon's Hopper API."""
    if torch.cuda.get_device_capability(index) != (9, 0):
        return False
    try:
        from tabattn_triton.ops.attention import kernel_sm90  # noqa: F401
    except ImportError as exc:
        why = f"the sm90 kernel is unavailable ({exc}); the portable kernel runs"
        _said(why, logging.WARNING, "tabattn attention: %s", why)
        return False
    return True


def sm90_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the sm90 forward cannot run these inputs, or None when it can."""
    if q.device.type != "cuda" or not _sm90_device(q.device.index or 0):
        return f"needs a Hopper (sm90) GPU, got {q.device}"
    from tabattn_triton.ops.attention.kernel_sm90 import SM90_HEAD_DIMS

    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"needs fp16 or bf16, got {q.dtype}"
    if q.shape[3] not in SM90_HEAD_DIMS:
        return f"needs head dim in {SM90_HEAD_DIMS}, got {q.shape[3]}"
    if k.shape[2] == 0:
        return "needs at least one key"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.data_ptr() % 16 or any(st % 8 for st in t.stride()[:3]):
            return f"needs 16-byte aligned {name} (base and strides), got strides {t.stride()}"
    return None


def cudnn_unsupported(q, k, v, pm, lse: bool, varlen: bool) -> str | None:
    """Why SDPA on cuDNN cannot compute this call, or None when it can: no mask, one
    context length (k/v sliced to it) or causal with Lq = Lk; no LSE asked; no GQA."""
    if lse or varlen:
        return "returns no LSE" if lse else "takes no packed sequences here"
    if pm.kind not in (MASK_NONE, MASK_CONTEXT, MASK_CAUSAL) or pm.ctx_lens is not None:
        return "expresses no mask but none, one context length and causal"
    if pm.kind == MASK_CAUSAL and pm.causal_offset != 0:
        return "aligns causal masks top-left: needs Lq = Lk"
    keys = pm.ctx_len if pm.kind == MASK_CONTEXT else k.shape[2]
    if keys == 0 or q.shape[2] == 0 or q.shape[0] * q.shape[1] == 0:
        return "needs at least one query and one visible key"
    if q.shape[1] != k.shape[1]:
        return f"is used here without GQA, got {q.shape[1]} query and {k.shape[1]} kv heads"
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        return f"needs fp16 or bf16 CUDA tensors, got {q.dtype} on {q.device}"
    k, v = k[:, :, :keys], v[:, :, :keys]
    params = torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, pm.kind == MASK_CAUSAL, False)
    if not torch.backends.cuda.can_use_cudnn_attention(params):
        return "declines these inputs (torch.backends.cuda.can_use_cudnn_attention)"
    return None


def cudnn_attention(q, k, v, pm, scale: float) -> torch.Tensor:
    """The call on SDPA's cuDNN backend (see `cudnn_unsupported`); autograd is torch's."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if pm.kind == MASK_CONTEXT:
        k, v = k[:, :, : pm.ctx_len], v[:, :, : pm.ctx_len]
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=pm.kind == MASK_CAUSAL, scale=scale
        )


def _hopper(q: torch.Tensor) -> bool:
    """Whether q is on the GPU kind the rules were measured on."""
    return q.device.type == "cuda" and torch.cuda.get_device_capability(q.device) == (9, 0)


def _auto(q, k, v, pm, lse: bool, varlen: bool, backward: bool) -> tuple[str, str]:
    """The measured choice of "auto" and its reason."""
    d = q.shape[3]
    keys = pm.ctx_len if pm.kind == MASK_CONTEXT and pm.ctx_lens is None else k.shape[2]
    sm90_why = sm90_unsupported(q, k, v)
    ours = "sm90" if sm90_why is None and keys >= SM90_MIN_KEYS else "portable"
    measured = _hopper(q) and d in CUDNN_HEAD_DIMS
    if measured and cudnn_unsupported(q, k, v, pm, lse, varlen) is None:
        wins_from = OURS_OVER_CUDNN_KEYS.get((d, backward))
        if wins_from is None or keys < wins_from or ours != "sm90":
            return "cudnn", f"measured faster at D={d}, {keys} keys, backward={backward}"
    if ours == "sm90":
        return ours, f"{keys} >= {SM90_MIN_KEYS} keys"
    return ours, sm90_why or f"{keys} < {SM90_MIN_KEYS} keys"


def requested_kernel(kernel: str | None) -> str:
    """`kernel`, else TABATTN_ATTENTION_KERNEL, else "auto"; checked against KERNELS."""
    choice = kernel or os.environ.get(ENV_KERNEL, "auto")
    if choice not in KERNELS:
        source = "kernel" if kernel else ENV_KERNEL
        raise InputError(f"{source}: expected one of {KERNELS}, got {choice!r}")
    return choice


def choose_kernel(q, k, v, kernel: str | None, pm, *, lse: bool, varlen: bool = False) -> str:
    """ "sm90", "portable" or "cudnn" for this call (see the module docstring). `lse`: the
    caller needs the LSE; `varlen`: q, k, v are packed sequences."""
    choice = requested_kernel(kernel)
    if choice == "portable":
        return choice
    if choice != "auto":
        check = sm90_unsupported(q, k, v) if choice == "sm90" else None
        if choice == "cudnn":
            check = cudnn_unsupported(q, k, v, pm, lse, varlen)
        if check is not None:
            raise InputError(f"kernel: {choice!r} {check}")
        return choice
    backward = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    name, why = _auto(q, k, v, pm, lse, varlen, backward)
    key = (name, q.shape[3], q.dtype, pm.kind, backward)
    _said(key, logging.INFO, "tabattn attention: auto takes %s (%s)", name, why)
    return name


def backward_kernel(forward: str, kernel: str | None) -> str:
    """The backward after forward kernel `forward`: the sm90 one only when "sm90" is
    forced (see above), else the portable one. With torch's deterministic algorithms on
    (`torch.use_deterministic_algorithms`) always the portable one: it computes dQ in a
    kernel of its own, while the sm90 backward adds dQ with fp32 atomics in no fixed order."""
    if torch.are_deterministic_algorithms_enabled():
        return "portable"
    return "sm90" if forward == "sm90" and requested_kernel(kernel) == "sm90" else "portable"
