"""Selection (block-sparse, NSA-style) attention over varlen rows: group-centric kernels."""

from tabattn_triton.ops.selection.interface import selection_attention, validate_block_indices

__all__ = ["selection_attention", "validate_block_indices"]
