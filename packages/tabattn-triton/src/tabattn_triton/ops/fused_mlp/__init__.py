"""Transformer feed-forward block (GEMM + activation epilogue, then GEMM)."""

from tabattn_triton.ops.fused_mlp.interface import mlp

__all__ = ["mlp"]
