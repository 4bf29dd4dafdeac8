"""Flash attention kernel against the tabattn-core reference: output, LSE and dq/dk/dv.

CPU: under the Triton interpreter (fp32/fp16, small awkward shapes). GPU (`-m gpu`): bf16 /
fp16 at real sizes. Outputs are NaN-poisoned (conftest), so unwritten elements fail.
"""

from __future__ import annotations

import pytest
import torch

from tabattn_core import masks, reference
from tabattn_core.checks import InputError
from tabattn_core.precision import fp32_dot_precision
from tabattn_core.testing import AttentionShape, assert_rel_close, rel_error
from tabattn_triton.ops.attention import (
    context_target_attention,
    flash_attention,
    varlen_attention,
)
from tabattn_triton.ops.common import dot_precision

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (shape, mask factory) pairs: odd lengths, D = 48/80/96, B = 1, one query, GQA, empty context.
MASKS = {
    "none": lambda s: None,
    "context": lambda s: masks.ContextTargetMask(s.Lq, s.Lk, max(s.Lk - 3, 0)),
    "context-per-dataset": lambda s: masks.ContextTargetMask(
        s.Lq, s.Lk, torch.arange(s.B) * s.Lk // max(s.B, 2)
    ),
    "causal": lambda s: masks.CausalMask(s.Lq, s.Lk),
    "causal-top-left": lambda s: masks.CausalMask(s.Lq, s.Lk, align="top_left"),
}
SHAPES = [
    AttentionShape(1, 1, 1, 1, 1, 16),
    AttentionShape(2, 4, 2, 37, 23, 48),
    AttentionShape(1, 2, 1, 70, 70, 80),
    AttentionShape(3, 2, 2, 9, 45, 96),
    AttentionShape(2, 4, 1, 1, 33, 32),
]


def make_inputs(shape, dtype, layout="bhld", device=DEVICE):
    def t(heads, length):
        if layout == "blhd":
            x = torch.randn(shape.B, length, heads, shape.D, device=device).transpose(1, 2)
        else:
            x = torch.randn(shape.B, heads, length, shape.D, device=device)
        return x.to(dtype).requires_grad_()

    return t(shape.H, shape.Lq), t(shape.H_kv, shape.Lk), t(shape.H_kv, shape.Lk)


def compare(q, k, v, mask, dtype, scale=None):
    """Kernel vs fp64 reference: out, lse, dq, dk, dv."""
    out, lse = flash_attention(q, k, v, mask=mask, scale=scale, return_lse=True)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = reference.attention(q64, k64, v64, mask=mask, scale=scale)
    ref_grads = torch.autograd.grad(ref_out, (q64, k64, v64), do.double())
    tol = dtype if dtype != torch.float32 or DEVICE == "cpu" else "tf32"
    assert_rel_close(out, ref_out, dtype=tol, name="out")
    assert_rel_close(lse, ref_lse, dtype=tol, name="lse")
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        # gradients accumulate over many tiles: allow 2x the forward bound
        assert_rel_close(g, rg, tol=2 * _bound(tol), name=name)
    assert lse.dtype == torch.float32 and out.dtype == dtype


def _bound(tol):
    from tabattn_core.testing import REL_TOL

    return REL_TOL[tol]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_masks_fp32(shape, mask_name):
    q, k, v = make_inputs(shape, torch.float32)
    compare(q, k, v, MASKS[mask_name](shape), torch.float32)


@pytest.mark.parametrize("shape", SHAPES[1:3], ids=str)
@pytest.mark.parametrize("mask_name", ["context", "causal"])
def test_fp16(shape, mask_name):
    q, k, v = make_inputs(shape, torch.float16)
    compare(q, k, v, MASKS[mask_name](shape), torch.float16)


@pytest.mark.parametrize(
    "nc, nb, nt, chunks", [(5, 3, 12, None), (0, 4, 9, 1), (7, 0, 5, None), (3, 4, 16, 2)]
)
def test_ar_training_rows(nc, nb, nt, chunks):
    r = nc + nb + nt
    q, k, v = make_inputs(AttentionShape(2, 2, 1, r, r, 32), torch.float32)
    compare(q, k, v, masks.ARTrainingRowMask(nc, nb, nt, attending_chunks=chunks), torch.float32)


def test_strided_blhd_layout_and_scale():
    shape = AttentionShape(2, 4, 2, 33, 29, 48)
    q, k, v = make_inputs(shape, torch.float32, layout="blhd")
    assert not q.is_contiguous()
    compare(q, k, v, masks.CausalMask(33, 29), torch.float32, scale=0.3)


def test_empty_context_gives_zero_and_minus_inf():
    q, k, v = make_inputs(AttentionShape(2, 2, 2, 5, 8, 32), torch.float32)
    out, lse = flash_attention(
        q, k, v, mask=masks.ContextTargetMask(5, 8, torch.tensor([0, 3])), return_lse=True
    )
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[0]).all()
    assert torch.isfinite(lse[1]).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert torch.equal(k.grad[0], torch.zeros_like(k.grad[0]))


def test_zero_length_keys():
    q, k, v = make_inputs(AttentionShape(1, 2, 2, 4, 0, 16), torch.float32)
    out, lse = flash_attention(q, k, v, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q.grad))


def test_registry_op_context_target():
    shape = AttentionShape(3, 4, 2, 21, 17, 32)
    q, k, v = make_inputs(shape, torch.float32)
    lens = torch.tensor([17, 4, 0], device=DEVICE)
    out, lse = context_target_attention(q, k, v, context_lens=lens)
    ref_out, ref_lse = reference.context_target_attention(
        q.double(), k.double(), v.double(), context_lens=lens.cpu()
    )
    tol = torch.float32 if DEVICE == "cpu" else "tf32"
    assert_rel_close(out, ref_out, dtype=tol)
    assert_rel_close(lse, ref_lse, dtype=tol)


def compare_varlen(lqs, lks, h, h_kv, d, causal, dtype):
    """Packed sequences (some empty) against the per-sequence fp64 reference."""
    q = torch.randn(sum(lqs), h, d, device=DEVICE, dtype=dtype, requires_grad=True)
    k, v = (
        torch.randn(sum(lks), h_kv, d, device=DEVICE, dtype=dtype, requires_grad=True)
        for _ in range(2)
    )
    cu_q = torch.tensor([0, *torch.tensor(lqs).cumsum(0).tolist()], device=DEVICE)
    cu_k = torch.tensor(
        [0, *torch.tensor(lks).cumsum(0).tolist()], device=DEVICE, dtype=torch.int32
    )
    out, lse = varlen_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=causal)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = reference.varlen_attention(
        q64, k64, v64, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=causal
    )
    ref_grads = torch.autograd.grad(ref_out, (q64, k64, v64), do.double())
    tol = dtype if dtype != torch.float32 or DEVICE == "cpu" else "tf32"
    assert_rel_close(out, ref_out, dtype=tol, name="out")
    assert_rel_close(lse, ref_lse, dtype=tol, name="lse")
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        assert_rel_close(g, rg, tol=2 * _bound(tol), name=name)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_packed_sequences(causal):
    compare_varlen(
        [5, 0, 17, 33], [7, 3, 0, 40], h=4, h_kv=2, d=48, causal=causal, dtype=torch.float32
    )


def test_varlen_bad_offsets_named():
    q, k = torch.randn(6, 2, 32, device=DEVICE), torch.randn(5, 2, 32, device=DEVICE)
    good = torch.tensor([0, 6], device=DEVICE)
    with pytest.raises(InputError, match="cu_seqlens_k"):
        varlen_attention(
            q, k, k, cu_seqlens_q=good, cu_seqlens_k=torch.tensor([0, 4], device=DEVICE)
        )
    with pytest.raises(InputError, match="cu_seqlens_q"):
        varlen_attention(
            q, k, k, cu_seqlens_q=torch.tensor([0, 7, 6], device=DEVICE), cu_seqlens_k=good
        )
    with pytest.raises(InputError, match="cu_seqlens_k: expected 3 offsets"):
        varlen_attention(
            q,
            k,
            k,
            cu_seqlens_q=torch.tensor([0, 2, 6], device=DEVICE),
            cu_seqlens_k=torch.tensor([0, 5], device=DEVICE),
        )


def test_many_batch_heads_beyond_grid_limit():
    """B*H*blocks past the 65535 limit of CUDA grid dims y/z: the grid is one-dimensional."""
    b = 33000 if DEVICE == "cuda" else 3
    q = torch.randn(b, 2, 1, 16, device=DEVICE)
    k, v = torch.randn(2, b, 2, 3, 16, device=DEVICE)
    out, lse = flash_attention(q, k, v, return_lse=True)
    ref_out, ref_lse = reference.attention(q, k, v)
    assert rel_error(out, ref_out) < 1e-3 and rel_error(lse, ref_lse) < 1e-3


@pytest.mark.parametrize(
    "call, arg",
    [
        (lambda q, k, v: flash_attention(q[0], k, v), "q"),
        (lambda q, k, v: flash_attention(q.double(), k.double(), v.double()), "q"),
        (lambda q, k, v: flash_attention(q, k.half(), v), "k"),
        (lambda q, k, v: flash_attention(q, k, v[:, :, :3]), "v"),
        (lambda q, k, v: flash_attention(q[:, :3], k, v), "k"),
        (lambda q, k, v: flash_attention(q[..., :8], k[..., :8], v[..., :8]), "head dim"),
        (lambda q, k, v: flash_attention(q, k[:1], v[:1]), "k"),
        (lambda q, k, v: flash_attention(q[..., ::2], k[..., ::2], v[..., ::2]), "stride"),
        (lambda q, k, v: flash_attention(q, k, v, mask=masks.CausalMask(3, 3)), "mask"),
        (lambda q, k, v: flash_attention(q, k, v, mask=masks.TeacherForcingMask(3, 2)), "mask"),
        (lambda q, k, v: flash_attention(q, k, v, scale=0.0), "scale"),
        (lambda q, k, v: context_target_attention(q, k, v, context_lens=9), "context_lens"),
        (
            lambda q, k, v: context_target_attention(
                q, k, v, context_lens=torch.tensor([1, 9], device=q.device)
            ),
            "context_lens",
        ),
    ],
)
def test_bad_input_rejected_before_launch(call, arg):
    q = torch.randn(2, 4, 6, 32, device=DEVICE)
    k, v = torch.randn(2, 2, 2, 5, 32, device=DEVICE)
    with pytest.raises(InputError, match=arg):
        call(q, k, v)


def test_cpu_tensors_rejected_without_interpreter(monkeypatch):
    monkeypatch.setattr("tabattn_triton.ops.common.interpreting", lambda: False)
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(InputError, match="q: expected a CUDA tensor"):
        flash_attention(q, q, q)


# ---- GPU: bf16 / fp16 at real sizes ---------------------------------------------------

GPU_CASES = [
    (
        "context-tnp",
        AttentionShape(4, 8, 8, 1500, 1000, 64),
        lambda s: masks.ContextTargetMask(s.Lq, s.Lk, 1000),
    ),
    (
        "context-d128",
        AttentionShape(2, 8, 8, 2500, 2000, 128),
        lambda s: masks.ContextTargetMask(s.Lq, s.Lk, 2000),
    ),
    (
        "per-dataset",
        AttentionShape(3, 8, 8, 1200, 1000, 64),
        lambda s: masks.ContextTargetMask(s.Lq, s.Lk, torch.tensor([1000, 17, 640])),
    ),
    ("causal", AttentionShape(2, 8, 2, 1024, 1024, 64), lambda s: masks.CausalMask(s.Lq, s.Lk)),
    ("causal-d80", AttentionShape(2, 4, 4, 777, 1100, 80), lambda s: masks.CausalMask(s.Lq, s.Lk)),
    ("none-d96", AttentionShape(1, 6, 3, 513, 900, 96), lambda s: None),
    ("none-d256", AttentionShape(1, 4, 4, 300, 500, 256), lambda s: None),
    (
        "ar-rows",
        AttentionShape(4, 4, 4, 64 + 32 + 512, 64 + 32 + 512, 32),
        lambda s: masks.ARTrainingRowMask(64, 32, 512),
    ),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name, shape, mask", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_gpu_real_sizes(name, shape, mask, dtype):
    q, k, v = make_inputs(shape, dtype)
    compare(q, k, v, mask(shape), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_varlen_datasets_of_different_sizes(causal):
    """Context-target batch of datasets with different (M, N): each sequence's queries are
    its M+N rows, its keys its M context rows."""
    ms, ns = [1000, 37, 4000, 0, 513], [500, 11, 1000, 64, 700]
    compare_varlen(
        [m + n for m, n in zip(ms, ns, strict=True)], ms, 8, 2, 64, causal, torch.bfloat16
    )


def test_fp32_dot_precision_follows_the_scope_then_torch(monkeypatch):
    """fp32 dots: the `fp32_dot_precision` scope's mode, else torch's allow_tf32; the
    interpreter, which has no bf16x3, runs that mode as tf32x3."""
    flag = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert dot_precision(torch.float32) == "tf32x3"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert dot_precision(torch.float32) == "tf32"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = flag
    with fp32_dot_precision("tf32x3"):
        assert dot_precision(torch.float32) == "tf32x3"
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with fp32_dot_precision("bf16x3"):
            assert dot_precision(torch.float32) == "bf16x3"
            monkeypatch.setenv("TRITON_INTERPRET", "1")
            assert dot_precision(torch.float32) == "tf32x3"
    assert dot_precision(torch.float16) == dot_precision(torch.bfloat16) == "tf32"


@pytest.mark.gpu
def test_gpu_fp32_dot_modes_differ_as_documented(monkeypatch):
    """Each scoped mode really reaches the kernel: errors against fp64 order as
    tf32x3 < bf16x3 < tf32, each within its mode's bound."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    shape = AttentionShape(2, 4, 4, 300, 400, 64)
    q, k, v = make_inputs(shape, torch.float32)
    ref, _ = reference.attention(q.double(), k.double(), v.double())
    errors = {}
    for mode in ("tf32x3", "bf16x3", "tf32"):
        with fp32_dot_precision(mode):
            errors[mode] = rel_error(flash_attention(q, k, v), ref)
    assert errors["tf32x3"] < 1e-5 and errors["bf16x3"] < 1e-4 and errors["tf32"] < 5e-3, errors
    assert 3 * errors["tf32x3"] < errors["bf16x3"] and 3 * errors["bf16x3"] < errors["tf32"], errors


@pytest.mark.gpu
def test_gpu_fp32_follows_tf32_flag(monkeypatch):
    shape = AttentionShape(2, 4, 4, 300, 400, 64)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    q, k, v = make_inputs(shape, torch.float32)
    out = flash_attention(q, k, v)
    ref, _ = reference.attention(q.double(), k.double(), v.double())
    assert_rel_close(out, ref, dtype=torch.float32)
