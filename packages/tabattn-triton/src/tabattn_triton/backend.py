"""Entry point of the `triton` backend (group `tabattn.backends`)."""

from __future__ import annotations

import logging

import torch

from tabattn_core import reference
from tabattn_core.contracts import attention_args
from tabattn_core.logs import LogOnce
from tabattn_core.masks import MaskSpec
from tabattn_core.registry import Backend, Registry

_said = LogOnce()

PRIORITY = 10


def available(device: torch.device) -> tuple[bool, str]:
    """CUDA devices; CPU only under the Triton interpreter (TRITON_INTERPRET=1)."""
    from tabattn_triton.ops.common import interpreting

    if device.type == "cuda":
        return True, "Triton kernels on CUDA"
    if device.type == "cpu" and interpreting():
        return True, "Triton interpreter on CPU (TRITON_INTERPRET=1)"
    return False, f"Triton kernels need a CUDA device, got {device.type}"


def attention(q, k, v, *, mask: MaskSpec | torch.Tensor | None = None, scale=None):
    """Registry op "attention": the kernel for prefix masks, the reference for the rest
    (saying once why). The contract is checked first, so that bad input raises the same error
    whichever path runs."""
    from tabattn_triton.ops.attention import flash_attention, prefix_mask_of

    attention_args(q, k, v, mask=mask, scale=scale)
    prefix = not isinstance(mask, torch.Tensor)
    if prefix and prefix_mask_of(mask, q.shape[2], k.shape[2], q.shape[0]) is not None:
        return flash_attention(q, k, v, mask=mask, scale=scale, return_lse=True)
    why = f"mask {type(mask).__name__} is not a prefix mask"
    message = "tabattn triton backend: attention runs the PyTorch reference: %s"
    _said(why, logging.WARNING, message, why)
    return reference.attention(q, k, v, mask=mask, scale=scale)


def register(registry: Registry) -> None:
    """Register the Triton kernels with tabattn-core's op registry."""
    from tabattn_triton.ops.attention import context_target_attention, varlen_attention
    from tabattn_triton.ops.fused_mlp import mlp
    from tabattn_triton.ops.gmm import gmm_nll
    from tabattn_triton.ops.grouped_mlp import grouped_mlp
    from tabattn_triton.ops.linear import linear
    from tabattn_triton.ops.selection import selection_attention
    from tabattn_triton.ops.shared_context import (
        shared_context_attention,
        teacher_forcing_attention,
    )

    registry.register_backend(
        Backend(
            name="triton",
            priority=PRIORITY,
            ops={
                "attention": attention,
                "context_target_attention": context_target_attention,
                "varlen_attention": varlen_attention,
                "shared_context_attention": shared_context_attention,
                "teacher_forcing_attention": teacher_forcing_attention,
                "selection_attention": selection_attention,
                "gmm_nll": gmm_nll,
                "grouped_mlp": grouped_mlp,
                "mlp": mlp,
                "linear": linear,
            },
            available=available,
            description="Triton kernels (tabattn-triton)",
            # Flash kernels (only "attention" with a mask that is not a prefix mask runs the
            # reference, reported once); lengths read on the device, varlen offsets read on
            # the host once per tensor (remembered).
            materialises_scores=False,
            graph_safe=True,
            fused_dense=True,
        )
    )
