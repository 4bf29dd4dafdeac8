"""Inference linear layer with fused epilogues (bias, activation, residual, layer norm)."""

from tabattn_triton.ops.linear.interface import linear

__all__ = ["linear"]
