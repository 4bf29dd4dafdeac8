"""Triton kernels, one folder per op: `attention` (flash attention with prefix masks)."""
