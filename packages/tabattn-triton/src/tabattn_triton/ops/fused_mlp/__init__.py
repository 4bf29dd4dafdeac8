"""Transformer feed-forward block (GEMM + activation epilogue, then GEMM), Triton or torch."""

from tabattn_triton.ops.fused_mlp.interface import DEFAULT_IMPL, IMPLS, mlp

__all__ = ["DEFAULT_IMPL", "IMPLS", "mlp"]
