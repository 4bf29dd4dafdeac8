"""Entry point of the ``fp8`` backend (group ``tabattn.backends``)."""

from __future__ import annotations

import torch

from tabattn_core.contracts import attention_args
from tabattn_core.masks import MaskSpec
from tabattn_core.registry import Backend, Registry

# Below the torch reference (0) and triton (10): FP8 trades accuracy (about 5% relative
# error) for speed, so `auto` never picks it; ask for it by name (backend="fp8" or
# TABATTN_BACKEND=fp8).
PRIORITY = -1


def available(device: torch.device) -> tuple[bool, str]:
    """CUDA devices of compute capability 9.x only (never CPU)."""
    from tabattn_fp8 import require_sm90

    try:
        require_sm90(device)
    except RuntimeError as exc:
        return False, str(exc)
    return True, "FP8 E4M3 Triton kernels on a Hopper GPU (sm90)"


def attention(q, k, v, *, mask: MaskSpec | torch.Tensor | None = None, scale=None):
    """Registry op "attention": FP8 for prefix masks; other masks go to the triton backend's
    op (its kernels or the reference, which it reports)."""
    from tabattn_fp8.attention import fp8_attention
    from tabattn_triton.building_blocks import backend_attention, prefix_mask_of

    attention_args(q, k, v, mask=mask, scale=scale)  # the contract first, as every backend
    prefix = not isinstance(mask, torch.Tensor)
    if prefix and prefix_mask_of(mask, q.shape[2], k.shape[2], q.shape[0]) is not None:
        return fp8_attention(q, k, v, mask=mask, scale=scale, return_lse=True)
    return backend_attention(q, k, v, mask=mask, scale=scale)


def register(registry: Registry) -> None:
    """Register the FP8 kernels with tabattn-core's op registry: ops "attention" (prefix
    masks), "context_target_attention", "shared_context_attention" and
    "teacher_forcing_attention" (forward only: context in FP8, buffer exact), available on
    sm90 only, never chosen by `auto`."""
    from tabattn_fp8.attention import fp8_context_target_attention
    from tabattn_fp8.shared_context import (
        fp8_shared_context_attention,
        fp8_teacher_forcing_attention,
    )

    registry.register_backend(
        Backend(
            name="fp8",
            priority=PRIORITY,
            ops={
                "attention": attention,
                "context_target_attention": fp8_context_target_attention,
                "shared_context_attention": fp8_shared_context_attention,
                "teacher_forcing_attention": fp8_teacher_forcing_attention,
            },
            available=available,
            description="FP8 E4M3 attention forward on Hopper (tabattn-fp8), bf16 backward",
            # Flash kernels, scales computed on the device; no dense ops.
            materialises_scores=False,
            graph_safe=True,
        )
    )
