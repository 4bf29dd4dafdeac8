"""PyTorch references of the FP8 path: per-block E4M3 quantisation, dequantisation and
FP8-emulated attention (kept here, not in tabattn-core, which stays free of FP8 specifics).

Quantisation: for every (batch, head, block of `block` rows along L) one fp32 scale
`amax / 448` (`FP8_MAX`; a block of zeros gets scale 1, and the scale is never below the
smallest normal fp32 so the division cannot overflow), the values divided by it, clamped to
±448 (saturate, never wrap or NaN) and cast to `torch.float8_e4m3fn`. A static scale
(`scale=` a tensor [B, H]) replaces the per-block amax: values beyond ±448 * scale saturate.

K smoothing: subtracting the per-(batch, kv head) mean of the keys shifts every score of a
query row by the same constant `q · mean`, so softmax and the output do not change; the
log-sum-exp does, and `attention` adds `scale * (q · mean)` back so it stays the true LSE.
"""

from __future__ import annotations

import torch

from tabattn_core import reference as core_reference
from tabattn_core.checks import check_scale
from tabattn_core.masks import MaskSpec

__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "SCALE_FLOOR",
    "attention",
    "block_scales",
    "dequantize",
    "key_mean",
    "quantize",
    "value_scale",
]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite E4M3 value
SCALE_FLOOR = torch.finfo(torch.float32).tiny  # a scale never below this (no overflow in x / s)


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """[B, H, L, D] -> [B, H, nb, block, D] zero-padded along L (fp64)."""
    b, h, length, d = x.shape
    nb = -(-length // block)
    padded = x.new_zeros((b, h, nb * block, d), dtype=torch.float64)
    padded[:, :, :length] = x.to(torch.float64)
    return padded.view(b, h, nb, block, d)


def block_scales(x: torch.Tensor, block: int) -> torch.Tensor:
    """Per-block scales [B, H, cdiv(L, block)] (fp32): amax / 448, 1 for an all-zero block."""
    amax = _blocks(x, block).abs().amax(dim=(-1, -2)).to(torch.float32)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return scale.clamp_min(SCALE_FLOOR)


def quantize(
    x: torch.Tensor, *, block: int = 128, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, H, L, D] -> (x8 [B, H, L, D] float8_e4m3fn, scales fp32).

    scale None: per-block scales [B, H, cdiv(L, block)]; else a static scale [B, H] per
    (batch, head), returned as given. Values are divided in fp32, clamped to ±448, then cast.
    """
    length = x.shape[2]
    if scale is None:
        scales = block_scales(x, block)
        per_row = scales.repeat_interleave(block, dim=-1)[..., :length, None]
    else:
        scales = scale
        per_row = scale.to(torch.float32)[:, :, None, None]
    y = x.to(torch.float32) / per_row
    return y.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scales


def dequantize(x8: torch.Tensor, scales: torch.Tensor, *, block: int = 128) -> torch.Tensor:
    """fp64 values of a quantised tensor: x8 * scale of its block (scales [B, H, nb]) or of
    its (batch, head) (scales [B, H])."""
    length = x8.shape[2]
    if scales.dim() == 2:
        per_row = scales[:, :, None, None]
    else:
        per_row = scales.repeat_interleave(block, dim=-1)[..., :length, None]
    return x8.to(torch.float64) * per_row.to(torch.float64)


def key_mean(k: torch.Tensor) -> torch.Tensor:
    """Mean of the keys over Lk per (batch, kv head): [B, H_kv, D] fp32 (zeros if Lk = 0)."""
    if k.shape[2] == 0:
        return k.new_zeros((k.shape[0], k.shape[1], k.shape[3]), dtype=torch.float32)
    return k.mean(dim=2, dtype=torch.float32)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: MaskSpec | None = None,
    scale: float | None = None,
    smooth_k: bool = True,
    quantize_v: bool = True,
    block: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8-emulated attention in fp64: q and (smoothed) k quantised per block, v per
    (batch, head) when `quantize_v`, dequantised and passed to
    `tabattn_core.reference.attention`; the LSE is corrected for the smoothing.

    q [B, H, Lq, D], k/v [B, H_kv, Lk, D]. Returns out [B, H, Lq, D] and lse [B, H, Lq] fp64.
    P is not quantised here (the kernel's P·V error is the gap to this reference).
    """
    scale = check_scale(scale, q.shape[-1])
    group = q.shape[1] // k.shape[1]
    mean = key_mean(k) if smooth_k else torch.zeros_like(key_mean(k))
    q8, sq = quantize(q, block=block)
    k8, sk = quantize(k.to(torch.float32) - mean[:, :, None], block=block)
    if quantize_v:
        v8, sv = quantize(v, scale=value_scale(v))
        v64 = dequantize(v8, sv)
    else:
        v64 = v.to(torch.float64)
    out, lse = core_reference.attention(
        dequantize(q8, sq, block=block),
        dequantize(k8, sk, block=block),
        v64,
        mask=mask,
        scale=scale,
    )
    mean_q = mean.to(torch.float64).repeat_interleave(group, dim=1)[:, :, :, None]
    return out, lse + scale * (q.to(torch.float64) @ mean_q)[..., 0]


def value_scale(v: torch.Tensor) -> torch.Tensor:
    """Per-(batch, head) static scale of V [B, H_kv] fp32: amax over (L, D) / 448 (1 for
    zeros), as the attention path quantises V."""
    if v.shape[2] * v.shape[3] == 0:
        return v.new_ones(v.shape[:2], dtype=torch.float32)
    amax = torch.linalg.vector_norm(v, ord=float("inf"), dim=(2, 3)).to(torch.float32)
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).clamp_min(SCALE_FLOOR)
