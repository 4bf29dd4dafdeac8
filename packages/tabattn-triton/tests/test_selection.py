"""Selection attention kernels against the tabattn-core reference: output, LSE, dq/dk/dv.

CPU: under the Triton interpreter (fp32/fp16, tiny shapes). GPU (`-m gpu`): bf16 / fp16 at
real sizes, GQA 1/4/16, block sizes 32/64/128, D 48..256. Outputs are NaN-poisoned
(conftest), so unwritten elements fail.
"""

from __future__ import annotations

import pytest
import torch

from tabattn_core import reference
from tabattn_core.checks import InputError
from tabattn_core.selection import select_blocks
from tabattn_core.testing import REL_TOL, assert_rel_close
from tabattn_triton.ops.selection import interface as selection_interface
from tabattn_triton.ops.selection import selection_attention, validate_block_indices

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_case(lqs, lks, h, h_kv, d, bs, n_sel, dtype, *, layout="packed"):
    """Packed q [Tq, H, D], k/v [Tk, H_kv, D] (layout "strided": views of [H, T, D]
    storage), offsets, and random block indices with -1s, repeats and all blocks in range."""

    def t(rows, heads):
        if layout == "strided":
            x = torch.randn(heads, rows, d, device=DEVICE).transpose(0, 1)
        else:
            x = torch.randn(rows, heads, d, device=DEVICE)
        return x.to(dtype).requires_grad_()

    q, k, v = t(sum(lqs), h), t(sum(lks), h_kv), t(sum(lks), h_kv)
    cu_q = torch.tensor([0, *torch.tensor(lqs).cumsum(0).tolist()], device=DEVICE)
    cu_k = torch.tensor(
        [0, *torch.tensor(lks).cumsum(0).tolist()], device=DEVICE, dtype=torch.int32
    )
    seq = torch.searchsorted(cu_q[1:], torch.arange(sum(lqs), device=DEVICE), right=True)
    blocks = ((cu_k.diff().long() + bs - 1) // bs)[seq]
    bi = (torch.rand(sum(lqs), h_kv, n_sel, device=DEVICE) * (blocks[:, None, None] + 1)).long()
    return q, k, v, cu_q, cu_k, bi - 1


def compare(q, k, v, cu_q, cu_k, bi, bs, causal, dtype, *, scale=None, dense_ref=False):
    """Kernel vs fp64 reference (selection, or with dense_ref the varlen dense attention):
    out, lse, dq, dk, dv."""
    kw = {"cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k, "causal": causal, "scale": scale}
    validate_block_indices(q, k, v, block_indices=bi, block_size=bs, **kw)
    out, lse = selection_attention(q, k, v, block_indices=bi, block_size=bs, **kw)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    if dense_ref:
        ref_out, ref_lse = reference.varlen_attention(q64, k64, v64, **kw)
    else:
        ref_out, ref_lse = reference.selection_attention(
            q64, k64, v64, block_indices=bi, block_size=bs, **kw
        )
    ref_grads = torch.autograd.grad(ref_out, (q64, k64, v64), do.double())
    tol = dtype if dtype != torch.float32 or DEVICE == "cpu" else "tf32"
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_rel_close(out, ref_out, dtype=tol, name="out")
    assert_rel_close(lse, ref_lse, dtype=tol, name="lse")
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        # gradients accumulate over many tiles: allow 2x the forward bound
        assert_rel_close(g, rg, tol=2 * REL_TOL[tol], name=name)
    return out, lse, grads


# ---- CPU (interpreter) and GPU: tiny shapes --------------------------------------------

CASES = [
    # (lqs, lks, H, H_kv, D, block size, n_sel, causal): odd lengths, an empty sequence,
    # short last blocks, GQA 1, 2 and 16 (16 and 8 rows per tile, tiles across sequences;
    # one row per tile), D = 48, block sizes not a multiple of the tile
    ([3, 0, 4], [40, 9, 33], 4, 2, 48, 16, 3, False),
    ([4, 0, 5], [40, 9, 33], 2, 1, 32, 16, 3, True),
    ([6, 2], [20, 0], 2, 2, 16, 5, 2, True),
    ([5, 2], [40, 17], 16, 1, 16, 8, 4, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-H{c[2]}:{c[3]}-causal{c[7]}")
def test_matches_reference_fp32(case):
    lqs, lks, h, h_kv, d, bs, n_sel, causal = case
    q, k, v, cu_q, cu_k, bi = make_case(lqs, lks, h, h_kv, d, bs, n_sel, torch.float32)
    compare(q, k, v, cu_q, cu_k, bi, bs, causal, torch.float32)


@pytest.mark.parametrize("union", [True, False], ids=["union", "one-row"])
def test_rows_per_tile_choice(monkeypatch, union):
    """Both walks give the reference: the union (the rule's pick when rows share blocks)
    and one padded row per tile (forced), GQA 2, causal, varlen."""
    monkeypatch.setattr(selection_interface, "UNION_MAX_DISTINCT", 1.0 if union else 0.0)
    q, k, v, cu_q, cu_k, bi = make_case([5, 0, 6], [40, 9, 33], 4, 2, 32, 8, 5, torch.float32)
    sel = selection_interface._selection(
        tuple(cu_q.tolist()), tuple(cu_k.tolist()), 11, 8, True, 2, q.device
    )
    assert selection_interface.row_tiles(bi, sel).rows == (8 if union else 1)
    compare(q, k, v, cu_q, cu_k, bi, 8, True, torch.float32)


def test_row_tiles_union_table():
    """Each tile's union: its rows' counted blocks (>= 0, starting before the row's causal
    end) as distinct first keys ascending, a bit per row that chose each, and the count."""
    q, _, _, cu_q, cu_k, bi = make_case([7, 0, 6], [40, 9, 33], 4, 2, 16, 8, 5, torch.float32)
    sel = selection_interface._selection(
        tuple(cu_q.tolist()), tuple(cu_k.tolist()), 13, 8, True, 2, q.device
    )
    tiles = selection_interface.row_tiles(bi, sel, 4)
    assert (tiles.rows, tiles.n_tiles) == (4, 4)
    for h in range(2):
        for t in range(4):
            chosen: dict[int, int] = {}
            for r, row in enumerate(range(4 * t, min(4 * t + 4, 13))):
                first, limit = int(sel.row_key_start[row]), int(sel.row_limits[row])
                for blk in bi[row, h].tolist():
                    if blk >= 0 and blk * 8 < limit:
                        chosen[first + blk * 8] = chosen.get(first + blk * 8, 0) | 1 << r
            n = int(tiles.counts[h * 4 + t])
            assert n == len(chosen)
            assert tiles.keys[h * 4 + t, :n].tolist() == sorted(chosen)
            assert tiles.row_bits[h * 4 + t, :n].tolist() == [chosen[c] for c in sorted(chosen)]


def test_fp16_strided_layout_and_scale():
    q, k, v, cu_q, cu_k, bi = make_case(
        [4, 3], [30, 17], 4, 1, 32, 16, 2, torch.float16, layout="strided"
    )
    assert not q.is_contiguous()
    compare(q, k, v, cu_q, cu_k, bi.to(torch.int32), 16, True, torch.float16, scale=0.3)


def test_all_blocks_selected_is_dense_attention():
    """Every block selected (in reverse order, with repeats) = varlen dense attention."""
    lqs, lks, bs = [3, 4], [40, 33], 16
    q, k, v, cu_q, cu_k, _ = make_case(lqs, lks, 2, 1, 16, bs, 1, torch.float32)
    all_blocks = torch.tensor([2, 1, 0, 1], device=DEVICE)
    bi = all_blocks.expand(sum(lqs), 1, 4).contiguous()
    compare(q, k, v, cu_q, cu_k, bi, bs, False, torch.float32, dense_ref=True)


def test_empty_selection_gives_zero_minus_inf_and_zero_grads():
    """Row 0 selects nothing (-1), row 1 only block 2 (keys 32..39), past its causal end
    (it sees keys 0..29): out 0, lse -inf, zero dq, no NaN anywhere. One block per row."""
    q, k, v, cu_q, cu_k, bi = make_case([12], [40], 2, 1, 16, 16, 1, torch.float32)
    bi = bi.clamp(0, 1)
    bi[0], bi[1] = -1, 2
    out, lse, (dq, dk, dv) = compare(q, k, v, cu_q, cu_k, bi, 16, True, torch.float32)
    for row in (0, 1):
        assert torch.equal(out[row], torch.zeros_like(out[row]))
        assert torch.isneginf(lse[:, row]).all()
        assert torch.equal(dq[row], torch.zeros_like(dq[row]))
    assert torch.isfinite(lse[:, 2:]).all()
    assert all(torch.isfinite(t).all() for t in (out, dq, dk, dv))
    assert torch.equal(dk[32:], torch.zeros_like(dk[32:]))  # block 2: no row sees it


def test_out_of_range_indices_skipped_or_rejected():
    """Without validation the kernels skip indices past the sequence's blocks (and < -1);
    validate_block_indices raises InputError naming block_indices."""
    q, k, v, cu_q, cu_k, bi = make_case([3, 2], [20, 40], 2, 1, 16, 16, 2, torch.float32)
    bad = bi.clone()
    bad[0, 0, 0], bad[4, 0, 1] = 2, -5  # sequence 0 has blocks 0..1
    kw = {"cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k, "block_size": 16}
    with pytest.raises(InputError, match="block_indices: expected values in"):
        validate_block_indices(q, k, v, block_indices=bad, **kw)
    out, lse = selection_attention(q, k, v, block_indices=bad, **kw)
    cleaned = bad.clone()
    cleaned[0, 0, 0], cleaned[4, 0, 1] = -1, -1
    ref_out, ref_lse = reference.selection_attention(
        q.double(), k.double(), v.double(), block_indices=cleaned, **kw
    )
    assert_rel_close(out, ref_out)
    assert_rel_close(lse, ref_lse)


def test_backward_is_deterministic():
    q, k, v, cu_q, cu_k, bi = make_case([4], [40], 2, 1, 16, 16, 3, torch.float32)
    kw = {"cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k, "block_indices": bi, "block_size": 16}
    do = torch.randn(4, 2, 16, device=DEVICE)
    runs = [
        torch.autograd.grad(selection_attention(q, k, v, **kw)[0], (q, k, v), do) for _ in range(2)
    ]
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_row_and_block_tables_are_cached_per_offsets():
    """A batch layout seen before reuses its tables (no launches or copies), by the offsets'
    values whatever tensors hold them; other offsets or block sizes get their own, and the
    results equal an uncached run's."""
    selection_interface._selection.cache_clear()
    q, k, v, cu_q, cu_k, bi = make_case([5, 3], [37, 20], 2, 1, 16, 8, 3, torch.float32)
    kw = {"block_indices": bi, "block_size": 8}
    first = selection_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **kw)
    again = selection_attention(q, k, v, cu_seqlens_q=cu_q.clone(), cu_seqlens_k=cu_k.long(), **kw)
    info = selection_interface._selection.cache_info()
    assert (info.misses, info.hits) == (1, 1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    other_k = torch.tensor([0, 40, 57], device=cu_k.device)
    k2, v2 = k[:57], v[:57]
    got = selection_attention(q, k2, v2, cu_seqlens_q=cu_q, cu_seqlens_k=other_k, **kw)
    assert selection_interface._selection.cache_info().misses == 2
    selection_interface._selection.cache_clear()
    want = selection_attention(q, k2, v2, cu_seqlens_q=cu_q, cu_seqlens_k=other_k, **kw)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_kernels_agree_with_the_dense_path():
    """The sparse kernels and the dense masked path (the reference) agree."""
    q, k, v, cu_q, cu_k, bi = make_case([4], [40], 2, 1, 16, 16, 1, torch.float32)
    kw = {"cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k, "block_indices": bi, "block_size": 16}
    sparse = selection_attention(q, k, v, **kw)
    dense = reference.selection_attention(q, k, v, **kw)
    for a, b in zip(sparse, dense, strict=True):
        assert_rel_close(a, b, tol=1e-5)


def test_select_blocks_feeds_the_kernel():
    q, k, v, cu_q, cu_k, _ = make_case([3, 4], [45, 30], 4, 2, 16, 16, 1, torch.float32)
    bi = select_blocks(
        q.detach(), k.detach(), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, block_size=16,
        top_k=2, causal=True, always=(-1,),
    )  # fmt: skip
    compare(q, k, v, cu_q, cu_k, bi, 16, True, torch.float32)


@pytest.mark.parametrize(
    "change, arg",
    [
        ({"block_indices": torch.zeros(4, 2, 1)}, "block_indices: expected dtype"),
        (
            {"block_indices": torch.zeros(4, 1, 1, dtype=torch.int64)},
            "block_indices: expected shape",
        ),
        ({"block_size": 0}, "block_size"),
        ({"cu_seqlens_k": torch.tensor([0, 3, 9])}, "cu_seqlens_k"),
        ({"q": torch.randn(4, 3, 16)}, "k: expected a head count"),
        ({"k": torch.randn(9, 2, 32)}, "k: expected shape"),
        ({"q": torch.randn(4, 4, 32)[..., ::2]}, "stride"),
        ({"scale": -1.0}, "scale"),
    ],
)
def test_bad_input_named(change, arg):
    q, k = torch.randn(4, 4, 16), torch.randn(9, 2, 16)
    kw = {
        "q": q, "k": k, "v": k.clone(), "cu_seqlens_q": torch.tensor([0, 4]),
        "cu_seqlens_k": torch.tensor([0, 9]),
        "block_indices": torch.zeros(4, 2, 1, dtype=torch.int64), "block_size": 16,
    }  # fmt: skip
    kw = {name: t.to(DEVICE) if isinstance(t, torch.Tensor) else t for name, t in kw.items()}
    change = {n: t.to(DEVICE) if isinstance(t, torch.Tensor) else t for n, t in change.items()}
    with pytest.raises(InputError, match=arg):
        selection_attention(**{**kw, **change})


# ---- GPU: bf16 / fp16 at real sizes ----------------------------------------------------

GPU_CASES = [
    # (name, lqs, lks, H, H_kv, D, block size, n_sel, causal)
    ("gqa16-d64-bs64", [1000], [8192], 16, 1, 64, 64, 16, False),
    ("gqa4-d128-bs64-causal", [2048], [2048], 16, 4, 128, 64, 16, True),
    ("gqa1-d64-bs32", [700], [4000], 8, 8, 64, 32, 8, False),
    ("gqa16-d128-bs128-causal-varlen", [900, 0, 1500], [3000, 500, 1500], 16, 1, 128, 128, 8, True),
    ("gqa4-d48-bs64-varlen", [333, 1, 800], [2000, 77, 0], 8, 2, 48, 64, 6, False),
    ("gqa2-d80-bs32", [511], [3001], 4, 2, 80, 32, 12, True),
    ("gqa4-d96-bs128", [600], [5000], 16, 4, 96, 128, 4, False),
    ("gqa1-d256-bs64", [300], [2500], 2, 2, 256, 64, 8, False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_gpu_real_sizes(case, dtype):
    _, lqs, lks, h, h_kv, d, bs, n_sel, causal = case
    q, k, v, cu_q, cu_k, bi = make_case(lqs, lks, h, h_kv, d, bs, n_sel, dtype)
    compare(q, k, v, cu_q, cu_k, bi, bs, causal, dtype)


@pytest.mark.gpu
def test_gpu_all_blocks_equal_dense_and_select_blocks():
    """top_k = every block via select_blocks = dense causal attention (bf16, GQA 16)."""
    lqs, lks, bs = [512, 300], [1024, 300], 64
    q, k, v, cu_q, cu_k, _ = make_case(lqs, lks, 16, 1, 64, bs, 1, torch.bfloat16)
    bi = select_blocks(
        q.detach(), k.detach(), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, block_size=bs,
        top_k=16, causal=True,
    )  # fmt: skip
    compare(q, k, v, cu_q, cu_k, bi, bs, True, torch.bfloat16, dense_ref=True)
