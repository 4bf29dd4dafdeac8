"""A drop-in for `torch.nn.functional.scaled_dot_product_attention`.

    from tabattn_triton.sdpa import scaled_dot_product_attention

Calls our flash-attention kernel for every call it supports (4-D [B, H, L, D] tensors on
CUDA, fp16/bf16/fp32, no `attn_mask`, `dropout_p == 0`, equal query/value head dims in
16..256, unit stride on the head dim, GQA through `enable_gqa`) and torch's own function for
the rest, logging once per reason why (logger "tabattn"). Semantics follow torch's
documentation exactly: `is_causal` is top-left aligned (query i sees keys 0..i, also when
Lq != Lk).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from tabattn_core.checks import MAX_HEAD_DIM, MIN_HEAD_DIM
from tabattn_core.logs import LogOnce
from tabattn_core.masks import CausalMask
from tabattn_triton.ops.attention import flash_attention
from tabattn_triton.ops.common import interpreting
from tabattn_triton.ops.kernel_checks import KERNEL_DTYPES

__all__ = ["scaled_dot_product_attention", "unsupported_reason"]

_said = LogOnce()


def unsupported_reason(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    enable_gqa: bool = False,
) -> str | None:
    """Why our kernel cannot run this call (None when it can)."""
    if attn_mask is not None:
        return "attn_mask is given (explicit masks run in torch)"
    if dropout_p != 0.0:
        return f"dropout_p={dropout_p} (the kernel has no dropout)"
    if not all(isinstance(t, torch.Tensor) for t in (query, key, value)):
        return "query, key and value must be tensors"
    if not query.dim() == key.dim() == value.dim() == 4:
        return f"tensors of {query.dim()} dims (the kernel takes [B, H, L, D])"
    if not query.dtype == key.dtype == value.dtype or query.dtype not in KERNEL_DTYPES:
        return f"dtypes {query.dtype}/{key.dtype}/{value.dtype}"
    on_gpu = query.device.type == "cuda" or (interpreting() and query.device.type == "cpu")
    if not on_gpu or not query.device == key.device == value.device:
        return f"device {query.device}"
    if key.shape != value.shape or query.shape[0] != key.shape[0] or query.shape[3] != key.shape[3]:
        return f"shapes q {list(query.shape)}, k {list(key.shape)}, v {list(value.shape)}"
    if not MIN_HEAD_DIM <= query.shape[3] <= MAX_HEAD_DIM:
        return f"head dim {query.shape[3]} outside [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]"
    h, h_kv = query.shape[1], key.shape[1]
    if h != h_kv and not (enable_gqa and h_kv > 0 and h % h_kv == 0):
        return f"{h} query heads vs {h_kv} key heads without enable_gqa"
    if any(t.stride(-1) != 1 and t.shape[-1] > 1 for t in (query, key, value)):
        return "a non-unit stride on the head dim"
    return None


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """torch's signature and semantics; query [B, H, Lq, D], key/value [B, H_kv, Lk, D]."""
    reason = unsupported_reason(query, key, value, attn_mask, dropout_p, enable_gqa)
    if reason is not None:
        _said(reason, logging.WARNING, "tabattn sdpa: torch fallback: %s", reason)
        kwargs = {"enable_gqa": enable_gqa} if enable_gqa else {}
        return F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            **kwargs,
        )
    mask = CausalMask(query.shape[2], key.shape[2], align="top_left") if is_causal else None
    return flash_attention(query, key, value, mask=mask, scale=scale)
