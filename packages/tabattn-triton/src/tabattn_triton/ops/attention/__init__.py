"""Flash attention with prefix masks (none, context-target, causal, AR-TabPFN rows)."""

from tabattn_triton.ops.attention.interface import (
    context_target_attention,
    flash_attention,
    prefix_mask_of,
    varlen_attention,
)

__all__ = ["context_target_attention", "flash_attention", "prefix_mask_of", "varlen_attention"]
