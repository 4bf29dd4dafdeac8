"""Per-block E4M3 quantisation: launcher -> public function.

`quantize_fp8` is what the attention path runs on q, k and v; its PyTorch reference is
`tabattn_fp8.reference.quantize`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton

from tabattn_core.checks import InputError, check_tensor
from tabattn_fp8.quantize.kernel import (
    MEAN_NONE,
    MEAN_ROW_DOT,
    MEAN_SUBTRACT,
    quantize_fp8_kernel,
)
from tabattn_fp8.reference import FP8_DTYPE, apply_rotation, key_mean
from tabattn_triton.building_blocks import check_device, head_block, interpreting

__all__ = ["Fp8Tensor", "quantize_fp8", "quantize_fp8_launch"]

INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ALIGN = 16  # bytes: padded row pitch of the fp8 buffers, so rows start 16-byte aligned


@dataclass(frozen=True)
class Fp8Tensor:
    """A quantised [B, H, L, D] tensor: `data` float8_e4m3fn (a view; with `transposed` of
    a [B, H, D, L] buffer whose L axis is contiguous), `scales` fp32 [B, H, cdiv(L, block)]
    (per block of `block` rows) or [B, H] (one static scale per (batch, head)). The value
    of an element is data * its scale; with `rotated` that is the value of the rotated
    tensor (`tabattn_fp8.reference.apply_rotation`)."""

    data: torch.Tensor
    scales: torch.Tensor
    block: int
    transposed: bool = False
    rotated: bool = False

    def dequantize(self) -> torch.Tensor:
        """fp64 values, rotated back when `rotated`."""
        from tabattn_fp8.reference import dequantize

        return dequantize(self.data, self.scales, block=self.block, rotate=self.rotated)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def quantize_fp8_launch(
    x: torch.Tensor,
    *,
    block: int,
    scale: torch.Tensor | None = None,
    mean: torch.Tensor | None = None,
    mean_mode: int = MEAN_NONE,
    group: int = 1,
    transpose: bool = False,
) -> tuple[Fp8Tensor, torch.Tensor | None]:
    """Launch the quantisation of x [B, H, L, D] (checked by the caller). mean: fp32
    [B, H // group, D], subtracted (MEAN_SUBTRACT, group 1) or dotted with the rows
    (MEAN_ROW_DOT: returns row_dot [B, H, L] fp32). scale: static fp32 [B, H] or None."""
    b, h, length, d = x.shape
    if transpose:
        buf = torch.empty((b, h, d, _round_up(length, ALIGN)), device=x.device, dtype=FP8_DTYPE)
        data = buf[..., :length].transpose(2, 3)
    else:
        buf = torch.empty((b, h, length, _round_up(d, ALIGN)), device=x.device, dtype=FP8_DTYPE)
        data = buf[..., :d]
    num_blocks = triton.cdiv(length, block)
    if scale is None:
        scales = torch.empty((b, h, num_blocks), device=x.device, dtype=torch.float32)
    else:
        scales = scale
    row_dot = None
    if mean_mode == MEAN_ROW_DOT:
        row_dot = torch.empty((b, h, length), device=x.device, dtype=torch.float32)
    if data.numel() == 0:
        if row_dot is not None:
            row_dot.zero_()
        return Fp8Tensor(
            data, scales.fill_(1.0) if scale is None else scales, block, transpose
        ), row_dot
    quantize_fp8_kernel[(b * h * num_blocks,)](
        x, data, scales, mean, row_dot,
        *x.stride(), *data.stride(),
        h, group, length, d, num_blocks,
        MEAN_MODE=mean_mode, STATIC_SCALE=scale is not None, ROUND_FIRST=interpreting(),
        BLOCK=block, BLOCK_D=head_block(d),
    )  # fmt: skip
    return Fp8Tensor(data, scales, block, transpose), row_dot


def quantize_fp8(
    x: torch.Tensor,
    *,
    block: int = 128,
    scale: torch.Tensor | None = None,
    subtract_mean: bool = False,
    transpose: bool = False,
    rotate: bool = False,
) -> Fp8Tensor:
    """Quantise x [B, H, L, D] (fp16, bf16 or fp32, any strides with a unit stride on D) to
    E4M3 with one fp32 scale per (batch, head, block of `block` rows): amax / 448 (1 for a
    block of zeros), values clamped to ±448 before the cast (saturate, never NaN).

    scale: a static fp32 scale [B, H] instead (values beyond ±448 * scale saturate).
    subtract_mean: quantise x minus its mean over L per (batch, head) (K smoothing; the mean
    is `tabattn_fp8.reference.key_mean(x)`). transpose: store the data as [B, H, D, L] with
    L contiguous (returned as a [B, H, L, D] view), the layout of V for the FP8 P·V dot.
    rotate: quantise x times the orthogonal matrix `tabattn_fp8.reference.rotation_matrix`
    along D (computed in fp32 first; the mean, if subtracted, is that of the rotated rows).
    block: a power of two, 16..256. Returns an `Fp8Tensor` (`dequantize()` rotates back).
    """
    check_tensor("x", x, ndim=4, dtypes=INPUT_DTYPES, unit_last_stride=True, dims="[B, H, L, D]")
    check_device("x", x)
    if block not in (16, 32, 64, 128, 256):
        raise InputError(f"block: expected a power of two in [16, 256], got {block}")
    if scale is not None:
        check_tensor(
            "scale", scale, shape=x.shape[:2], dtypes=(torch.float32,), device=x.device,
            dims="[B, H]",
        )  # fmt: skip
        scale = scale.contiguous()
    if rotate:
        x = apply_rotation(x)
    mean = key_mean(x) if subtract_mean else None
    mode = MEAN_SUBTRACT if subtract_mean else MEAN_NONE
    quantized, _ = quantize_fp8_launch(
        x, block=block, scale=scale, mean=mean, mean_mode=mode, transpose=transpose
    )
    return replace(quantized, rotated=rotate)
