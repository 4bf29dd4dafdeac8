"""Selection (block-sparse, NSA-style) attention: launchers -> autograd Function -> public
function.

`selection_attention` is the registry op of the same name: the kernels for
`tabattn_core.reference.selection_attention`, whose contract and docstring it shares.
`validate_block_indices` checks the index values, which the kernels skip when out of range.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

from tabattn_core.checks import InputError
from tabattn_core.contracts import SelectionArgs, selection_args
from tabattn_triton.ops.common import LOG2E, dot_precision, head_block
from tabattn_triton.ops.kernel_checks import check_kernel_tensors
from tabattn_triton.ops.selection.kernel import (
    selection_bwd_dkdv_kernel,
    selection_bwd_dq_kernel,
    selection_fwd_kernel,
    tile_union_kernel,
)

__all__ = ["Selection", "selection_attention", "validate_block_indices"]


@dataclass(frozen=True)
class Selection:
    """Launch parameters shared by forward and backward: int64 offsets on the device, each
    query row's sequence [Tq], the packed index of its sequence's first key [Tq] and its
    visible key count [Tq] (causal applied), each sequence's key blocks (count, first global
    block index) and every global block's sequence."""

    cu_q: torch.Tensor
    cu_k: torch.Tensor
    seq_of_row: torch.Tensor
    row_key_start: torch.Tensor
    row_limits: torch.Tensor
    block_base: torch.Tensor
    block_seq: torch.Tensor
    num_blocks: int
    num_keys: int
    block_size: int
    causal: bool
    group: int


@functools.lru_cache(maxsize=16)
def _selection(
    cu_q_values: tuple[int, ...],
    cu_k_values: tuple[int, ...],
    tq: int,
    block_size: int,
    causal: bool,
    group: int,
    device: torch.device,
) -> Selection:
    """From the (validated) offsets' values: everything the kernels index by row or block.
    Cached: a batch layout seen before (every layer of a model, every step of a loop) costs
    no launches and no host-to-device copies; the kernels only read its tensors."""
    cu_q, cu_k = (torch.tensor(t, dtype=torch.int64) for t in (cu_q_values, cu_k_values))
    counts = (cu_k.diff() + block_size - 1) // block_size
    base = torch.cumsum(counts, 0) - counts
    block_seq = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    cu_q_d, cu_k_d = cu_q.to(device), cu_k.to(device)
    rows = torch.arange(tq, device=device)
    seq = torch.searchsorted(cu_q_d[1:], rows, right=True)
    lk = (cu_k_d[1:] - cu_k_d[:-1])[seq]
    if causal:
        lq = (cu_q_d[1:] - cu_q_d[:-1])[seq]
        limits = torch.minimum((lk - lq + rows - cu_q_d[seq] + 1).clamp(min=0), lk)
    else:
        limits = lk
    return Selection(
        cu_q=cu_q_d,
        cu_k=cu_k_d,
        seq_of_row=seq,
        row_key_start=cu_k_d[seq],
        row_limits=limits,
        block_base=base.to(device),
        block_seq=block_seq.to(device),
        num_blocks=int(counts.sum()),
        num_keys=cu_k_values[-1],
        block_size=block_size,
        causal=causal,
        group=group,
    )


def _block_n(block_size: int, block_d: int, cap_at_64: int) -> int:
    """Keys per dot tile: the block (power-of-two padded, >= 16), capped by the head dim."""
    cap = 128 if block_d <= cap_at_64 else 64 if block_d <= 2 * cap_at_64 else 32
    return min(max(16, triton.next_power_of_2(block_size)), cap)


def _block_h(group: int) -> int:
    """(row, head) pairs of a forward / dQ tile: the group padded to a power of two, at
    least 16 (tl.dot); 16 // that many rows when the group is smaller."""
    return max(16, triton.next_power_of_2(group))


def _flags(q: torch.Tensor, sel: Selection, *, dkdv: bool = False) -> dict:
    block_d = head_block(q.shape[2])
    flags = {
        "BLOCK_SIZE": sel.block_size,
        "BLOCK_N": _block_n(sel.block_size, block_d, 32 if dkdv else 64),
        "BLOCK_H": _block_h(sel.group),
        "BLOCK_D": block_d,
        "DOT_PRECISION": dot_precision(q.dtype),
    }
    if dkdv:
        return {**flags, "CAUSAL": sel.causal, "GROUP_P2": triton.next_power_of_2(sel.group)}
    return flags


@dataclass(frozen=True)
class RowTiles:
    """The forward / dQ walk: rows per tile, tiles, and (several rows per tile) each tile's
    distinct chosen blocks as first keys, ascending [H_kv * n_tiles, rows * BLOCK_S] int64
    (BLOCK_S: n_sel padded to a power of two), which of the tile's rows chose each (bit r:
    row r; int32, same shape) and their count [H_kv * n_tiles] int32 (None with one row per
    tile)."""

    rows: int
    n_tiles: int
    keys: torch.Tensor | None
    row_bits: torch.Tensor | None
    counts: torch.Tensor | None


# Rows per forward / dQ tile: the union walk (as many rows as the tile holds) is used when the
# rows are expected to share blocks: when, for selections drawn uniformly from a sequence's
# blocks, the expected distinct share of a tile's choices is below UNION_MAX_DISTINCT.
# Measured (H200, bf16, 4096 rows, 16 blocks of 64 per row, walk kernels only): GQA 1 union
# 2.1-2.25x faster at 8k keys and 1.08-1.18x at 64k (distinct share 0.44 and 0.89); GQA 4
# 1.1x faster at 8k (0.83) and 0.95-1.03x at 64k (0.97).
UNION_MAX_DISTINCT = 0.95


def _tile_rows(sel: Selection, n_sel: int) -> int:
    """Rows per tile: the most a tile holds (16 // the group padded to a power of two) when
    the expected distinct share of their n_sel choices each, over the average sequence's
    blocks, is below UNION_MAX_DISTINCT, else 1."""
    rows = _block_h(sel.group) // triton.next_power_of_2(sel.group)
    blocks = sel.num_blocks / max(sel.cu_k.numel() - 1, 1)
    picks = rows * n_sel
    if rows == 1 or picks == 0 or blocks < 1:
        return 1
    distinct = blocks * (1 - (1 - 1 / blocks) ** picks) / picks
    return rows if distinct < UNION_MAX_DISTINCT else 1


def row_tiles(bi: torch.Tensor, sel: Selection, rows: int | None = None) -> RowTiles:
    """The walk of `rows` rows per tile (default `_tile_rows`); for several, each tile's union
    of chosen blocks per kv head (one launch, no host sync). A row's entry counts when it is
    >= 0 and its block starts before the row's visible end, as in the walk kernels."""
    tq, h_kv, n_sel = bi.shape
    rows = rows or _tile_rows(sel, n_sel)
    n_tiles = triton.cdiv(tq, rows)
    if rows == 1 or tq * h_kv * n_sel == 0:
        return RowTiles(rows, n_tiles, None, None, None)
    block_s = triton.next_power_of_2(n_sel)
    keys = torch.empty((h_kv * n_tiles, rows * block_s), device=bi.device, dtype=torch.int64)
    row_bits = torch.empty(keys.shape, device=bi.device, dtype=torch.int32)
    counts = torch.empty(h_kv * n_tiles, device=bi.device, dtype=torch.int32)
    tile_union_kernel[(h_kv * n_tiles,)](
        bi, sel.row_key_start, sel.row_limits, keys, row_bits, counts, *bi.stride(),
        tq, sel.num_keys, n_tiles, n_sel, BLOCK_SIZE=sel.block_size, ROWS=rows, BLOCK_S=block_s,
    )  # fmt: skip
    return RowTiles(rows, n_tiles, keys, row_bits, counts)


def _walk_args(bi: torch.Tensor, sel: Selection, tiles: RowTiles) -> tuple:
    """Kernel arguments of the walk (`row_tile` / `tile_entry`): its tables, the key table's
    row stride, and its constexprs HEAD_SLOTS and BLOCK_S."""
    constexprs = {
        "HEAD_SLOTS": _block_h(sel.group) // tiles.rows,
        "BLOCK_S": triton.next_power_of_2(max(bi.shape[2], 1)),
    }
    if tiles.keys is None:  # one row per tile: the tables are not read
        return (sel.row_key_start, sel.row_limits, bi, bi, bi), 0, constexprs
    tables = (sel.row_key_start, sel.row_limits, tiles.keys, tiles.row_bits, tiles.counts)
    return tables, tiles.keys.stride(0), constexprs


def selection_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bi: torch.Tensor,
    sel: Selection,
    tiles: RowTiles,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward; returns out [Tq, H, D] (q.dtype) and lse [H, Tq] fp32."""
    tq, h, d = q.shape
    h_kv, n_sel = k.shape[1], bi.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty((h, tq), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    tables, stride_tk, walk = _walk_args(bi, sel, tiles)
    selection_fwd_kernel[(h_kv * tiles.n_tiles,)](
        q, k, v, out, lse, bi, *tables,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *bi.stride(), stride_tk,
        tq, sel.num_keys, tiles.n_tiles, sel.group, n_sel, d, scale * LOG2E,
        **walk, **_flags(q, sel),
    )  # fmt: skip
    return out, lse


def inverted_index(bi: torch.Tensor, sel: Selection) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows that select each (kv head, global key block), with torch ops (no host sync).

    Entries that are -1, out of range, past the row's visible keys or repeated are dropped
    (repeats become row -1). Returns offsets int64 [H_kv * num_blocks + 1] and rows int32
    [Tq * H_kv * n_sel]: the rows of key h_kv * num_blocks + block are
    rows[offsets[key]:offsets[key + 1]], ascending, then the dropped entries.
    """
    tq, h_kv, _ = bi.shape
    blk = bi.to(torch.int64)
    visible = (blk >= 0) & (blk * sel.block_size < sel.row_limits[:, None, None])
    heads = torch.arange(h_kv, device=bi.device)[None, :, None]
    key = heads * sel.num_blocks + sel.block_base[sel.seq_of_row][:, None, None] + blk
    dropped = h_kv * sel.num_blocks
    key = torch.where(visible, key, dropped)
    rows = torch.arange(tq, device=bi.device)[:, None, None]
    order = torch.sort((key * tq + rows).flatten()).values
    keys, row_of = order // tq, order % tq
    row_of[1:] = torch.where(order[1:] == order[:-1], -1, row_of[1:])
    offsets = torch.searchsorted(keys, torch.arange(dropped + 1, device=bi.device))
    return offsets, row_of.to(torch.int32)


def selection_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    bi: torch.Tensor,
    sel: Selection,
    tiles: RowTiles,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward (dQ + delta per row, then dK/dV per key block); returns dq, dk,
    dv in the layouts of q, k, v."""
    tq, h, d = q.shape
    h_kv, n_sel = k.shape[1], bi.shape[2]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if tq == 0 or h == 0 or sel.num_blocks == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    if do.stride(-1) != 1:
        do = do.contiguous()
    delta = torch.empty((h, tq), device=q.device, dtype=torch.float32)
    tables, stride_tk, walk = _walk_args(bi, sel, tiles)
    selection_bwd_dq_kernel[(h_kv * tiles.n_tiles,)](
        q, k, v, out, do, dq, lse, delta, bi, *tables,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *do.stride(), *dq.stride(),
        *bi.stride(), stride_tk, tq, sel.num_keys, tiles.n_tiles, sel.group, n_sel, d, scale,
        scale * LOG2E, **walk, **_flags(q, sel),
    )  # fmt: skip
    offsets, rows = inverted_index(bi, sel)
    flags = _flags(q, sel, dkdv=True)
    subs = triton.cdiv(sel.block_size, flags["BLOCK_N"])
    selection_bwd_dkdv_kernel[(h_kv * sel.num_blocks * subs,)](
        q, k, v, do, dk, dv, lse, delta, sel.cu_q, sel.cu_k, sel.block_seq, sel.block_base,
        offsets, rows,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        tq, sel.group, sel.num_blocks, d, scale, scale * LOG2E, **flags,
    )  # fmt: skip
    return dq, dk, dv


class SelectionAttentionFunction(torch.autograd.Function):
    """Saves q, k, v, out, lse, the block indices and the row tiles' walk; the LSE output is
    not differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, block_indices, sel: Selection, scale: float):
        tiles = row_tiles(block_indices, sel)
        out, lse = selection_fwd(q, k, v, block_indices, sel, tiles, scale)
        ctx.save_for_backward(q, k, v, out, lse, block_indices)
        ctx.sel, ctx.tiles, ctx.scale = sel, tiles, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, out, lse, bi = ctx.saved_tensors
        dq, dk, dv = selection_bwd(do, q, k, v, out, lse, bi, ctx.sel, ctx.tiles, ctx.scale)
        return dq, dk, dv, None, None, None


def _checked(q, k, v, **kwargs) -> tuple[SelectionArgs, Selection]:
    """The contract (`tabattn_core.contracts.selection_args`), the kernels' checks and the
    launch tables of the offsets."""
    args = selection_args(q, k, v, **kwargs)
    check_kernel_tensors(q=q, k=k, v=v)
    sel = _selection(
        tuple(args.cu_seqlens_q.tolist()), tuple(args.cu_seqlens_k.tolist()), q.shape[0],
        args.block_size, args.causal, args.group, q.device,
    )  # fmt: skip
    return args, sel


def selection_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    block_indices: torch.Tensor,
    block_size: int,
    causal: bool = False,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernels for `tabattn_core.reference.selection_attention` (its contract and
    docstring), forward and backward, group-centric: all H // H_kv query heads of a kv
    head share each K/V load. Any strides with a unit stride on D; fp16, bf16 or fp32 on
    CUDA (CPU under TRITON_INTERPRET=1). Index entries outside [-1, blocks of the sequence
    - 1] are skipped (`validate_block_indices` raises for them instead); a row that selected
    no visible key gets out 0, lse -inf and zero gradients."""
    args, sel = _checked(
        q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        block_indices=block_indices, block_size=block_size, causal=causal, scale=scale,
    )  # fmt: skip
    return SelectionAttentionFunction.apply(q, k, v, block_indices, sel, args.scale)


def validate_block_indices(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> None:
    """The arguments of `selection_attention` (same keywords), and its block indices' values
    in [-1, blocks of the row's sequence - 1], as the reference demands; InputError naming
    block_indices otherwise (one device sync)."""
    args, sel = _checked(q, k, v, **kwargs)
    block_indices = kwargs["block_indices"]
    counts = ((args.cu_seqlens_k.diff() + sel.block_size - 1) // sel.block_size).to(
        block_indices.device
    )
    top = counts[sel.seq_of_row][:, None, None]
    bad = (block_indices < -1) | (block_indices >= top)
    if bool(bad.any()):
        row, head, slot = (int(i) for i in bad.nonzero()[0])
        raise InputError(
            f"block_indices: expected values in [-1, {int(top[row, 0, 0]) - 1}] at row {row} "
            f"(its sequence has {int(top[row, 0, 0])} blocks of {sel.block_size}), got "
            f"{int(block_indices[row, head, slot])} at [{row}, {head}, {slot}]"
        )
