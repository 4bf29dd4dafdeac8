"""Grouped MLP: K two-layer MLPs over shared rows, one launch per GEMM (forward and backward)."""

from tabattn_triton.ops.grouped_mlp.interface import grouped_matmul, grouped_mlp

__all__ = ["grouped_matmul", "grouped_mlp"]
