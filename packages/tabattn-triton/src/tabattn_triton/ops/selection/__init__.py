"""Selection (block-sparse, NSA-style) attention over varlen rows: group-centric kernels."""

from tabattn_triton.ops.selection.interface import (
    DENSE_MAX_SCORES,
    SPARSE_MAX_FRACTION,
    selection_attention,
)

__all__ = ["DENSE_MAX_SCORES", "SPARSE_MAX_FRACTION", "selection_attention"]
