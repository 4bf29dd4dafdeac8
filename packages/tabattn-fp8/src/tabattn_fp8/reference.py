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

Rotation (FlashAttention-3's "incoherent processing"): q and k are multiplied along D by one
fixed orthogonal matrix R (`rotation_matrix`), so q Rᵀ (k Rᵀ)ᵀ = q kᵀ, while a few outlier
channels are spread over all D channels and the per-block scales lose far less. Smoothing
runs after the rotation (the mean of the rotated keys is the rotated mean, and
q Rᵀ · mean(k Rᵀ) = q · mean(k), so the LSE correction is unchanged). V is not rotated.
"""

from __future__ import annotations

import functools
import math

import torch

from tabattn_core import reference as core_reference
from tabattn_core.checks import check_scale
from tabattn_core.masks import MaskSpec

__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "SCALE_FLOOR",
    "apply_rotation",
    "attention",
    "block_scales",
    "dequantize",
    "key_mean",
    "quantize",
    "rotation_matrix",
    "round_e4m3",
    "value_scale",
]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite E4M3 value
SCALE_FLOOR = torch.finfo(torch.float32).tiny  # a scale never below this (no overflow in x / s)
ROTATION_SEED = 20240711  # fixed: every call, process and machine uses the same R per D


@functools.cache
def rotation_matrix(d: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The orthogonal [D, D] matrix applied to the rows of q and k: x -> x @ M with
    M = Rᵀ = diag(s) H_D / sqrt(D) (s: seeded random ±1 signs, H_D the Sylvester Hadamard
    matrix) when D is a power of two; otherwise Q of the QR decomposition of a seeded
    Gaussian matrix (signs fixed by diag(R) > 0). Built in fp64 on the CPU, cached per
    (D, device, dtype); the seed is `ROTATION_SEED` + D."""
    gen = torch.Generator().manual_seed(ROTATION_SEED + d)
    if d & (d - 1) == 0:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < d:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        signs = torch.randint(0, 2, (d, 1), generator=gen).to(torch.float64) * 2 - 1
        m = signs * h / math.sqrt(d)
    else:
        m, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
        m = m * torch.sign(torch.diagonal(r))[None, :]
    return m.to(device=device, dtype=dtype)


def apply_rotation(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] @ `rotation_matrix(D)`, computed in fp32 (fp64 for fp64 x) whatever x's
    dtype: a 16-bit copy of R would scale all scores by its rounding of 1 / sqrt(D)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.to(dtype) @ rotation_matrix(x.shape[-1], x.device, dtype)


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


def round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """x (within ±448) rounded to the nearest E4M3 value (ties to even), as float8_e4m3fn."""
    return x.to(torch.float32).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize(
    x: torch.Tensor,
    *,
    block: int = 128,
    scale: torch.Tensor | None = None,
    rotate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, H, L, D] -> (x8 [B, H, L, D] float8_e4m3fn, scales fp32).

    scale None: per-block scales [B, H, cdiv(L, block)]; else a static scale [B, H] per
    (batch, head), returned as given. Values are divided in fp32, clamped to ±448, then cast.
    rotate: quantise `apply_rotation(x)` (undo with `dequantize(..., rotate=True)`).
    """
    if rotate:
        x = apply_rotation(x)
    length = x.shape[2]
    if scale is None:
        scales = block_scales(x, block)
        per_row = scales.repeat_interleave(block, dim=-1)[..., :length, None]
    else:
        scales = scale
        per_row = scale.to(torch.float32)[:, :, None, None]
    return round_e4m3(x.to(torch.float32) / per_row), scales


def dequantize(
    x8: torch.Tensor, scales: torch.Tensor, *, block: int = 128, rotate: bool = False
) -> torch.Tensor:
    """fp64 values of a quantised tensor: x8 * scale of its block (scales [B, H, nb]) or of
    its (batch, head) (scales [B, H]); rotate: rotated back (x8 was `apply_rotation(x)`)."""
    length = x8.shape[2]
    if scales.dim() == 2:
        per_row = scales[:, :, None, None]
    else:
        per_row = scales.repeat_interleave(block, dim=-1)[..., :length, None]
    x = x8.to(torch.float64) * per_row.to(torch.float64)
    if rotate:
        x = x @ rotation_matrix(x.shape[-1], x.device, torch.float64).T
    return x


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
    rotate: bool = True,
    quantize_v: bool = True,
    quantize_p: bool = False,
    block: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8-emulated attention in fp64: q and k rotated (`rotate`, see the module docstring),
    k smoothed, both quantised per block, v per (batch, head) when `quantize_v`; softmax of
    the dequantised scores in fp64; the LSE corrected for the smoothing.

    quantize_p: P rounded to E4M3 as the kernel's FP8 P·V does (448 * exp(s - row max),
    the row sum from the unrounded values). The kernel scales by its running max, this by
    the final row max: the same relative rounding on a shifted grid, so the kernel's output
    differs from this one by a P-rounding error of the same size, not bit for bit.

    q [B, H, Lq, D], k/v [B, H_kv, Lk, D]. Returns out [B, H, Lq, D] and lse [B, H, Lq] fp64.
    """
    scale = check_scale(scale, q.shape[-1])
    group = q.shape[1] // k.shape[1]
    if rotate:
        q, k = apply_rotation(q), apply_rotation(k)
    mean = key_mean(k) if smooth_k else torch.zeros_like(key_mean(k))
    q8, sq = quantize(q, block=block)
    k8, sk = quantize(k.to(torch.float32) - mean[:, :, None], block=block)
    if quantize_v:
        v8, sv = quantize(v, scale=value_scale(v))
        v64 = dequantize(v8, sv)
    else:
        v64 = v.to(torch.float64)
    k64 = dequantize(k8, sk, block=block).repeat_interleave(group, dim=1)
    scores = (dequantize(q8, sq, block=block) @ k64.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask.dense(q.device), float("-inf"))
    p, lse = core_reference.softmax_with_lse(scores, None)
    if quantize_p and p.shape[-1] > 0:
        peak = p.amax(-1, keepdim=True)  # exp(row max - lse); 0 for rows that see nothing
        gain = torch.where(peak > 0, FP8_MAX / peak, torch.ones_like(peak))
        p = round_e4m3(p * gain).to(torch.float64) / gain
    out = p @ v64.repeat_interleave(group, dim=1)
    mean_q = mean.to(torch.float64).repeat_interleave(group, dim=1)[:, :, :, None]
    return out, lse + scale * (q.to(torch.float64) @ mean_q)[..., 0]


def value_scale(v: torch.Tensor) -> torch.Tensor:
    """Per-(batch, head) static scale of V [B, H_kv] fp32: amax over (L, D) / 448 (1 for
    zeros), as the attention path quantises V."""
    if v.shape[2] * v.shape[3] == 0:
        return v.new_ones(v.shape[:2], dtype=torch.float32)
    amax = torch.linalg.vector_norm(v, ord=float("inf"), dim=(2, 3)).to(torch.float32)
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).clamp_min(SCALE_FLOOR)
