"""Per-block E4M3 quantisation: kernel against `tabattn_fp8.reference.quantize` (exact on
GPU and, with the interpreter's rounding fix, on CPU), saturation, smoothing, layouts."""

from __future__ import annotations

import pytest
import torch

from tabattn_core.checks import InputError
from tabattn_core.testing import rel_error
from tabattn_fp8 import reference
from tabattn_fp8.quantize import quantize_fp8

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
E4M3_STEP = 2.0**-3  # relative spacing of normal E4M3 values


def assert_same_quantization(got, x, *, block, scale=None, mean=None):
    ref8, ref_scales = reference.quantize(
        x if mean is None else x.float() - mean[:, :, None], block=block, scale=scale
    )
    assert got.data.dtype == torch.float8_e4m3fn and got.data.shape == x.shape
    assert torch.equal(got.scales, ref_scales.to(got.scales.device))
    assert torch.equal(got.data.float(), ref8.float().to(got.data.device))


@pytest.mark.parametrize("transpose", [False, True], ids=["rows", "transposed"])
def test_matches_reference_awkward_shape(transpose):
    # L = 70 over blocks of 32 (a partial last block), D = 48, strided [B, L, H, D] input,
    # a block of zeros (scale 1) and values spread over 8 decades.
    x = torch.randn(2, 70, 3, 48, device=DEVICE).transpose(1, 2)
    x[0, 1, 32:64] = 0.0
    x[1, 2] *= torch.logspace(-4, 4, 48, device=DEVICE)
    got = quantize_fp8(x, block=32, transpose=transpose)
    assert_same_quantization(got, x, block=32)
    assert got.scales[0, 1, 1] == 1.0
    if transpose:  # V layout: L contiguous, rows 16-byte aligned
        assert got.data.stride(2) == 1 and got.data.stride(3) % 16 == 0


def test_static_scale_saturates():
    # Static per-(batch, head) scale: values beyond 448 * scale saturate to ±448, never wrap
    # or become NaN/inf; fp16 input.
    x = torch.randn(1, 2, 40, 32, device=DEVICE).half()
    x[0, 0, 3, :4] = torch.tensor([1e3, -1e3, 6e4, -6e4])
    scale = torch.full((1, 2), 0.5, device=DEVICE)
    got = quantize_fp8(x, scale=scale)
    values = got.data.float()
    assert torch.isfinite(values).all()
    assert values[0, 0, 3, :4].tolist() == [448.0, -448.0, 448.0, -448.0]
    assert_same_quantization(got, x, block=128, scale=scale)


def test_extreme_magnitudes_stay_finite():
    # fp32 extremes: amax near fp32 max, and a block of subnormals (scale floored at the
    # smallest normal, so x / scale cannot overflow).
    x = torch.randn(1, 1, 64, 16, device=DEVICE)
    x[0, 0, :32] *= 1e37
    x[0, 0, 32:] *= 1e-41
    got = quantize_fp8(x, block=32)
    assert torch.isfinite(got.data.float()).all() and torch.isfinite(got.scales).all()
    assert_same_quantization(got, x, block=32)
    big = got.dequantize()[0, 0, :32]
    assert (big - x[0, 0, :32].double()).abs().max() <= E4M3_STEP / 2 * big.abs().max()


def test_subtract_mean():
    x = torch.randn(2, 3, 50, 64, device=DEVICE) + 5.0
    got = quantize_fp8(x, block=16, subtract_mean=True)
    assert_same_quantization(got, x, block=16, mean=reference.key_mean(x))
    centred = got.dequantize() + reference.key_mean(x).double()[:, :, None]
    # E4M3 error relative to |x - mean| ~ 1, not |x| ~ 5 (which would give ~3.5%)
    assert rel_error(centred, x) < 0.015


def test_rotate_matches_reference_and_round_trips():
    # Rotated along D (fp32 GEMM), mean subtracted, then quantised: the same bits as the
    # reference; dequantize() rotates back.
    x = torch.randn(1, 2, 50, 64, device=DEVICE)
    x[..., :2] *= 100.0
    got = quantize_fp8(x, block=16, rotate=True, subtract_mean=True)
    ref8, ref_scales = reference.quantize(
        reference.apply_rotation(x) - reference.key_mean(reference.apply_rotation(x))[:, :, None],
        block=16,
    )
    assert torch.equal(got.scales, ref_scales.to(got.scales.device))
    assert torch.equal(got.data.float(), ref8.float().to(got.data.device))
    assert got.rotated and not quantize_fp8(x).rotated
    # E4M3 rounding of the rotated values only (measured 0.026; unrotated back: ~1)
    assert rel_error(quantize_fp8(x, block=16, rotate=True).dequantize(), x) < 0.035


def test_reference_round_trip_error():
    # Normal-range values round to nearest E4M3: relative error at most half a step.
    x = torch.randn(2, 2, 100, 32, dtype=torch.float64)
    x8, scales = reference.quantize(x, block=32)
    back = reference.dequantize(x8, scales, block=32)
    normal = x.abs() >= scales.repeat_interleave(32, -1)[..., :100, None] * 2.0**-6
    rel = ((back - x).abs() / x.abs())[normal]
    assert rel.max() <= E4M3_STEP / 2 + 1e-12
    assert x8.float().abs().max() == 448.0  # every block's amax maps to 448


def test_bad_arguments_named():
    x = torch.randn(1, 1, 8, 16, device=DEVICE)
    with pytest.raises(InputError, match="block"):
        quantize_fp8(x, block=48)
    with pytest.raises(InputError, match=r"scale: expected shape \[1, 1\]"):
        quantize_fp8(x, scale=torch.ones(2, device=DEVICE))
    with pytest.raises(InputError, match="x: expected dtype"):
        quantize_fp8(x.double())
