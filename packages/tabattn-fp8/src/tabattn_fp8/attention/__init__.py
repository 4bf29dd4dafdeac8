"""FP8 (E4M3) attention forward for prefix masks, with tabattn-triton's backward."""

from tabattn_fp8.attention.interface import (
    FP8AttentionFunction,
    fp8_attention,
    fp8_context_target_attention,
)

__all__ = ["FP8AttentionFunction", "fp8_attention", "fp8_context_target_attention"]
