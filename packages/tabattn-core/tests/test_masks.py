"""Mask specs checked three ways: dense (from mask_mod) vs rule-by-rule brute force vs the
interval form, and tile classes vs brute-force tiles; mask_mod also through FlexAttention's
own `create_mask` (vmap)."""

from __future__ import annotations

import brute
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_mask

from tabattn_core import masks
from tabattn_core.checks import InputError

BLOCKS = st.sampled_from([1, 2, 3, 4, 5, 8, 16])


def intervals_to_dense(spec: masks.MaskSpec) -> torch.Tensor:
    iv = spec.row_intervals()
    k = torch.arange(spec.kv_len).view(1, 1, 1, 1, -1)
    inside = (k >= iv[..., 0:1]) & (k < iv[..., 1:2])  # [nb, nh, Lq, I, Lk]
    assert inside.numel() == 0 or int(inside.sum(-2).max()) <= 1, "intervals overlap"
    return inside.any(-2).expand(spec.num_batches, spec.num_groups, spec.q_len, spec.kv_len)


def check_spec(spec: masks.MaskSpec, expected: list, bq: int, bk: int) -> None:
    """expected: [nb][nh][Lq][Lk] nested lists of bools."""
    want = torch.tensor(expected, dtype=torch.bool).view(
        spec.num_batches, spec.num_groups, spec.q_len, spec.kv_len
    )
    assert torch.equal(spec.dense(), want)
    assert torch.equal(intervals_to_dense(spec), want)
    want_tiles = torch.tensor(
        [[brute.tiles(m, spec.q_len, spec.kv_len, bq, bk) for m in per_b] for per_b in expected],
        dtype=torch.int8,
    ).view(spec.num_batches, spec.num_groups, -(-spec.q_len // bq), -(-spec.kv_len // bk))
    assert torch.equal(spec.tile_classes(bq, bk), want_tiles)
    if spec.q_len and spec.kv_len:
        heads = spec.num_groups * spec.heads_per_group
        flex = create_mask(spec.mask_mod(), spec.num_batches, heads, spec.q_len, spec.kv_len, "cpu")
        group_heads = torch.arange(spec.num_groups) * spec.heads_per_group
        assert torch.equal(flex[:, group_heads], want)


@settings(max_examples=40, deadline=None)
@given(lq=st.integers(0, 12), lk=st.integers(0, 12), data=st.data(), bq=BLOCKS, bk=BLOCKS)
def test_context_target(lq, lk, data, bq, bk):
    nb = data.draw(st.integers(1, 3))
    lens = data.draw(st.lists(st.integers(0, lk), min_size=nb, max_size=nb))
    spec = masks.ContextTargetMask(lq, lk, torch.tensor(lens))
    check_spec(spec, [[brute.context_target(lq, lk, m)] for m in lens], bq, bk)
    fixed = masks.ContextTargetMask(lq, lk, lens[0])
    check_spec(fixed, [[brute.context_target(lq, lk, lens[0])]], bq, bk)


@settings(max_examples=40, deadline=None)
@given(lq=st.integers(0, 12), lk=st.integers(0, 12), bq=BLOCKS, bk=BLOCKS)
def test_causal_bottom_right(lq, lk, bq, bk):
    check_spec(masks.CausalMask(lq, lk), [[brute.causal(lq, lk)]], bq, bk)


@settings(max_examples=20, deadline=None)
@given(lq=st.integers(0, 12), lk=st.integers(0, 12), bq=BLOCKS, bk=BLOCKS)
def test_causal_top_left(lq, lk, bq, bk):
    expected = [[[k <= i for k in range(lk)] for i in range(lq)]]
    check_spec(masks.CausalMask(lq, lk, align="top_left"), [expected], bq, bk)


def test_causal_is_bottom_right_aligned():
    dense = masks.CausalMask(2, 4).dense()[0, 0]
    assert dense.tolist() == [[True, True, True, False], [True, True, True, True]]
    assert not masks.CausalMask(3, 1).dense()[0, 0, :2].any()


@settings(max_examples=40, deadline=None)
@given(
    lq=st.integers(1, 4),
    t=st.integers(0, 9),
    cap=st.integers(0, 7),
    data=st.data(),
    bq=BLOCKS,
    bk=BLOCKS,
)
def test_buffer_decode(lq, t, cap, data, bq, bk):
    nb = data.draw(st.integers(1, 3))
    lens = data.draw(st.lists(st.integers(0, cap), min_size=nb, max_size=nb))
    rules = data.draw(st.lists(st.sampled_from(["causal", "strict"]), min_size=lq, max_size=lq))
    spec = masks.BufferDecodeMask(lq, t, torch.tensor(lens), context_capacity=cap, row_rule=rules)
    check_spec(spec, [[brute.buffer_decode(lq, t, m, cap, rules)] for m in lens], bq, bk)


def test_buffer_decode_predictor_step():
    # [previous buffer row, next target row] after 2 committed rows: T = 3 with the new row.
    spec = masks.BufferDecodeMask(2, 3, 2, row_rule=("causal", "strict"))
    assert spec.buffer_visible.tolist() == [2, 2]
    first = masks.BufferDecodeMask(1, 1, 2, row_rule="strict")  # step 0: target only
    assert first.buffer_visible.tolist() == [0]


@settings(max_examples=40, deadline=None)
@given(nt=st.integers(0, 7), cap=st.integers(0, 7), data=st.data(), bq=BLOCKS, bk=BLOCKS)
def test_teacher_forcing(nt, cap, data, bq, bk):
    nb = data.draw(st.integers(1, 3))
    lens = data.draw(st.lists(st.integers(0, cap), min_size=nb, max_size=nb))
    spec = masks.TeacherForcingMask(nt, torch.tensor(lens), context_capacity=cap)
    check_spec(spec, [[brute.teacher_forcing(nt, m, cap)] for m in lens], bq, bk)


@settings(max_examples=40, deadline=None)
@given(
    nc=st.integers(0, 6),
    nb=st.integers(0, 4),
    nt=st.integers(0, 12),
    data=st.data(),
    bq=BLOCKS,
    bk=BLOCKS,
)
def test_ar_training_rows(nc, nb, nt, data, bq, bk):
    a = data.draw(st.one_of(st.none(), st.integers(0, 4)))
    spec = masks.ARTrainingRowMask(nc, nb, nt, attending_chunks=a)
    a_eff = (nt // (2 * nb) if nb else 0) if a is None else a
    check_spec(spec, [[brute.ar_training(nc, nb, nt, a_eff)]], bq, bk)


def test_ar_training_rows_peer_config():
    # Training config of the peer: Nb 32, Nt 512 -> A = 8; target 256+ sees the context only.
    spec = masks.ARTrainingRowMask(4, 32, 512)
    assert spec.attending_chunks == 8
    dense = spec.dense()[0, 0]
    t = 4 + 32
    assert dense[t + 0, 4].item() and not dense[t + 0, 5].item()  # target 0 sees buffer 0 only
    assert dense[t + 33, 5].item() and not dense[t + 33, 6].item()  # restarts every 32
    assert not dense[t + 256, 4:].any()


@settings(max_examples=40, deadline=None)
@given(
    lq=st.integers(0, 7),
    lk=st.integers(0, 17),
    bs=st.integers(1, 5),
    is_causal=st.booleans(),
    data=st.data(),
    bq=BLOCKS,
    bk=BLOCKS,
)
def test_selection(lq, lk, bs, is_causal, data, bq, bk):
    nblocks = -(-lk // bs)
    nb, ng, nsel = (
        data.draw(st.integers(1, 2)),
        data.draw(st.integers(1, 3)),
        data.draw(st.integers(1, 4)),
    )
    idx = data.draw(
        st.lists(
            st.integers(-1, nblocks - 1), min_size=nb * ng * lq * nsel, max_size=nb * ng * lq * nsel
        )
    )
    ind = torch.tensor(idx, dtype=torch.int64).view(nb, ng, lq, nsel)
    spec = masks.SelectionMask(ind, block_size=bs, kv_len=lk, causal=is_causal, heads_per_group=2)
    expected = [
        [brute.selection(ind[b, g].tolist(), bs, lk, is_causal) for g in range(ng)]
        for b in range(nb)
    ]
    if lk == 0:
        expected = [[[[] for _ in range(lq)] for _ in range(ng)] for _ in range(nb)]
    check_spec(spec, expected, bq, bk)


def test_tile_classes_example():
    tiles = masks.CausalMask(4, 4).tile_classes(2, 2)[0, 0]
    assert tiles.tolist() == [[masks.PARTIAL, masks.EMPTY], [masks.FULL, masks.PARTIAL]]


@pytest.mark.parametrize(
    "make, arg",
    [
        (lambda: masks.ContextTargetMask(3, 4, 5), "context_lens"),
        (lambda: masks.ContextTargetMask(3, 4, torch.tensor([1.0])), "context_lens"),
        (lambda: masks.ContextTargetMask(-1, 4, 2), "q_len"),
        (lambda: masks.BufferDecodeMask(2, 3, 1, row_rule="sideways"), "row_rule"),
        (lambda: masks.BufferDecodeMask(2, 3, 1, row_rule=("causal",)), "row_rule"),
        (lambda: masks.BufferDecodeMask(1, 1, 4, context_capacity=2), "context_lens"),
        (
            lambda: masks.SelectionMask(
                torch.zeros(1, 1, 2, 1, dtype=torch.int64) + 3, block_size=2, kv_len=5
            ),
            "block_indices",
        ),
        (
            lambda: masks.SelectionMask(
                torch.zeros(1, 2, 1, dtype=torch.int64), block_size=2, kv_len=5
            ),
            "block_indices",
        ),
        (
            lambda: masks.SelectionMask(
                torch.zeros(1, 1, 2, 1, dtype=torch.int64), block_size=0, kv_len=5
            ),
            "block_size",
        ),
        (lambda: masks.CausalMask(3, 3).tile_classes(0, 4), "block_q"),
        (lambda: masks.CausalMask(3, 3, align="middle"), "align"),
    ],
)
def test_bad_arguments_are_named(make, arg):
    with pytest.raises(InputError, match=arg):
        make()
