"""Block selection (`select_blocks`) against a row-by-row brute force, and its output fed to
the selection attention reference."""

from __future__ import annotations

import pytest
import torch

from tabattn_core import reference
from tabattn_core.checks import InputError
from tabattn_core.selection import select_blocks
from tabattn_core.testing import assert_rel_close


def _packed(lqs, lks, h, h_kv, d, dtype=torch.float64):
    q = torch.randn(sum(lqs), h, d, dtype=dtype)
    k = torch.randn(sum(lks), h_kv, d, dtype=dtype)
    cu_q = torch.tensor([0, *torch.tensor(lqs).cumsum(0).tolist()])
    cu_k = torch.tensor([0, *torch.tensor(lks).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, cu_q, cu_k


def _brute(q, k, cu_q, cu_k, bs, top_k, causal, always=()):
    """Per row and kv head, a Python loop over blocks."""
    h_kv = k.shape[1]
    group = q.shape[1] // h_kv
    out = torch.full((q.shape[0], h_kv, top_k), -1, dtype=torch.int64)
    for b in range(cu_q.numel() - 1):
        q0, q1, k0, k1 = (int(x) for x in (cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]))
        lq, lk = q1 - q0, k1 - k0
        for i in range(lq):
            end = min(max(lk - lq + i + 1, 0), lk) if causal else lk
            blocks = list(range((end + bs - 1) // bs))
            for g in range(h_kv):
                qs = q[q0 + i, g * group : (g + 1) * group].sum(0)
                score = {
                    j: float(qs @ k[k0 + j * bs : min(k0 + (j + 1) * bs, k1), g].mean(0))
                    for j in blocks
                }
                last = blocks[-1] if blocks else -1
                forced = {a if a >= 0 else last + 1 + a for a in always} & set(blocks)
                rest = sorted(set(blocks) - forced, key=lambda j: -score[j])
                chosen = sorted([*forced, *rest][:top_k])
                out[q0 + i, g, : len(chosen)] = torch.tensor(chosen, dtype=torch.int64)
    return out


@pytest.mark.parametrize(
    "lqs, lks, h, h_kv, bs, top_k, causal, always",
    [
        ([5, 0, 7], [23, 9, 40], 4, 2, 4, 3, False, ()),
        ([6, 3, 1], [19, 0, 8], 2, 1, 3, 2, True, (0, -1)),
        ([12], [12], 8, 2, 5, 2, True, (-1,)),
    ],
)
def test_matches_brute_force(lqs, lks, h, h_kv, bs, top_k, causal, always):
    q, k, cu_q, cu_k = _packed(lqs, lks, h, h_kv, 16)
    got = select_blocks(
        q, k, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, block_size=bs, top_k=top_k,
        causal=causal, always=always,
    )  # fmt: skip
    assert got.dtype == torch.int64 and got.shape == (sum(lqs), h_kv, top_k)
    assert torch.equal(got, _brute(q, k, cu_q, cu_k, bs, top_k, causal, always))


@pytest.mark.parametrize("causal", [False, True])
def test_top_k_all_blocks_selects_all_and_equals_dense(causal):
    """top_k >= the block count selects every visible block (sorted, -1 padded), and the
    selection attention over them is dense (causal) attention."""
    lqs, lks, bs = [4, 0, 9], [10, 6, 17], 4
    q, k, cu_q, cu_k = _packed(lqs, lks, 4, 2, 16)
    v = torch.randn_like(k)
    got = select_blocks(
        q, k, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, block_size=bs, top_k=6, causal=causal
    )
    seq = torch.searchsorted(cu_q[1:], torch.arange(q.shape[0]), right=True)
    for row in range(q.shape[0]):
        lq, lk = int(cu_q.diff()[seq[row]]), int(cu_k.diff()[seq[row]])
        i = row - int(cu_q[seq[row]])
        end = min(max(lk - lq + i + 1, 0), lk) if causal else lk
        want = list(range((end + bs - 1) // bs)) + [-1] * (6 - (end + bs - 1) // bs)
        assert got[row].tolist() == [want] * 2
    kw = {"cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k, "causal": causal}
    out, lse = reference.selection_attention(q, k, v, block_indices=got, block_size=bs, **kw)
    ref_out, ref_lse = reference.varlen_attention(q, k, v, **kw)
    assert_rel_close(out, ref_out)
    assert_rel_close(lse, ref_lse)


def test_top_k_zero_and_no_keys_give_minus_one():
    q, k, cu_q, cu_k = _packed([3], [0], 2, 2, 16)
    got = select_blocks(q, k, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, block_size=4, top_k=2)
    assert torch.equal(got, torch.full((3, 2, 2), -1))
    q, k, cu_q, cu_k = _packed([3], [8], 2, 2, 16)
    got = select_blocks(q, k, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, block_size=4, top_k=0)
    assert got.shape == (3, 2, 0)


def test_row_chunks_give_the_same_result(monkeypatch):
    q, k, cu_q, cu_k = _packed([30], [50], 4, 1, 16)
    kw = {"cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k, "block_size": 7, "top_k": 3}
    whole = select_blocks(q, k, causal=True, **kw)
    monkeypatch.setattr("tabattn_core.selection.MAX_SCORE_ELEMENTS", 16)
    assert torch.equal(select_blocks(q, k, causal=True, **kw), whole)


@pytest.mark.parametrize(
    "change, arg",
    [
        ({"block_size": 0}, "block_size"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 1, "always": (0, -1)}, "always"),
        ({"cu_seqlens_k": torch.tensor([0, 5])}, "cu_seqlens_k"),
        ({"k": torch.randn(8, 3, 16, dtype=torch.float64)}, "k"),
        ({"k": torch.randn(8, 2, 16)}, "k: expected dtype"),
    ],
)
def test_bad_input_named(change, arg):
    q, k, cu_q, cu_k = _packed([3], [8], 4, 2, 16)
    kw = {"k": k, "cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k, "block_size": 4, "top_k": 2}
    with pytest.raises(InputError, match=arg):
        select_blocks(q, **{**kw, **change})
