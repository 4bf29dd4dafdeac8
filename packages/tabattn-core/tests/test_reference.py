"""Every reference op against the row-by-row fp64 brute force of tests/brute.py, on
property-based shapes (empty context, one query, D = 48/80/96, GQA)."""

from __future__ import annotations

import brute
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tabattn_core import masks, reference
from tabattn_core.checks import InputError
from tabattn_core.testing import AWKWARD_SHAPES, assert_rel_close, random_qkv

HEAD_DIMS = st.sampled_from([16, 32, 48, 80, 96])
SETTINGS = settings(max_examples=25, deadline=None)


def brute_batched(q, k, v, visible_of, scale):
    """q [B, H, Lq, D], k/v [B, H_kv, Lk, D]; visible_of(b, h) -> [Lq][Lk]."""
    group = q.shape[1] // k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    lse = torch.zeros(q.shape[:-1], dtype=torch.float64)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            out[b, h], lse[b, h] = brute.attention(
                q[b, h], k[b, h // group], v[b, h // group], visible_of(b, h), scale
            )
    return out, lse


def check(out, lse, want_out, want_lse, dtype):
    assert_rel_close(out, want_out, dtype=dtype, name="out")
    assert_rel_close(lse, want_lse, dtype=dtype, name="lse")
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()


@SETTINGS
@given(
    b=st.integers(1, 3),
    hkv=st.integers(1, 2),
    group=st.integers(1, 3),
    lq=st.integers(1, 9),
    lk=st.integers(0, 9),
    d=HEAD_DIMS,
    data=st.data(),
    dtype=st.sampled_from([torch.float64, torch.float32]),
)
def test_context_target_attention(b, hkv, group, lq, lk, d, data, dtype):
    lens = data.draw(st.lists(st.integers(0, lk), min_size=b, max_size=b))
    q = torch.randn(b, hkv * group, lq, d, dtype=dtype)
    k, v = torch.randn(b, hkv, lk, d, dtype=dtype), torch.randn(b, hkv, lk, d, dtype=dtype)
    out, lse = reference.context_target_attention(q, k, v, context_lens=torch.tensor(lens))
    want = brute_batched(q, k, v, lambda bi, h: brute.context_target(lq, lk, lens[bi]), d**-0.5)
    check(out, lse, *want, dtype)


@SETTINGS
@given(
    b=st.integers(1, 2),
    h=st.integers(1, 3),
    lq=st.integers(1, 9),
    lk=st.integers(0, 9),
    d=HEAD_DIMS,
)
def test_attention_with_causal_spec(b, h, lq, lk, d):
    q, k, v = (
        torch.randn(b, h, lq, d, dtype=torch.float64),
        *torch.randn(2, b, h, lk, d, dtype=torch.float64),
    )
    scale = 0.3
    out, lse = reference.attention(q, k, v, mask=masks.CausalMask(lq, lk), scale=scale)
    check(out, lse, *brute_batched(q, k, v, lambda *_: brute.causal(lq, lk), scale), torch.float64)


@SETTINGS
@given(nc=st.integers(0, 5), nb=st.integers(0, 4), nt=st.integers(0, 9), d=HEAD_DIMS)
def test_attention_with_ar_training_rows(nc, nb, nt, d):
    r = nc + nb + nt
    q, k, v = torch.randn(3, 1, 2, r, d, dtype=torch.float64)
    out, lse = reference.attention(q, k, v, mask=masks.ARTrainingRowMask(nc, nb, nt))
    a = nt // (2 * nb) if nb else 0
    want = brute_batched(q, k, v, lambda *_: brute.ar_training(nc, nb, nt, a), d**-0.5)
    check(out, lse, *want, torch.float64)


def test_attention_bool_mask_and_no_mask():
    q, k, v = random_qkv(AWKWARD_SHAPES[3], dtype=torch.float64)
    full, _ = reference.attention(q, k, v)
    ones = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool)
    masked, _ = reference.attention(q, k, v, mask=ones)
    assert torch.equal(full, masked)


@pytest.mark.parametrize("shape", AWKWARD_SHAPES, ids=str)
def test_strided_layout_matches_contiguous(shape):
    gen = torch.Generator().manual_seed(0)
    q, k, v = random_qkv(shape, generator=gen, layout="blhd")
    assert shape.Lq <= 1 or not q.is_contiguous()
    out, lse = reference.attention(q, k, v)
    out_c, lse_c = reference.attention(q.contiguous(), k.contiguous(), v.contiguous())
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)


def ctx_buf_inputs(g, s, hkv, group, lq, nc, tcap, d, dtype=torch.float64):
    q = torch.randn(g, s, hkv * group, lq, d, dtype=dtype)
    k_ctx, v_ctx = torch.randn(2, g, hkv, nc, d, dtype=dtype)
    k_buf, v_buf = torch.randn(2, g, s, hkv, tcap, d, dtype=dtype)
    return q, k_ctx, v_ctx, k_buf, v_buf


def brute_ctx_buf(q, k_ctx, v_ctx, k_buf, v_buf, t, visible_of):
    """Brute force over explicitly copied keys [ctx | buf[:t]] per sample path."""
    g, s = q.shape[:2]
    out = torch.zeros(q.shape, dtype=torch.float64)
    lse = torch.zeros(q.shape[:-1], dtype=torch.float64)
    for gi in range(g):
        for si in range(s):
            k = torch.cat([k_ctx[gi], k_buf[gi, si, :, :t]], 1).unsqueeze(0)
            v = torch.cat([v_ctx[gi], v_buf[gi, si, :, :t]], 1).unsqueeze(0)
            o, l_ = brute_batched(
                q[gi, si].unsqueeze(0),
                k,
                v,
                lambda b, h, gi=gi: visible_of(gi),
                q.shape[-1] ** -0.5,
            )
            out[gi, si], lse[gi, si] = o[0], l_[0]
    return out, lse


@SETTINGS
@given(
    g=st.integers(1, 2),
    s=st.integers(1, 3),
    hkv=st.integers(1, 2),
    group=st.integers(1, 2),
    lq=st.integers(1, 3),
    nc=st.integers(0, 6),
    t=st.integers(0, 5),
    d=HEAD_DIMS,
    data=st.data(),
)
def test_shared_context_attention(g, s, hkv, group, lq, nc, t, d, data):
    lens = data.draw(st.lists(st.integers(0, nc), min_size=g, max_size=g))
    rules = data.draw(st.lists(st.sampled_from(["causal", "strict"]), min_size=lq, max_size=lq))
    tcap = t + data.draw(st.integers(0, 2))
    args = ctx_buf_inputs(g, s, hkv, group, lq, nc, tcap, d)
    out, lse = reference.shared_context_attention(
        *args, buffer_len=t, context_lens=torch.tensor(lens), row_rule=rules
    )
    want = brute_ctx_buf(*args, t, lambda gi: brute.buffer_decode(lq, t, lens[gi], nc, rules))
    check(out, lse, *want, torch.float64)


def test_shared_context_without_buffer():
    q, k_ctx, v_ctx, _, _ = ctx_buf_inputs(2, 3, 1, 2, 1, 7, 0, 48)
    out, lse = reference.shared_context_attention(q, k_ctx, v_ctx)
    copied = k_ctx.unsqueeze(1).expand(-1, 3, -1, -1, -1).flatten(0, 1)
    vcopied = v_ctx.unsqueeze(1).expand(-1, 3, -1, -1, -1).flatten(0, 1)
    want_out, want_lse = reference.attention(q.flatten(0, 1), copied, vcopied)
    assert_rel_close(out.flatten(0, 1), want_out, dtype=torch.float64)
    assert_rel_close(lse.flatten(0, 1), want_lse, dtype=torch.float64)


@SETTINGS
@given(
    g=st.integers(1, 2),
    s=st.integers(1, 2),
    hkv=st.integers(1, 2),
    group=st.integers(1, 2),
    nt=st.integers(1, 5),
    nc=st.integers(0, 6),
    d=HEAD_DIMS,
    data=st.data(),
)
def test_teacher_forcing_attention(g, s, hkv, group, nt, nc, d, data):
    lens = data.draw(st.lists(st.integers(0, nc), min_size=g, max_size=g))
    args = ctx_buf_inputs(g, s, hkv, group, 2 * nt, nc, nt, d)
    out, lse = reference.teacher_forcing_attention(*args, context_lens=torch.tensor(lens))
    want = brute_ctx_buf(*args, nt, lambda gi: brute.teacher_forcing(nt, lens[gi], nc))
    check(out, lse, *want, torch.float64)


def test_teacher_forcing_equals_stepwise_decode():
    """Target i of the one-pass density equals a decode step [buf_{i-1}, tgt_i]."""
    nt, nc = 4, 5
    q, k_ctx, v_ctx, k_buf, v_buf = ctx_buf_inputs(1, 2, 1, 2, 2 * nt, nc, nt, 32)
    out, _ = reference.teacher_forcing_attention(q, k_ctx, v_ctx, k_buf, v_buf)
    for i in range(1, nt):
        step_q = torch.stack([q[:, :, :, i - 1], q[:, :, :, nt + i]], 3)
        # The predictor's step: buf_{i-1} in slot i-1 (sees itself), tgt_i in slot i (strict).
        step, _ = reference.shared_context_attention(
            step_q, k_ctx, v_ctx, k_buf, v_buf, buffer_len=i + 1, row_rule=("causal", "strict")
        )
        assert_rel_close(step[:, :, :, 0], out[:, :, :, i - 1], dtype=torch.float64)
        assert_rel_close(step[:, :, :, 1], out[:, :, :, nt + i], dtype=torch.float64)


@SETTINGS
@given(
    nseq=st.integers(1, 3),
    hkv=st.integers(1, 2),
    group=st.sampled_from([1, 2, 4]),
    bs=st.integers(1, 4),
    is_causal=st.booleans(),
    d=HEAD_DIMS,
    data=st.data(),
)
def test_selection_attention_varlen(nseq, hkv, group, bs, is_causal, d, data):
    lqs = data.draw(st.lists(st.integers(0, 5), min_size=nseq, max_size=nseq))
    lks = data.draw(st.lists(st.integers(0, 9), min_size=nseq, max_size=nseq))
    nsel = data.draw(st.integers(1, 3))
    tq, tk = sum(lqs), sum(lks)
    q = torch.randn(tq, hkv * group, d, dtype=torch.float64)
    k, v = torch.randn(2, tk, hkv, d, dtype=torch.float64)
    idx = torch.full((tq, hkv, nsel), -1, dtype=torch.int64)
    row = 0
    for lq, lk in zip(lqs, lks, strict=True):
        nblocks = -(-lk // bs)
        for _ in range(lq):
            picks = data.draw(
                st.lists(st.integers(-1, nblocks - 1), min_size=hkv * nsel, max_size=hkv * nsel)
            )
            idx[row] = torch.tensor(picks).view(hkv, nsel)
            row += 1
    cu_q = torch.tensor([0, *torch.tensor(lqs).cumsum(0).tolist()])
    cu_k = torch.tensor([0, *torch.tensor(lks).cumsum(0).tolist()])
    out, lse = reference.selection_attention(
        q,
        k,
        v,
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        block_indices=idx,
        block_size=bs,
        causal=is_causal,
    )
    want_out = torch.zeros_like(q)
    want_lse = torch.zeros(q.shape[1], tq, dtype=torch.float64)
    for i, (lq, lk) in enumerate(zip(lqs, lks, strict=True)):
        q0, k0 = int(cu_q[i]), int(cu_k[i])
        for h in range(q.shape[1]):
            blocks = idx[q0 : q0 + lq, h // group].tolist()
            vis = brute.selection(blocks, bs, lk, is_causal) if lk else [[] for _ in range(lq)]
            o, l_ = brute.attention(
                q[q0 : q0 + lq, h],
                k[k0 : k0 + lk, h // group],
                v[k0 : k0 + lk, h // group],
                vis,
                d**-0.5,
            )
            want_out[q0 : q0 + lq, h], want_lse[h, q0 : q0 + lq] = o, l_
    check(out, lse, want_out, want_lse, torch.float64)


@SETTINGS
@given(
    nseq=st.integers(1, 4),
    hkv=st.integers(1, 2),
    group=st.integers(1, 3),
    is_causal=st.booleans(),
    d=HEAD_DIMS,
    data=st.data(),
)
def test_varlen_attention(nseq, hkv, group, is_causal, d, data):
    lqs = data.draw(st.lists(st.integers(0, 6), min_size=nseq, max_size=nseq))
    lks = data.draw(st.lists(st.integers(0, 7), min_size=nseq, max_size=nseq))
    q = torch.randn(sum(lqs), hkv * group, d, dtype=torch.float64)
    k, v = torch.randn(2, sum(lks), hkv, d, dtype=torch.float64)
    cu_q = torch.tensor([0, *torch.tensor(lqs).cumsum(0).tolist()])
    cu_k = torch.tensor([0, *torch.tensor(lks).cumsum(0).tolist()])
    out, lse = reference.varlen_attention(
        q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=is_causal
    )
    want_out, want_lse = (
        torch.zeros_like(q),
        torch.zeros(q.shape[1], q.shape[0], dtype=torch.float64),
    )
    for i, (lq, lk) in enumerate(zip(lqs, lks, strict=True)):
        q0, k0 = int(cu_q[i]), int(cu_k[i])
        vis = brute.causal(lq, lk) if is_causal else [[True] * lk for _ in range(lq)]
        for h in range(q.shape[1]):
            o, l_ = brute.attention(
                q[q0 : q0 + lq, h],
                k[k0 : k0 + lk, h // group],
                v[k0 : k0 + lk, h // group],
                vis,
                d**-0.5,
            )
            want_out[q0 : q0 + lq, h], want_lse[h, q0 : q0 + lq] = o, l_
    check(out, lse, want_out, want_lse, torch.float64)


def test_rows_that_see_nothing_are_zero_with_finite_gradients():
    q = torch.randn(1, 2, 4, 16, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, 2, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out, lse = reference.attention(q, k, v, mask=masks.CausalMask(4, 2))
    assert torch.equal(out[:, :, :2], torch.zeros_like(out[:, :, :2]))
    assert torch.isneginf(lse[:, :, :2]).all()
    (out.sum() + lse[:, :, 2:].sum()).backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()


def test_reference_gradients_gradcheck():
    q, k, v = (torch.randn(1, 2, 3, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    spec = masks.ContextTargetMask(3, 3, 2)
    assert torch.autograd.gradcheck(lambda *a: reference.attention(*a, mask=spec)[0], (q, k, v))


def test_fp32_reference_within_fp32_bound():
    gen = torch.Generator().manual_seed(1)
    q, k, v = random_qkv(AWKWARD_SHAPES[4], generator=gen)
    out, lse = reference.attention(q, k, v)
    want_out, want_lse = reference.attention(q.double(), k.double(), v.double())
    check(out, lse, want_out, want_lse, torch.float32)
    assert lse.dtype == torch.float32 and want_lse.dtype == torch.float64


# ---- merge_states ---------------------------------------------------------------------


def test_merge_of_key_split_equals_attention_over_all_keys():
    q, k, v = torch.randn(3, 2, 3, 7, 32, dtype=torch.float64)
    for cut in (0, 3, 7):
        oa, la = reference.attention(q, k[:, :, :cut], v[:, :, :cut])
        ob, lb = reference.attention(q, k[:, :, cut:], v[:, :, cut:])
        out, lse = reference.merge_states(oa, la, ob, lb)
        want_out, want_lse = reference.attention(q, k, v)
        check(out, lse, want_out, want_lse, torch.float64)


@SETTINGS
@given(data=st.data())
def test_merge_is_associative_and_commutative(data):
    ls = st.lists(st.one_of(st.floats(-30, 30), st.just(float("-inf"))), min_size=4, max_size=4)
    lses = [torch.tensor(data.draw(ls), dtype=torch.float64) for _ in range(3)]
    outs = [torch.randn(4, 8, dtype=torch.float64) * torch.isfinite(l).unsqueeze(-1) for l in lses]
    (oa, la), (ob, lb), (oc, lc) = zip(outs, lses, strict=True)
    left = reference.merge_states(*reference.merge_states(oa, la, ob, lb), oc, lc)
    right = reference.merge_states(oa, la, *reference.merge_states(ob, lb, oc, lc))
    swapped = reference.merge_states(ob, lb, oa, la)
    ab = reference.merge_states(oa, la, ob, lb)
    for x, y in ((left, right), (ab, swapped)):
        torch.testing.assert_close(x[0], y[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x[1], y[1], rtol=1e-12, atol=1e-12)
        assert not torch.isnan(x[0]).any() and not torch.isnan(x[1]).any()


def test_merge_minus_inf_sides():
    o = torch.randn(2, 4)
    ninf = torch.full((2,), float("-inf"))
    garbage = torch.full((2, 4), float("nan"))  # a side with LSE -inf contributes nothing
    out, lse = reference.merge_states(o, torch.zeros(2), garbage, ninf)
    assert torch.equal(out, o) and torch.equal(lse, torch.zeros(2))
    out, lse = reference.merge_states(torch.zeros(2, 4), ninf, torch.zeros(2, 4), ninf)
    assert torch.equal(out, torch.zeros(2, 4)) and torch.isneginf(lse).all()


# ---- bad input ------------------------------------------------------------------------

Q, K, V = torch.randn(1, 4, 3, 32), torch.randn(1, 2, 5, 32), torch.randn(1, 2, 5, 32)


@pytest.mark.parametrize(
    "call, arg",
    [
        (lambda: reference.attention(Q[0], K, V), "q"),
        (lambda: reference.attention(Q, K.half(), V), "k"),
        (lambda: reference.attention(Q, K, V[:, :, :4]), "v"),
        (lambda: reference.attention(Q, torch.randn(1, 3, 5, 32), torch.randn(1, 3, 5, 32)), "k"),
        (lambda: reference.attention(Q[..., :8], K[..., :8], V[..., :8]), "head dim"),
        (lambda: reference.attention(Q, K[..., :16], V[..., :16]), "k"),
        (lambda: reference.attention(Q.int(), K, V), "q"),
        (lambda: reference.attention(Q, K, V, scale=-1.0), "scale"),
        (lambda: reference.attention(Q, K, V, mask=masks.CausalMask(3, 4)), "mask"),
        (lambda: reference.attention(Q, K, V, mask=torch.ones(2, 2, dtype=torch.bool)), "mask"),
        (lambda: reference.context_target_attention(Q, K, V, context_lens=6), "context_lens"),
        (
            lambda: reference.context_target_attention(Q, K, V, context_lens=torch.tensor([1, 2])),
            "context_lens",
        ),
    ],
)
def test_attention_bad_input_names_argument(call, arg):
    with pytest.raises(InputError, match=arg):
        call()


def test_shared_context_bad_input_names_argument():
    q, k_ctx, v_ctx, k_buf, v_buf = ctx_buf_inputs(2, 3, 1, 2, 1, 4, 3, 32, torch.float32)
    q4 = torch.randn(2, 3, 2, 4, 32)  # 2*Nt = 4 rows, but the buffer holds 3
    cases = [
        (lambda: reference.shared_context_attention(q[0], k_ctx, v_ctx), "q"),
        (lambda: reference.shared_context_attention(q, k_ctx[:1], v_ctx[:1]), "k_ctx"),
        (lambda: reference.shared_context_attention(q, k_ctx, v_ctx, buffer_len=2), "k_buf"),
        (
            lambda: reference.shared_context_attention(q, k_ctx, v_ctx, k_buf, v_buf, buffer_len=4),
            "k_buf",
        ),
        (
            lambda: reference.shared_context_attention(
                q, k_ctx, v_ctx, k_buf[:, :2], v_buf[:, :2], buffer_len=1
            ),
            "k_buf",
        ),
        (
            lambda: reference.shared_context_attention(
                q, k_ctx, v_ctx, k_buf, v_buf, buffer_len=-1
            ),
            "buffer_len",
        ),
        (
            lambda: reference.shared_context_attention(
                q, k_ctx, v_ctx, context_lens=torch.tensor([5, 1])
            ),
            "context_lens",
        ),
        (lambda: reference.teacher_forcing_attention(q4, k_ctx, v_ctx, k_buf, v_buf), "k_buf"),
        (lambda: reference.teacher_forcing_attention(q, k_ctx, v_ctx, k_buf, v_buf), "q"),
    ]
    for call, arg in cases:
        with pytest.raises(InputError, match=arg):
            call()


@pytest.mark.parametrize("value", [2.7, "3", True], ids=repr)
def test_context_lens_must_be_an_integer(value):
    """Nothing truncated (2.7 was read as 2), parsed ('3') or taken for 1 (True)."""
    with pytest.raises(
        InputError, match=rf"^context_lens: expected an int in \[0, 5\], got {value!r}$"
    ):
        reference.context_target_attention(Q, K, V, context_lens=value)
    with pytest.raises(InputError, match=r"^context_lens: expected dtype int32 or int64"):
        reference.context_target_attention(Q, K, V, context_lens=torch.tensor([2.0]))


@pytest.mark.parametrize("value", [2.0, True, "1", -1, torch.tensor(-1)], ids=repr)
def test_buffer_len_must_be_a_non_negative_integer(value):
    q, k_ctx, v_ctx, k_buf, v_buf = ctx_buf_inputs(2, 3, 1, 2, 1, 4, 3, 32, torch.float32)
    got = value.item() if isinstance(value, torch.Tensor) else value
    with pytest.raises(
        InputError, match=rf"^buffer_len: expected a non-negative int, got {got!r}$"
    ):
        reference.shared_context_attention(q, k_ctx, v_ctx, k_buf, v_buf, buffer_len=value)
    with pytest.raises(InputError, match=r"^buffer_len: expected dtype int32 or int64"):
        reference.shared_context_attention(
            q, k_ctx, v_ctx, k_buf, v_buf, buffer_len=torch.tensor(1.0)
        )


def test_selection_bad_input_names_argument():
    q, k, v = torch.randn(4, 2, 32), torch.randn(6, 1, 32), torch.randn(6, 1, 32)
    idx = torch.zeros(4, 1, 2, dtype=torch.int64)
    ok = {
        "cu_seqlens_q": torch.tensor([0, 4]),
        "cu_seqlens_k": torch.tensor([0, 6]),
        "block_indices": idx,
        "block_size": 2,
    }
    reference.selection_attention(q, k, v, **ok)
    for key, bad in [
        ("cu_seqlens_q", torch.tensor([0, 3])),
        ("cu_seqlens_k", torch.tensor([0, 4, 6])),
        ("block_indices", idx[:, :, :1].expand(4, 2, 1)),
        ("block_indices", idx + 3),
    ]:
        with pytest.raises(InputError, match=key):
            reference.selection_attention(q, k, v, **{**ok, key: bad})
