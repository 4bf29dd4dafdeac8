"""Shared-context decode and teacher forcing against the tabattn-core reference (output and
LSE; teacher-forcing gradients), on both tilings, with context splits, GQA, per-dataset
context lengths, Nc = 0, T = 0, odd S and D = 48/80."""

from __future__ import annotations

import pytest
import torch

from tabattn_core import reference
from tabattn_core.checks import InputError
from tabattn_core.testing import REL_TOL, assert_rel_close
from tabattn_triton.ops.shared_context import (
    choose_num_splits,
    decode_with_splits,
    shared_context_attention,
    teacher_forcing_attention,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def inputs(g, s, h, h_kv, lq, nc, t_cap, d, dtype=torch.float32, grad=False):
    def r(*shape):
        return torch.randn(*shape, device=DEVICE, dtype=dtype, requires_grad=grad)

    return (
        r(g, s, h, lq, d),
        r(g, h_kv, nc, d),
        r(g, h_kv, nc, d),
        r(g, s, h_kv, t_cap, d),
        r(g, s, h_kv, t_cap, d),
    )


def tolerance(dtype):
    return dtype if dtype != torch.float32 or DEVICE == "cpu" else "tf32"


def as64(args):
    return [t.detach().double().requires_grad_(t.requires_grad) for t in args]


DECODE_CASES = [
    # (G, S, H, H_kv, Lq, Nc, T, T_cap, D, rule, lens, splits)
    (1, 5, 2, 2, 1, 37, 4, 6, 32, "causal", None, None),
    (2, 3, 4, 2, 2, 20, 3, 5, 48, ("causal", "strict"), [20, 7], None),
    (1, 3, 2, 1, 1, 0, 0, 2, 32, "causal", None, None),  # empty context, empty buffer
    (1, 7, 2, 1, 1, 0, 2, 2, 32, "strict", None, None),  # empty context
    (2, 4, 2, 2, 1, 150, 5, 5, 16, "causal", [150, 1], 3),  # context split across programs
    (1, 2, 8, 1, 3, 40, 6, 8, 80, "causal", None, None),  # 24 rows per sample: per-sample tiles
    (1, 1, 2, 2, 1, 1, 1, 1, 96, "strict", None, None),
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: "-".join(map(str, c[:9])))
def test_decode_matches_reference(case):
    g, s, h, h_kv, lq, nc, t, t_cap, d, rule, lens, splits = case
    args = inputs(g, s, h, h_kv, lq, nc, t_cap, d)
    lens = None if lens is None else torch.tensor(lens, device=DEVICE)
    out, lse = decode_with_splits(
        *args, buffer_len=t, context_lens=lens, row_rule=rule, num_splits=splits
    )
    ref_out, ref_lse = reference.shared_context_attention(
        *as64(args), buffer_len=t, context_lens=lens, row_rule=rule
    )
    assert_rel_close(out, ref_out, dtype=tolerance(torch.float32), name="out")
    assert_rel_close(lse, ref_lse, dtype=tolerance(torch.float32), name="lse")


def test_decode_buffer_length_on_device():
    """A 0-dim device tensor buffer_len (CUDA-graph decode) gives the int's result; values
    beyond T_cap are clamped to it."""
    args = inputs(2, 3, 2, 1, 2, 19, 7, 32)
    for t in (2, 5, 7):
        want = shared_context_attention(*args, buffer_len=t, row_rule=("causal", "strict"))
        got = shared_context_attention(
            *args, buffer_len=torch.tensor(t, device=DEVICE), row_rule=("causal", "strict")
        )
        assert_rel_close(got[0], want[0], tol=1e-6)
        assert_rel_close(got[1], want[1], tol=1e-6)
    clamped = shared_context_attention(*args, buffer_len=torch.tensor(99, device=DEVICE))
    assert_rel_close(clamped[0], shared_context_attention(*args, buffer_len=7)[0], tol=1e-6)
    with pytest.raises(InputError, match="buffer_len"):
        shared_context_attention(*args, buffer_len=torch.tensor([2], device=DEVICE))


def test_device_length_tuned_at_mean_length(monkeypatch):
    """With autotuning on, the first launch of a device-length signature runs once more, on
    scratch outputs, with the length T_cap/2 (what the autotuner times); later calls launch
    once with the caller's length, and the outputs are the caller's."""
    from tabattn_triton.ops.shared_context import interface

    lengths = []
    real = interface.shared_context_fwd_kernel

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                if args[6] is not None:  # BUFFER_LEN, a device length
                    lengths.append(int(args[6]))
                return real[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(interface, "autotune_enabled", lambda: True)
    monkeypatch.setattr(interface, "shared_context_fwd_kernel", Recorder())
    monkeypatch.setattr(interface, "_TUNED_AT_MEAN_LENGTH", set())
    args = inputs(1, 3, 2, 1, 2, 9, 7, 16)
    for t in (2, 6):
        got = shared_context_attention(*args, buffer_len=torch.tensor(t, device=DEVICE))
        want = shared_context_attention(*args, buffer_len=t)
        assert_rel_close(got[0], want[0], tol=1e-6)
        assert_rel_close(got[1], want[1], tol=1e-6)
    assert lengths == [4, 2, 6]  # (T_cap + 1) // 2, then the callers' lengths


def test_decode_splits_agree():
    args = inputs(1, 3, 2, 1, 1, 300, 2, 32)
    one, lse1 = decode_with_splits(*args, buffer_len=2, num_splits=1)
    for splits in (2, 5):
        many, lse = decode_with_splits(*args, buffer_len=2, num_splits=splits)
        assert_rel_close(many, one, tol=1e-5)
        assert_rel_close(lse, lse1, tol=1e-5)


TF_CASES = [
    # (G, S, H, H_kv, Nt, Nc, D, lens)
    (1, 3, 2, 2, 9, 17, 32, None),
    (2, 2, 4, 2, 5, 30, 48, [0, 30]),
    (1, 2, 2, 2, 1, 0, 32, None),
    (1, 3, 2, 1, 3, 5, 16, 2),
]


@pytest.mark.parametrize("case", TF_CASES, ids=lambda c: "-".join(map(str, c[:7])))
def test_teacher_forcing_forward_and_gradients(case):
    g, s, h, h_kv, nt, nc, d, lens = case
    args = inputs(g, s, h, h_kv, 2 * nt, nc, nt, d, grad=True)
    lens = torch.tensor(lens, device=DEVICE) if isinstance(lens, list) else lens
    out, lse = teacher_forcing_attention(*args, context_lens=lens)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, args, do)
    ref_args = as64(args)
    ref_out, ref_lse = reference.teacher_forcing_attention(*ref_args, context_lens=lens)
    ref_grads = torch.autograd.grad(ref_out, ref_args, do.double())
    tol = tolerance(torch.float32)
    assert_rel_close(out, ref_out, dtype=tol, name="out")
    assert_rel_close(lse, ref_lse, dtype=tol, name="lse")
    for name, gr, rg in zip(
        ("dq", "dk_ctx", "dv_ctx", "dk_buf", "dv_buf"), grads, ref_grads, strict=True
    ):
        assert_rel_close(gr, rg, tol=2 * REL_TOL[tol], name=name)


def test_teacher_forcing_fp16():
    args = inputs(1, 2, 2, 1, 8, 24, 4, 32, dtype=torch.float16)
    out, lse = teacher_forcing_attention(*args)
    ref_out, ref_lse = reference.teacher_forcing_attention(*as64(args))
    assert_rel_close(out, ref_out, dtype=torch.float16)
    assert_rel_close(lse, ref_lse, dtype=torch.float16)


def test_bad_input_named():
    q, kc, vc, kb, vb = inputs(2, 3, 4, 2, 1, 5, 3, 32)
    cases = [
        (lambda: shared_context_attention(q[0], kc, vc), "q"),
        (lambda: shared_context_attention(q, kc[:1], vc[:1]), "k_ctx"),
        (lambda: shared_context_attention(q, kc, vc, buffer_len=2), "k_buf"),
        (lambda: shared_context_attention(q, kc, vc, kb, vb, buffer_len=4), "k_buf"),
        (lambda: shared_context_attention(q, kc, vc, kb, vb, buffer_len=-1), "buffer_len"),
        (
            lambda: shared_context_attention(q, kc, vc, kb, vb, buffer_len=1, row_rule="up"),
            "row_rule",
        ),
        (
            lambda: shared_context_attention(
                q, kc, vc, context_lens=torch.tensor([9, 1], device=DEVICE)
            ),
            "context_lens",
        ),
        (lambda: decode_with_splits(q, kc, vc, num_splits=0), "num_splits"),
        (lambda: shared_context_attention(q.double(), kc.double(), vc.double()), "q"),
        (lambda: shared_context_attention(q.requires_grad_(), kc, vc), "forward-only"),
        (lambda: teacher_forcing_attention(q, kc, vc, kb, vb), "q"),
        (
            lambda: teacher_forcing_attention(
                torch.randn(2, 3, 4, 4, 32, device=DEVICE), kc, vc, kb, vb
            ),
            "k_buf",
        ),
        (
            lambda: teacher_forcing_attention(
                torch.randn(2, 3, 4, 4, 32, device=DEVICE), kc, vc, None, None
            ),
            "k_buf",
        ),
    ]
    for call, arg in cases:
        with pytest.raises(InputError, match=arg):
            call()


def test_split_heuristic_on_cpu_is_one():
    assert choose_num_splits(1, 1 << 20, torch.device("cpu")) == 1


# ---- GPU: bf16 at real sizes -----------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    "g, s, h, h_kv, lq, nc, t, d, rule",
    [
        (1, 512, 8, 8, 1, 1024, 16, 64, "causal"),
        (1, 64, 8, 8, 2, 16384, 32, 64, ("causal", "strict")),  # few rows, long context: splits
        (4, 129, 8, 2, 2, 1000, 17, 80, ("causal", "strict")),
        (2, 33, 4, 4, 1, 0, 9, 48, "strict"),
        (1, 16, 4, 1, 8, 3000, 40, 128, "causal"),  # 32 rows per sample: per-sample tiles
    ],
)
def test_gpu_decode(g, s, h, h_kv, lq, nc, t, d, rule):
    args = inputs(g, s, h, h_kv, lq, nc, t + 3, d, dtype=torch.bfloat16)
    lens = torch.randint(0, nc + 1, (g,), device=DEVICE) if g > 1 else None
    out, lse = shared_context_attention(*args, buffer_len=t, context_lens=lens, row_rule=rule)
    ref_out, ref_lse = reference.shared_context_attention(
        *(a.float() for a in args), buffer_len=t, context_lens=lens, row_rule=rule
    )
    assert_rel_close(out, ref_out, dtype=torch.bfloat16)
    assert_rel_close(lse, ref_lse, dtype=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("s, nc, nt, d", [(64, 1024, 64, 64), (8, 4096, 256, 64), (5, 777, 33, 80)])
def test_gpu_teacher_forcing(s, nc, nt, d):
    args = inputs(1, s, 8, 4, 2 * nt, nc, nt, d, dtype=torch.bfloat16, grad=True)
    out, lse = teacher_forcing_attention(*args)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, args, do)
    ref_args = [a.detach().float().requires_grad_() for a in args]
    ref_out, ref_lse = reference.teacher_forcing_attention(*ref_args)
    ref_grads = torch.autograd.grad(ref_out, ref_args, do.float())
    assert_rel_close(out, ref_out, dtype=torch.bfloat16)
    assert_rel_close(lse, ref_lse, dtype=torch.bfloat16)
    for gr, rg in zip(grads, ref_grads, strict=True):
        assert_rel_close(gr, rg, tol=2 * REL_TOL[torch.bfloat16])


@pytest.mark.gpu
def test_gpu_no_recompilation_when_lengths_change():
    """Nc, T and S are runtime values: new lengths reuse the compiled kernel."""
    from tabattn_triton.ops.shared_context.kernel import shared_context_fwd_kernel

    jit = shared_context_fwd_kernel.fn

    def compiled() -> int:
        return sum(len(entry[0]) for entry in jit.device_caches.values())

    def step(s, nc, t):
        args = inputs(1, s, 4, 4, 1, nc, t + 2, 64, dtype=torch.bfloat16)
        decode_with_splits(*args, buffer_len=t, num_splits=1)

    step(8, 1000, 5)
    before = compiled()
    for s, nc, t in [(9, 1001, 6), (13, 1017, 7), (8, 999, 3), (31, 2000, 12)]:
        step(s, nc, t)
    assert compiled() == before
