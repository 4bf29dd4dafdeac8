"""FP8 attention against the fp64 reference (tabattn_core.reference.attention) and the
FP8-emulated reference (tabattn_fp8.reference.attention): output, true LSE (with K
smoothing), the q/k rotation (exactness, outlier channels), empty rows, saturation,
backward, device checks and the registry backend.

CPU: the Triton interpreter, fp32 inputs, tiny shapes. GPU (`-m gpu`, Hopper): bf16 at
real sizes, with bounds that a wrong scale (off by 2x) or a missing saturation break.
"""

from __future__ import annotations

import pytest
import torch

from tabattn_core import masks
from tabattn_core import reference as core_reference
from tabattn_core.checks import InputError
from tabattn_core.registry import Registry
from tabattn_core.testing import AttentionShape, assert_rel_close, rel_error
from tabattn_fp8 import backend, reference
from tabattn_fp8.attention import fp8_attention, fp8_context_target_attention
from tabattn_triton.building_blocks import flash_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Relative L2 error against fp64 on Gaussian inputs (measured ~0.03-0.06; a 2x scale error
# gives > 0.3) and the cosine similarity that goes with it.
FP8_REL_TOL = 0.08
FP8_COSINE = 0.996
LSE_REL_TOL = 1e-2

MASKS = {
    "none": lambda s: None,
    "context": lambda s: masks.ContextTargetMask(s.Lq, s.Lk, s.Lk - 7),
    # dataset lengths 0 (when B > 1: a dataset whose rows see no key) up to Lk
    "context-per-dataset": lambda s: masks.ContextTargetMask(
        s.Lq, s.Lk, torch.tensor([(i + (s.B == 1)) * s.Lk // max(s.B - 1, 1) for i in range(s.B)])
    ),
    "causal": lambda s: masks.CausalMask(s.Lq, s.Lk),
    "ar-rows": lambda s: (
        masks.ARTrainingRowMask(20, 10, s.Lq - 30, attending_chunks=1) if s.Lq == s.Lk else None
    ),
}
# GQA 4:2, Lq 70 over Lk 45 (partial tiles), D 48 (padded); B=1 one query over 33 keys.
SHAPES = [AttentionShape(2, 4, 2, 70, 45, 48), AttentionShape(1, 2, 1, 1, 33, 32)]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten().to(a.device)
    return float(a @ b / (a.norm() * b.norm()))


def exact(q, k, v, mask=None):
    return core_reference.attention(q.double(), k.double(), v.double(), mask=mask)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mask_name", ["none", "context-per-dataset", "causal"])
def test_matches_emulated_and_exact_reference(shape, mask_name):
    q, k, v = (t.to(DEVICE) for t in core_reference_inputs(shape))
    mask = MASKS[mask_name](shape)
    ref_out, ref_lse = exact(q, k, v, mask)
    for p_fp8 in (False, True):
        out, lse = fp8_attention(q, k, v, mask=mask, p_fp8=p_fp8, return_lse=True)
        emu_out, emu_lse = reference.attention(q, k, v, mask=mask, quantize_v=p_fp8)
        # Without p_fp8 the kernel computes the emulated reference up to fp32 rounding;
        # with it, P's E4M3 rounding adds a few percent.
        assert_rel_close(out, emu_out, tol=1e-5 if not p_fp8 else 0.05, name="out vs emulated")
        assert_rel_close(lse, emu_lse, tol=1e-5, name="lse vs emulated")
        assert_rel_close(out, ref_out, tol=FP8_REL_TOL, name="out vs fp64")
        assert_rel_close(lse, ref_lse, tol=LSE_REL_TOL, name="lse vs fp64")
        assert out.dtype == q.dtype and lse.dtype == torch.float32


def core_reference_inputs(shape: AttentionShape):
    q = torch.randn(shape.B, shape.H, shape.Lq, shape.D)
    k = torch.randn(shape.B, shape.H_kv, shape.Lk, shape.D)
    v = torch.randn(shape.B, shape.H_kv, shape.Lk, shape.D)
    return q, k, v


def test_smoothing_keeps_out_and_true_lse():
    # Keys with a large common offset: q · mean shifts each row's scores by ~±20. Smoothing
    # removes it before quantisation (better accuracy) and adds it back to the LSE.
    shape = AttentionShape(1, 2, 2, 40, 40, 32)
    q, k, v = (t.to(DEVICE) for t in core_reference_inputs(shape))
    k = k + 4.0
    ref_out, ref_lse = exact(q, k, v)
    smooth_out, smooth_lse = fp8_attention(q, k, v, smooth_k=True, p_fp8=False, return_lse=True)
    plain_out, plain_lse = fp8_attention(q, k, v, smooth_k=False, p_fp8=False, return_lse=True)
    # without the q · mean correction the LSE would be off by ~20 (relative error ~1)
    assert_rel_close(smooth_lse, ref_lse, tol=LSE_REL_TOL, name="smoothed lse")
    assert rel_error(smooth_lse, ref_lse) < rel_error(plain_lse, ref_lse)
    assert rel_error(smooth_out, ref_out) < 0.6 * rel_error(plain_out, ref_out)
    assert rel_error(smooth_out, ref_out) < FP8_REL_TOL


def outlier_inputs(shape: AttentionShape, channels: int = 2, factor: float = 100.0):
    """Gaussian q, k, v with `channels` channels of q and k `factor` times larger (the bench
    suite's outlier inputs)."""
    q, k, v = core_reference_inputs(shape)
    q[..., :channels] *= factor
    k[..., :channels] *= factor
    return q, k, v


@pytest.mark.parametrize("d", [64, 48], ids=["hadamard-64", "qr-48"])
def test_rotation_is_orthogonal_cached_and_exact(d):
    m = reference.rotation_matrix(d, torch.device("cpu"), torch.float64)
    assert m is reference.rotation_matrix(d, torch.device("cpu"), torch.float64)
    assert torch.allclose(m @ m.T, torch.eye(d, dtype=torch.float64), atol=1e-12)
    if d == 64:  # random signs times a Hadamard matrix: every entry ±1/8
        assert torch.equal(m.abs(), torch.full_like(m, 0.125))
    # q Rᵀ (k Rᵀ)ᵀ = q kᵀ: exact attention (out and LSE) unchanged, and the smoothing's LSE
    # correction q · mean(k) is the same computed from the rotated q and k.
    q, k, v = (t.double() for t in core_reference_inputs(AttentionShape(2, 4, 2, 30, 50, d)))
    k = k + 3.0
    qr, kr = reference.apply_rotation(q), reference.apply_rotation(k)
    for got, want in zip(exact(qr, kr, v), exact(q, k, v), strict=True):
        assert_rel_close(got, want, tol=1e-12)
    mean, mean_r = reference.key_mean(k).double(), reference.key_mean(kr).double()
    dot = q @ mean.repeat_interleave(2, 1)[..., None]
    assert_rel_close(qr @ mean_r.repeat_interleave(2, 1)[..., None], dot, tol=1e-6)


def test_rotation_recovers_outlier_channels():
    # FP8 emulation (fp64, CPU): two q/k channels 100x larger. The rotation spreads them
    # over all 128 channels; measured LSE error 0.004-0.007 rotated vs 0.025-0.028 not
    # (seeds 42-47), out 0.10-0.25 vs 0.27-0.53 (bench/studies/fp8_emulated_accuracy.py).
    q, k, v = outlier_inputs(AttentionShape(1, 2, 2, 768, 1024, 128))
    ref_out, ref_lse = exact(q, k, v)
    rot_out, rot_lse = reference.attention(q, k, v, rotate=True, quantize_v=False)
    out, lse = reference.attention(q, k, v, rotate=False, quantize_v=False)
    assert rel_error(rot_lse, ref_lse) < 0.012 < rel_error(lse, ref_lse)
    assert rel_error(rot_out, ref_out) < 0.3
    assert rel_error(rot_out, ref_out) < 0.75 * rel_error(out, ref_out)


@pytest.mark.parametrize("rotate", [True, False], ids=["rotate", "no-rotate"])
def test_kernel_rotation_matches_emulated_on_outliers(rotate):
    # The kernel must quantise exactly what the reference does: with P·V unquantised it
    # matches to fp32 rounding, so a kernel that dropped (or misapplied) the rotation fails.
    q, k, v = (t.to(DEVICE) for t in outlier_inputs(AttentionShape(1, 2, 1, 40, 72, 64)))
    mask = masks.CausalMask(40, 72)
    out, lse = fp8_attention(q, k, v, mask=mask, p_fp8=False, rotate=rotate, return_lse=True)
    emu_out, emu_lse = reference.attention(q, k, v, mask=mask, rotate=rotate, quantize_v=False)
    other_out, _ = reference.attention(q, k, v, mask=mask, rotate=not rotate, quantize_v=False)
    assert_rel_close(out, emu_out, tol=1e-5, name="out vs emulated")
    assert_rel_close(lse, emu_lse, tol=1e-5, name="lse vs emulated")
    assert rel_error(out, other_out) > 1e-3


def test_empty_rows_and_empty_keys():
    # Dataset 0 has no context (rows see nothing: out 0, lse -inf); Lk = 0 likewise.
    q, k, v = core_reference_inputs(AttentionShape(2, 2, 2, 9, 17, 16))
    q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    out, lse = fp8_context_target_attention(
        q, k, v, context_lens=torch.tensor([0, 17], device=DEVICE)
    )
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.isneginf(lse[0]).all() and torch.isfinite(lse[1]).all()
    out, lse = fp8_attention(q, k[:, :, :0], v[:, :, :0], return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def test_huge_inputs_saturate_not_nan():
    # Inputs near fp16's range: the per-block scales absorb them; P's cast saturates at 448.
    q, k, v = core_reference_inputs(AttentionShape(1, 1, 1, 20, 24, 16))
    q, k, v = (t.to(DEVICE) for t in (q * 3e3, k * 3e3, v * 6e4))
    out, lse = fp8_attention(q, k, v, return_lse=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert_rel_close(lse, exact(q, k, v)[1], tol=0.05, name="lse")  # LSE ~1e6: E4M3 scores


def test_backward_is_the_bf16_kernels_with_fp8_out_and_lse():
    shape = AttentionShape(1, 2, 1, 33, 40, 32)
    q, k, v = (t.to(DEVICE).requires_grad_() for t in core_reference_inputs(shape))
    mask = masks.ContextTargetMask(shape.Lq, shape.Lk, 30)
    do = torch.randn(shape.B, shape.H, shape.Lq, shape.D, device=DEVICE)
    out = fp8_attention(q, k, v, mask=mask)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref = flash_attention(q, k, v, mask=mask)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do)
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        assert_rel_close(g, rg, tol=0.15, name=name)


def test_rejects_non_prefix_mask_and_bad_device(monkeypatch):
    q, k, v = core_reference_inputs(AttentionShape(1, 1, 1, 4, 4, 16))
    with pytest.raises(InputError, match="mask"):
        fp8_attention(q, k, v, mask=masks.TeacherForcingMask(2, 2))
    # Outside the interpreter a CPU tensor is not a Hopper GPU: require_sm90's error.
    monkeypatch.setattr("tabattn_fp8.attention.interface.interpreting", lambda: False)
    with pytest.raises(RuntimeError, match=r"sm90.*'cpu'"):
        fp8_attention(q, k, v)


def test_backend_only_on_sm90_and_never_auto(monkeypatch):
    registry = Registry()
    backend.register(registry)
    fp8 = next(b for b in registry.backends() if b.name == "fp8")
    assert set(fp8.ops) == {
        "attention",
        "context_target_attention",
        "shared_context_attention",
        "teacher_forcing_attention",
    }
    assert fp8.priority < 0  # below the torch reference: `auto` never picks it
    assert not fp8.available(torch.device("cpu"))[0]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "Fake A100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (8, 0))
    ok, why = fp8.available(torch.device("cuda", 0))
    assert not ok and "compute capability 8.0" in why
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (9, 0))
    assert fp8.available(torch.device("cuda", 0))[0]


# ---------------------------------------------------------------------------------------
# GPU (Hopper): bf16 at real sizes

GPU_SHAPES = [
    AttentionShape(2, 8, 8, 1536, 1024, 64),
    AttentionShape(1, 8, 2, 1100, 1100, 128),
    AttentionShape(3, 4, 4, 777, 500, 96),
]


def gpu_inputs(shape, requires_grad=False):
    q, k, v = (t.cuda().bfloat16() for t in core_reference_inputs(shape))
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))


@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
@pytest.mark.parametrize("mask_name", ["none", "context", "context-per-dataset", "causal"])
@pytest.mark.parametrize("p_fp8", [True, False], ids=["p-fp8", "p-bf16"])
def test_gpu_bf16_vs_fp64(shape, mask_name, p_fp8):
    q, k, v = gpu_inputs(shape)
    mask = MASKS[mask_name](shape)
    out, lse = fp8_attention(q, k, v, mask=mask, p_fp8=p_fp8, return_lse=True)
    ref_out, ref_lse = exact(q, k, v, mask)
    assert_rel_close(out, ref_out, tol=FP8_REL_TOL, name="out")
    assert_rel_close(lse, ref_lse, tol=LSE_REL_TOL, name="lse")
    assert cosine(out, ref_out) >= FP8_COSINE
    assert out.dtype == torch.bfloat16
    # the FP8-emulated reference explains the error: only P's rounding is left
    emu_out, _ = reference.attention(q, k, v, mask=mask, quantize_v=p_fp8)
    assert_rel_close(out, emu_out, tol=0.05 if p_fp8 else 1e-2, name="out vs emulated")


@pytest.mark.gpu
@pytest.mark.sm90
def test_gpu_rotation_on_outlier_channels():
    # Bounds from the CPU emulation (test_rotation_recovers_outlier_channels): the LSE of
    # the rotated path within 0.012 of fp64, the unrotated one beyond it.
    shape = GPU_SHAPES[1]
    q, k, v = (t.cuda().bfloat16() for t in outlier_inputs(shape))
    ref_out, ref_lse = exact(q, k, v)
    errors = {}
    for rotate in (True, False):
        out, lse = fp8_attention(q, k, v, rotate=rotate, return_lse=True)
        emu_out, _ = reference.attention(q, k, v, rotate=rotate, quantize_v=False)
        assert_rel_close(out, emu_out, tol=0.1, name=f"out vs emulated (rotate={rotate})")
        errors[rotate] = (rel_error(out, ref_out), rel_error(lse, ref_lse))
    assert errors[True][1] < 0.012 < errors[False][1], errors
    assert errors[True][0] < 0.3 and errors[True][0] < errors[False][0], errors


@pytest.mark.gpu
@pytest.mark.sm90
def test_gpu_ar_rows_and_strided_inputs():
    shape = AttentionShape(2, 4, 4, 530, 530, 64)
    q, k, v = (
        torch.randn(shape.B, shape.Lq, shape.H, shape.D, device="cuda").bfloat16().transpose(1, 2)
        for _ in range(3)
    )
    mask = MASKS["ar-rows"](shape)
    out, lse = fp8_attention(q, k, v, mask=mask, return_lse=True)
    ref_out, ref_lse = exact(q, k, v, mask)
    assert_rel_close(out, ref_out, tol=FP8_REL_TOL, name="out")
    assert_rel_close(lse, ref_lse, tol=LSE_REL_TOL, name="lse")


@pytest.mark.gpu
@pytest.mark.sm90
def test_gpu_large_values_saturate():
    shape = AttentionShape(1, 4, 4, 1024, 1024, 128)
    q, k, v = gpu_inputs(shape)
    q, k, v = q * 3e3, k * 3e3, v * 1e4
    out, lse = fp8_attention(q, k, v, return_lse=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert_rel_close(lse, exact(q, k, v)[1], tol=0.05, name="lse")


@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize("shape", GPU_SHAPES[:2], ids=str)
def test_gpu_backward_matches_bf16_kernel(shape):
    q, k, v = gpu_inputs(shape, requires_grad=True)
    mask = masks.ContextTargetMask(shape.Lq, shape.Lk, shape.Lk - 100)
    do = torch.randn_like(q)
    grads = torch.autograd.grad(fp8_attention(q, k, v, mask=mask), (q, k, v), do)
    ref_grads = torch.autograd.grad(flash_attention(q, k, v, mask=mask), (q, k, v), do)
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        assert_rel_close(g, rg, tol=0.1, name=name)


@pytest.mark.gpu
@pytest.mark.sm90
def test_gpu_registry_backend_by_name():
    from tabattn_core.registry import get_op

    q, k, v = gpu_inputs(AttentionShape(2, 4, 4, 300, 200, 64))
    op = get_op("context_target_attention", "fp8", device="cuda")
    out, _ = op(q, k, v, context_lens=150)
    ref_out, _ = exact(q, k, v, masks.ContextTargetMask(300, 200, 150))
    assert_rel_close(out, ref_out, tol=FP8_REL_TOL)
