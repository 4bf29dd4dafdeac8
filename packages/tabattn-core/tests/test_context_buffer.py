"""`context_buffer_op`: the reference's context part merged with its buffer part equals the
reference op over context and buffer at once, forward and gradients, on fresh random
inputs and awkward shapes (odd lengths, empty context or buffer, one query, G = S = 1,
GQA, per-dataset context lengths, a device buffer length)."""

from __future__ import annotations

import inspect

import pytest
import torch

from tabattn_core import reference
from tabattn_core.checks import InputError
from tabattn_core.context_buffer import CONTRACTS, context_buffer_op
from tabattn_core.testing import assert_rel_close

DECODE = "shared_context_attention"
TF = "teacher_forcing_attention"
F64 = torch.float64


def split_op(name):
    """The op of the references, as the context part (the decode op without buffers) and
    the buffer part (the op itself)."""
    return context_buffer_op(name, reference.shared_context_attention, getattr(reference, name))


def inputs(g, s, h, h_kv, lq, nc, t_cap, d, *, dtype=F64, grad=False):
    def r(*shape):
        return torch.randn(*shape, dtype=dtype).requires_grad_(grad)

    return (
        r(g, s, h, lq, d),
        r(g, h_kv, nc, d),
        r(g, h_kv, nc, d),
        *(r(g, s, h_kv, t_cap, d) for _ in range(2)),
    )


def lens_arg(lens):
    return torch.tensor(lens) if isinstance(lens, list) else lens


def loss_of(out, lse):
    """A scalar that weighs every out element and every finite LSE differently."""
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
    finite = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    return (out * w).sum() + (finite * torch.linspace(0.5, 1.5, lse.numel()).view(lse.shape)).sum()


def check_split(name, args, **options):
    """Forward (out, LSE) and the gradients of every input against the reference."""
    got = split_op(name)(*args, **options)
    want = getattr(reference, name)(*args, **options)
    assert_rel_close(got[0], want[0], dtype=F64, name="out")
    assert_rel_close(got[1], want[1], dtype=F64, name="lse")
    assert got[0].dtype == args[0].dtype and got[1].dtype == want[1].dtype
    if not args[0].requires_grad:
        return
    names = ("q", "k_ctx", "v_ctx", "k_buf", "v_buf")[: len(args)]
    grads = [
        torch.autograd.grad(loss_of(*result), args, allow_unused=True)
        if result[0].requires_grad
        else [None] * len(args)  # out 0, lse -inf, as no row sees a key
        for result in (got, want)
    ]
    for arg, g_got, g_want in zip(names, *grads, strict=True):
        g_got = torch.zeros_like(g_want) if g_got is None and g_want is not None else g_got
        g_want = torch.zeros_like(g_got) if g_want is None and g_got is not None else g_want
        if g_got is not None:
            assert torch.isfinite(g_got).all(), arg
            assert_rel_close(g_got, g_want, dtype=F64, name=f"d{arg}")


DECODE_CASES = [
    # (G, S, H, H_kv, Lq, Nc, T, T_cap, D, rule, lens)
    (1, 5, 2, 2, 1, 37, 4, 6, 32, "causal", None),
    (2, 3, 4, 2, 2, 45, 3, 5, 48, ("causal", "strict"), [45, 7]),  # GQA, per-dataset M
    (2, 3, 2, 1, 1, 29, 5, 7, 16, "causal", [0, 29]),  # dataset 0 sees its buffer only
    (1, 4, 4, 2, 1, 33, 5, 5, 48, "causal", 20),  # one M < Nc
    (1, 3, 2, 1, 1, 17, 3, 3, 32, "strict", 0),  # M = 0: the buffer part alone
    (1, 3, 2, 1, 1, 0, 0, 2, 32, "causal", None),  # empty context, empty buffer
    (1, 7, 2, 1, 1, 0, 2, 2, 32, "strict", None),  # empty context
    (2, 3, 2, 2, 2, 21, 0, 3, 32, "causal", None),  # T = 0: the context part alone
    (1, 1, 2, 2, 1, 33, 1, 1, 80, "strict", None),  # G = S = 1, one query row, D = 80
    (1, 2, 8, 1, 3, 63, 6, 8, 80, ("causal", "strict", "causal"), None),  # GQA 8:1, Nc 63
]


@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "grad"])
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: "-".join(map(str, c[:9])))
def test_decode_split_equals_reference(case, grad):
    g, s, h, h_kv, lq, nc, t, t_cap, d, rule, lens = case
    args = inputs(g, s, h, h_kv, lq, nc, t_cap, d, grad=grad)
    check_split(DECODE, args, buffer_len=t, context_lens=lens_arg(lens), row_rule=rule)


TF_CASES = [
    # (G, S, H, H_kv, Nt, Nc, D, lens)
    (1, 3, 2, 2, 9, 17, 32, None),
    (2, 2, 4, 2, 5, 30, 48, [0, 30]),  # GQA, dataset 0 without context (tgt_0: no key)
    (1, 2, 2, 2, 1, 0, 32, None),  # empty context: the buffer part alone
    (1, 3, 2, 1, 3, 25, 80, 11),  # one M < Nc, D = 80
    (1, 1, 2, 2, 1, 19, 48, None),  # G = S = 1, Nt = 1
    (2, 1, 3, 1, 7, 111, 16, 0),  # M = 0, odd Nt and Nc
]


@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "grad"])
@pytest.mark.parametrize("case", TF_CASES, ids=lambda c: "-".join(map(str, c[:7])))
def test_teacher_forcing_split_equals_reference(case, grad):
    g, s, h, h_kv, nt, nc, d, lens = case
    args = inputs(g, s, h, h_kv, 2 * nt, nc, nt, d, grad=grad)
    check_split(TF, args, context_lens=lens_arg(lens))


def test_decode_without_buffer_tensors_and_device_buffer_len():
    q, kc, vc, kb, vb = inputs(2, 3, 4, 2, 2, 27, 4, 48, grad=True)
    check_split(DECODE, (q, kc, vc))
    check_split(DECODE, (q, kc[:, :, :0], vc[:, :, :0]))  # neither part: out 0, lse -inf
    for t in (0, 3):
        check_split(DECODE, (q, kc, vc, kb, vb), buffer_len=torch.tensor(t), scale=0.3)


def test_fp32_within_the_fp32_bound():
    args = inputs(2, 3, 4, 2, 3, 37, 5, 48, dtype=torch.float32)
    options = {"buffer_len": 4, "row_rule": "strict", "context_lens": torch.tensor([37, 9])}
    out, lse = split_op(DECODE)(*args, **options)
    want = reference.shared_context_attention(*(t.double() for t in args), **options)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert_rel_close(out, want[0], dtype=torch.float32, name="out")
    assert_rel_close(lse, want[1], dtype=torch.float32, name="lse")


@pytest.mark.parametrize("name", sorted(CONTRACTS))
def test_the_op_takes_the_registry_signature(name):
    assert inspect.signature(split_op(name)) == inspect.signature(getattr(reference, name))
    assert split_op(name).__name__ == name


def test_parts_run_only_where_rows_see_their_keys():
    calls = []

    def part(which, fn):
        return lambda *a, **kw: calls.append(which) or fn(*a, **kw)

    op = context_buffer_op(
        DECODE,
        part("context", reference.shared_context_attention),
        part("buffer", reference.shared_context_attention),
    )
    q, kc, vc, kb, vb = inputs(1, 2, 2, 1, 1, 9, 3, 32)
    for options, want in [
        ({"buffer_len": 2}, ["context", "buffer"]),
        ({"buffer_len": 0}, ["context"]),
        ({"buffer_len": torch.tensor(0)}, ["context", "buffer"]),  # read on the device
        ({"buffer_len": 2, "context_lens": 0}, ["buffer"]),
        ({"buffer_len": 0, "context_lens": 0}, []),
    ]:
        calls.clear()
        op(q, kc, vc, kb, vb, **options)
        assert calls == want, options


def test_bad_input_raises_the_contracts_error_before_either_part():
    def never(*args, **kwargs):
        raise AssertionError("a part ran")

    q, kc, vc, kb, vb = inputs(1, 2, 2, 1, 2, 9, 3, 32)
    for name, args, options, message in [
        (DECODE, (q, kc, vc, kb, vb), {"buffer_len": 4}, "k_buf: expected capacity"),
        (DECODE, (q, kc, vc), {"row_rule": "both"}, "row_rule: expected"),
        (TF, (q[..., :1, :], kc, vc, kb, vb), {}, "q: expected an even row count"),
        (TF, (q, kc, vc, None, None), {}, "k_buf, v_buf: expected tensors"),
    ]:
        with pytest.raises(InputError, match=message):
            context_buffer_op(name, never, never)(*args, **options)
    with pytest.raises(InputError, match="name: expected one of"):
        context_buffer_op("attention", never, never)


def test_a_part_with_a_non_differentiable_lse_raises_when_merged_for_gradients():
    def detached_lse(*args, **kwargs):
        out, lse = reference.shared_context_attention(*args, **kwargs)
        return out, lse.detach()

    op = context_buffer_op(DECODE, reference.shared_context_attention, detached_lse)
    q, kc, vc, kb, vb = inputs(1, 2, 2, 1, 1, 9, 3, 32, grad=True)
    with pytest.raises(InputError, match="buffer: expected a differentiable lse"):
        op(q, kc, vc, kb, vb, buffer_len=2)
    with torch.no_grad():  # inference: nothing to differentiate
        op(q, kc, vc, kb, vb, buffer_len=2)
    op(q, kc, vc, kb, vb, buffer_len=0)  # the context part alone: no merge
