"""Per-block E4M3 quantisation (the inputs of the FP8 attention path)."""

from tabattn_fp8.quantize.interface import Fp8Tensor, quantize_fp8

__all__ = ["Fp8Tensor", "quantize_fp8"]
