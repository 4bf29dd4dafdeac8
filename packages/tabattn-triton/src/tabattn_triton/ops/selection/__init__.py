"""Selection (block-sparse, NSA-style) attention over varlen rows: group-centric kernels."""

from tabattn_triton.ops.selection.interface import (
    SPARSE_MAX_FRACTION,
    selection_attention,
)

__all__ = ["SPARSE_MAX_FRACTION", "selection_attention"]
