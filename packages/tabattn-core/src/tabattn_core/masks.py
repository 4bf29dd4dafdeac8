"""Mask specs for the attention patterns of TabPFN-style models.

Every spec answers three questions about the same boolean "query may see key" matrix:

- `mask_mod()`: a FlexAttention `mask_mod(b, h, q_idx, kv_idx) -> bool`, built from
  tensor ops only (it runs under FlexAttention's vmap);
- `dense()`: the matrix itself, `[nb, nh, Lq, Lk]` with nb in {1, B} and nh in {1, groups}
  (broadcast over batch / heads when 1), rendered by evaluating `mask_mod` on the grid;
- `row_intervals()` and `tile_classes(block_q, block_k)`: each query row's visible keys as
  sorted, disjoint half-open intervals, and from them the EMPTY / PARTIAL / FULL class of
  every `block_q x block_k` tile (kernels skip EMPTY tiles and drop masking on FULL ones).

The interval form is written independently of `mask_mod`, so tests check one against the
other. Per-dataset context lengths are int64 tensors `[B]`; fixed lengths are ints.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from tabattn_core.checks import InputError, check_int, check_tensor

__all__ = [
    "EMPTY",
    "FULL",
    "PARTIAL",
    "ARTrainingRowMask",
    "BufferDecodeMask",
    "CausalMask",
    "ContextBufferMask",
    "ContextTargetMask",
    "FullMask",
    "MaskSpec",
    "MaskMod",
    "SelectionMask",
    "TeacherForcingMask",
    "classify_tiles",
]

EMPTY, PARTIAL, FULL = 0, 1, 2

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _lengths(name: str, value: int | torch.Tensor, max_len: int) -> torch.Tensor:
    """An int or an int tensor [B] of lengths in [0, max_len], as int64 [nb]."""
    if isinstance(value, torch.Tensor):
        check_tensor(name, value, ndim=1, dtypes=(torch.int32, torch.int64), dims="[B]")
        t = value.to(torch.int64)
    else:
        t = torch.tensor([check_int(name, value, lo=None)], dtype=torch.int64)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) > max_len):
        raise InputError(
            f"{name}: expected lengths in [0, {max_len}], got min {int(t.min())} max {int(t.max())}"
        )
    return t


def _nonneg(name: str, value: int) -> int:
    return check_int(name, value, lo=0)


class MaskSpec:
    """Base class. Subclasses set `q_len`, `kv_len`, `num_batches` (nb), `num_groups` (nh),
    and implement `mask_mod` and `row_intervals`."""

    q_len: int
    kv_len: int
    num_batches: int = 1
    num_groups: int = 1
    heads_per_group: int = 1

    def mask_mod(self) -> MaskMod:
        raise NotImplementedError

    def row_intervals(self) -> torch.Tensor:
        """Visible keys per query row: int64 `[nb, nh, Lq, I, 2]` half-open, sorted, disjoint."""
        raise NotImplementedError

    def dense(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The boolean matrix `[nb, nh, Lq, Lk]`, evaluated from `mask_mod` on the index grid."""
        mod = self.mask_mod()
        dev = torch.device(device) if device is not None else torch.device("cpu")
        b = torch.arange(self.num_batches, device=dev).view(-1, 1, 1, 1)
        h = (torch.arange(self.num_groups, device=dev) * self.heads_per_group).view(1, -1, 1, 1)
        q = torch.arange(self.q_len, device=dev).view(1, 1, -1, 1)
        k = torch.arange(self.kv_len, device=dev).view(1, 1, 1, -1)
        shape = (self.num_batches, self.num_groups, self.q_len, self.kv_len)
        return mod(b, h, q, k).expand(shape).clone()

    def tile_classes(self, block_q: int, block_k: int) -> torch.Tensor:
        """int8 `[nb, nh, ceil(Lq/block_q), ceil(Lk/block_k)]` of EMPTY / PARTIAL / FULL."""
        return classify_tiles(self.row_intervals(), self.kv_len, block_q, block_k)

    def _to(self, t: torch.Tensor, q_idx: torch.Tensor) -> torch.Tensor:
        return t.to(q_idx.device) if t.device != q_idx.device else t


def classify_tiles(
    intervals: torch.Tensor, kv_len: int, block_q: int, block_k: int
) -> torch.Tensor:
    """Classify tiles from row intervals `[nb, nh, Lq, I, 2]` (see `MaskSpec.row_intervals`).

    A tile is EMPTY when none of its rows sees any of its keys, FULL when every row sees every
    key of the tile (tiles are clipped to Lq x Lk), PARTIAL otherwise.
    """
    if block_q < 1 or block_k < 1:
        raise InputError(f"block_q, block_k: expected positive ints, got {block_q}, {block_k}")
    nb, nh, lq = intervals.shape[:3]
    n_k, n_q = math.ceil(kv_len / block_k), math.ceil(lq / block_q)
    k0 = torch.arange(n_k, dtype=torch.int64) * block_k
    k1 = torch.clamp(k0 + block_k, max=kv_len)
    start, end = intervals[..., 0, None], intervals[..., 1, None]  # [nb, nh, Lq, I, 1]
    covered = (torch.minimum(end, k1) - torch.maximum(start, k0)).clamp(min=0).sum(-2)
    width = (k1 - k0).clamp(min=0)  # [n_k]
    pad = n_q * block_q - lq
    row_empty = torch.nn.functional.pad(covered == 0, (0, 0, 0, pad), value=True)
    row_full = torch.nn.functional.pad(covered == width, (0, 0, 0, pad), value=True)
    tile_empty = row_empty.view(nb, nh, n_q, block_q, n_k).all(3)
    tile_full = row_full.view(nb, nh, n_q, block_q, n_k).all(3)
    out = torch.full((nb, nh, n_q, n_k), PARTIAL, dtype=torch.int8)
    out[tile_full] = FULL
    out[tile_empty & ~tile_full] = EMPTY
    return out


def _single_interval(start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """Stack broadcast [nb, nh, Lq] start/end into `[nb, nh, Lq, 1, 2]` (empty when end<=start)."""
    start, end = torch.broadcast_tensors(start, end)
    end = torch.maximum(end, start)
    return torch.stack([start, end], -1).unsqueeze(-2)


class FullMask(MaskSpec):
    """No mask: every query sees every key.

    ```
    q\\k ■ ■ ■
        ■ ■ ■
    ```
    """

    def __init__(self, q_len: int, kv_len: int):
        self.q_len, self.kv_len = _nonneg("q_len", q_len), _nonneg("kv_len", kv_len)

    def mask_mod(self) -> MaskMod:
        def full(b, h, q_idx, kv_idx):
            return q_idx >= 0

        return full

    def row_intervals(self) -> torch.Tensor:
        return _single_interval(
            torch.zeros(1, 1, self.q_len, dtype=torch.int64),
            torch.full((1, 1, self.q_len), self.kv_len, dtype=torch.int64),
        )


class ContextTargetMask(MaskSpec):
    """Context-target ("rectangular") attention: every query sees keys `k < M_b`.

    Queries are the M context rows followed by the N target rows of dataset b; keys are the
    context rows (kv_len >= max M_b; keys at or past M_b are padding). M is an int or an
    int tensor `[B]` (per-dataset context lengths).

    ```
              ctx (M)  pad
    ctx  (M)  ■ ■ ■ ■  · ·
    tgt  (N)  ■ ■ ■ ■  · ·
    ```
    """

    def __init__(self, q_len: int, kv_len: int, context_lens: int | torch.Tensor):
        self.q_len, self.kv_len = _nonneg("q_len", q_len), _nonneg("kv_len", kv_len)
        self.context_lens = _lengths("context_lens", context_lens, self.kv_len)
        self.num_batches = self.context_lens.numel()

    def mask_mod(self) -> MaskMod:
        lens = self.context_lens

        def context_target(b, h, q_idx, kv_idx):
            return kv_idx < self._to(lens, q_idx)[b]

        return context_target

    def row_intervals(self) -> torch.Tensor:
        end = self.context_lens.view(-1, 1, 1).expand(-1, 1, self.q_len)
        return _single_interval(torch.zeros_like(end), end)


class CausalMask(MaskSpec):
    """Causal. Bottom-right aligned by default: query i sees keys `k <= Lk - Lq + i` (the
    KV-cache rule); `align="top_left"` gives torch SDPA's `is_causal` rule `k <= i`.

    With bottom-right alignment and Lq > Lk the first `Lq - Lk` queries see nothing
    (output 0, LSE -inf).

    ```
    Lq=2, Lk=4:  bottom_right  ■ ■ ■ ·    top_left  ■ · · ·
                               ■ ■ ■ ■              ■ ■ · ·
    ```
    """

    ALIGNS = ("bottom_right", "top_left")

    def __init__(self, q_len: int, kv_len: int, *, align: str = "bottom_right"):
        self.q_len, self.kv_len = _nonneg("q_len", q_len), _nonneg("kv_len", kv_len)
        if align not in self.ALIGNS:
            raise InputError(f"align: expected one of {self.ALIGNS}, got {align!r}")
        self.align = align
        # query i sees keys k <= i + offset
        self.offset = self.kv_len - self.q_len if align == "bottom_right" else 0

    def mask_mod(self) -> MaskMod:
        offset = self.offset

        def causal(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + offset

        return causal

    def row_intervals(self) -> torch.Tensor:
        q = torch.arange(self.q_len, dtype=torch.int64).view(1, 1, -1)
        end = (q + self.offset + 1).clamp(0, self.kv_len)
        return _single_interval(torch.zeros_like(end), end)


class ContextBufferMask(MaskSpec):
    """Keys `[context (capacity Nc_cap) | buffer (T)]`; query row q sees the first `M_b`
    context keys and the first `buffer_visible[q]` buffer keys. Base of the decode and
    teacher-forcing masks; the kernels take exactly `context_lens` and `buffer_visible`."""

    context_capacity: int
    buffer_len: int
    context_lens: torch.Tensor  # int64 [nb]
    buffer_visible: torch.Tensor  # int64 [Lq]

    def _init_context(self, context_lens: int | torch.Tensor, context_capacity: int | None) -> None:
        if context_capacity is None:
            if isinstance(context_lens, torch.Tensor):
                context_capacity = int(context_lens.max()) if context_lens.numel() else 0
            else:
                context_capacity = int(context_lens)
        self.context_capacity = _nonneg("context_capacity", context_capacity)
        self.context_lens = _lengths("context_lens", context_lens, self.context_capacity)
        self.num_batches = self.context_lens.numel()

    def mask_mod(self) -> MaskMod:
        lens, vis, cap = self.context_lens, self.buffer_visible, self.context_capacity
        last_row = max(self.q_len - 1, 0)

        def context_buffer(b, h, q_idx, kv_idx):
            in_context = kv_idx < self._to(lens, q_idx)[b]
            row_vis = self._to(vis, q_idx)[q_idx.clamp(0, last_row)]
            in_buffer = (kv_idx >= cap) & (kv_idx - cap < row_vis)
            return in_context | in_buffer

        return context_buffer

    def row_intervals(self) -> torch.Tensor:
        nb, lq, cap = self.num_batches, self.q_len, self.context_capacity
        ctx_end = self.context_lens.view(-1, 1, 1).expand(nb, 1, lq)
        buf_end = (cap + self.buffer_visible).view(1, 1, lq).expand(nb, 1, lq)
        ctx = _single_interval(torch.zeros_like(ctx_end), ctx_end)
        buf = _single_interval(torch.full_like(buf_end, cap), buf_end)
        return torch.cat([ctx, buf], -2)


class BufferDecodeMask(ContextBufferMask):
    """One decode step of joint sampling: Lq new rows per sample path over the shared
    context and the path's buffer of T rows, the new rows occupying the last Lq buffer slots.

    Row q's rule: "causal" sees buffer slots `0 .. T-Lq+q` (itself included), "strict" sees
    `0 .. T-Lq+q-1` (not itself). `row_rule` is one rule for all rows or one per row. The
    predictor's step [previous buffer row, next target row] is ("causal", "strict"): the
    buffer row sees itself, the target sees the new buffer row but nobody sees the target.
    When T < Lq, rows whose slot would be negative see no buffer row (T = 0 is legal).

    ```
    T=3, Lq=2, ("causal","strict"):   ctx   buf0 buf1 tgt
                          buf1 (q=0)  ■ ■   ■    ■    ·
                          tgt  (q=1)  ■ ■   ■    ■    ·
    ```
    """

    RULES = ("causal", "strict")

    def __init__(
        self,
        q_len: int,
        buffer_len: int,
        context_lens: int | torch.Tensor,
        *,
        context_capacity: int | None = None,
        row_rule: str | Sequence[str] = "causal",
    ):
        self.q_len, self.buffer_len = _nonneg("q_len", q_len), _nonneg("buffer_len", buffer_len)
        self._init_context(context_lens, context_capacity)
        rules = [row_rule] * self.q_len if isinstance(row_rule, str) else list(row_rule)
        if len(rules) != self.q_len or any(r not in self.RULES for r in rules):
            raise InputError(
                f"row_rule: expected 'causal', 'strict' or a sequence of them of length "
                f"{self.q_len}, got {row_rule!r}"
            )
        self.row_rule = tuple(rules)
        own_slot = torch.arange(self.q_len, dtype=torch.int64) + self.buffer_len - self.q_len
        sees_self = torch.tensor([r == "causal" for r in rules], dtype=torch.int64)
        self.buffer_visible = (own_slot + sees_self).clamp(min=0)
        self.kv_len = self.context_capacity + self.buffer_len


class TeacherForcingMask(ContextBufferMask):
    """Joint density in one pass: queries `[buf_0..buf_{Nt-1}, tgt_0..tgt_{Nt-1}]` over keys
    `[context | buf_0..buf_{Nt-1}]`; buf_i sees context + buf_0..buf_i, tgt_i sees context +
    buf_0..buf_{i-1} (tgt_0 the context alone); no row sees a target.

    ```
    Nt=2:          ctx   b0 b1
          buf_0    ■ ■   ■  ·
          buf_1    ■ ■   ■  ■
          tgt_0    ■ ■   ·  ·
          tgt_1    ■ ■   ■  ·
    ```
    """

    def __init__(
        self,
        num_targets: int,
        context_lens: int | torch.Tensor,
        *,
        context_capacity: int | None = None,
    ):
        nt = _nonneg("num_targets", num_targets)
        self.num_targets = nt
        self.q_len, self.buffer_len = 2 * nt, nt
        self._init_context(context_lens, context_capacity)
        i = torch.arange(nt, dtype=torch.int64)
        self.buffer_visible = torch.cat([i + 1, i])
        self.kv_len = self.context_capacity + nt


class ARTrainingRowMask(MaskSpec):
    """The AR-TabPFN training row mask over rows `[context Nc | buffer Nb | targets Nt]`
    (queries = keys = rows). Context rows see the context; buffer row i sees the context and
    buffer rows 0..i; target j sees the context and, only if `j < A*Nb`, buffer rows
    0..(j mod Nb); targets never see targets. A = `attending_chunks`, default Nt // (2*Nb)
    (0 when Nb = 0).

    ```
    Nc=2, Nb=2, Nt=4, A=1:   c c b b t t t t
                        c    ■ ■ · · · · · ·
                        b0   ■ ■ ■ · · · · ·
                        b1   ■ ■ ■ ■ · · · ·
                        t0   ■ ■ ■ · · · · ·
                        t1   ■ ■ ■ ■ · · · ·
                        t2   ■ ■ · · · · · ·
    ```
    """

    def __init__(
        self,
        context_len: int,
        buffer_len: int,
        target_len: int,
        *,
        attending_chunks: int | None = None,
    ):
        self.context_len = _nonneg("context_len", context_len)
        self.buffer_len = _nonneg("buffer_len", buffer_len)
        self.target_len = _nonneg("target_len", target_len)
        if attending_chunks is None:
            attending_chunks = self.target_len // (2 * self.buffer_len) if self.buffer_len else 0
        self.attending_chunks = _nonneg("attending_chunks", attending_chunks)
        self.q_len = self.kv_len = self.context_len + self.buffer_len + self.target_len

    def mask_mod(self) -> MaskMod:
        nc, nb = self.context_len, self.buffer_len
        chunked = self.attending_chunks * nb
        period = max(nb, 1)

        def ar_training_rows(b, h, q_idx, kv_idx):
            sees_context = kv_idx < nc
            causal_prefix = (q_idx < nc + nb) & (kv_idx < nc + nb) & (kv_idx <= q_idx)
            j = q_idx - nc - nb
            chunk_buffer = (
                (j >= 0)
                & (j < chunked)
                & (kv_idx >= nc)
                & (kv_idx < nc + nb)
                & (kv_idx - nc <= j % period)
            )
            return sees_context | causal_prefix | chunk_buffer

        return ar_training_rows

    def row_intervals(self) -> torch.Tensor:
        nc, nb = self.context_len, self.buffer_len
        q = torch.arange(self.q_len, dtype=torch.int64)
        j = q - nc - nb
        end = torch.full_like(q, nc)
        is_buffer = (q >= nc) & (q < nc + nb)
        end[is_buffer] = q[is_buffer] + 1
        chunked = (j >= 0) & (j < self.attending_chunks * nb)
        end[chunked] = nc + j[chunked] % max(nb, 1) + 1
        end = end.view(1, 1, -1)
        return _single_interval(torch.zeros_like(end), end)


class SelectionMask(MaskSpec):
    """Selection (block-sparse) attention: query q of batch b in head group g sees the keys
    of the blocks listed in `block_indices[b, g, q, :]` (-1 = unused slot; duplicates count
    once), each block `block_size` keys; with `causal`, also only keys `k <= Lk - Lq + q`.

    block_indices: int `[B, G, Lq, n_sel]`; G head groups (the KV heads under GQA), query
    head h belonging to group `h // heads_per_group`.

    ```
    block_size=2, q0 -> {0}, q1 -> {2}:   ■ ■ · · · ·
                                          · · · · ■ ■
    ```
    """

    def __init__(
        self,
        block_indices: torch.Tensor,
        *,
        block_size: int,
        kv_len: int,
        causal: bool = False,
        heads_per_group: int = 1,
    ):
        check_tensor(
            "block_indices",
            block_indices,
            ndim=4,
            dtypes=(torch.int32, torch.int64),
            dims="[B, G, Lq, n_sel]",
        )
        block_size = check_int("block_size", block_size, lo=1)
        self.kv_len = _nonneg("kv_len", kv_len)
        self.block_size, self.causal = int(block_size), bool(causal)
        self.heads_per_group = int(heads_per_group)
        self.num_batches, self.num_groups, self.q_len, _ = block_indices.shape
        self.num_blocks = math.ceil(self.kv_len / self.block_size)
        idx = block_indices.to(torch.int64)
        if idx.numel() and (int(idx.min()) < -1 or int(idx.max()) >= self.num_blocks):
            raise InputError(
                f"block_indices: expected values in [-1, {self.num_blocks - 1}] "
                f"(kv_len={self.kv_len}, block_size={self.block_size}), "
                f"got min {int(idx.min())} max {int(idx.max())}"
            )
        self.block_indices = idx

    def selected_blocks(self) -> torch.Tensor:
        """Boolean `[B, G, Lq, num_blocks]`: which blocks each query row selected."""
        sel = torch.zeros(*self.block_indices.shape[:3], self.num_blocks + 1, dtype=torch.bool)
        sel.scatter_(
            -1, torch.where(self.block_indices < 0, self.num_blocks, self.block_indices), True
        )
        return sel[..., : self.num_blocks]

    def mask_mod(self) -> MaskMod:
        sel, bs, hpg = self.selected_blocks(), self.block_size, self.heads_per_group
        offset, causal = self.kv_len - self.q_len, self.causal
        last_row, last_block = max(self.q_len - 1, 0), max(self.num_blocks - 1, 0)

        def selection(b, h, q_idx, kv_idx):
            # FlexAttention may evaluate indices past the ends on padded tiles: clamp them.
            q = q_idx.clamp(0, last_row)
            blk = (kv_idx // bs).clamp(0, last_block)
            visible = self._to(sel, q_idx)[b, h // hpg, q, blk]
            if causal:
                visible = visible & (kv_idx <= q_idx + offset)
            return visible

        return selection

    def row_intervals(self) -> torch.Tensor:
        idx, _ = self.block_indices.sort(-1)
        dup = torch.zeros_like(idx, dtype=torch.bool)
        dup[..., 1:] = idx[..., 1:] == idx[..., :-1]
        unused = (idx < 0) | dup
        start = (idx * self.block_size).clamp(min=0)
        end = (start + self.block_size).clamp(max=self.kv_len)
        if self.causal:
            q = torch.arange(self.q_len, dtype=torch.int64).view(1, 1, -1, 1)
            end = torch.minimum(end, (q + self.kv_len - self.q_len + 1).clamp(min=0))
        end = torch.where(unused, start, torch.maximum(end, start))
        return torch.stack([start, end], -1)
