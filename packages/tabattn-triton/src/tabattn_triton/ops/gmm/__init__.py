"""Fused Gaussian-mixture negative log-likelihood (forward and backward)."""

from tabattn_triton.ops.gmm.interface import gmm_nll

__all__ = ["gmm_nll"]
