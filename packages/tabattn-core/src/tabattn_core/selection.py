"""Block selection for selection (NSA-style) attention: which key blocks each query row reads.

`select_blocks` scores every key block of a row's sequence by the row's queries against the
block's mean-pooled keys (NSA's compression branch, with mean pooling as the compressor),
summed over the query heads of a GQA group so that the group shares one selection, and keeps
the top-k. Its output is the `block_indices` argument of `selection_attention`; indices a
user chooses by other means go to the op directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tabattn_core.checks import (
    FLOAT_DTYPES,
    InputError,
    check_cu_seqlens_pair,
    check_gqa,
    check_positive_int,
    check_tensor,
)

__all__ = ["select_blocks"]

MAX_SCORE_ELEMENTS = 2**24  # scores held at once: rows per chunk = this // (H_kv * blocks)


def select_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    block_size: int,
    top_k: int,
    causal: bool = False,
    always: Sequence[int] = (),
) -> torch.Tensor:
    """Top-k key blocks per query row and kv head, for `selection_attention`.

    q: [Tq, H, D]; k: [Tk, H_kv, D] (H % H_kv == 0); cu_seqlens_q / cu_seqlens_k: int
    [B+1] offsets of the packed sequences; block_size: keys per block (the sequence's last
    block may be shorter); top_k: blocks per row; causal: bottom-right, row i of an Lq x Lk
    sequence sees keys <= Lk - Lq + i, and only blocks holding such a key are candidates.

    Score of block j for row t and kv head g: sum over the query heads h of group g of
    q[t, h] . mean(k[keys of block j, g]) (the mean over the whole block, also under causal:
    a ranking heuristic, the attention itself masks the keys a row does not see).
    always: block indices every row selects when visible, before the scored ones: n >= 0
    counts from the sequence's first block, n < 0 from the block holding the row's last
    visible key (-1: that block, NSA's local block under causal). Give at most top_k.

    Returns int64 [Tq, H_kv, top_k] on q's device: each row's blocks ascending, then -1 for
    unused slots (a row with fewer visible blocks than top_k selects all of them).
    """
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES, dims="[Tq, H, D]")
    check_tensor("k", k, ndim=3, dtypes=(q.dtype,), device=q.device, dims="[Tk, H_kv, D]")
    if k.shape[2] != q.shape[2]:
        raise InputError(f"k: expected head dim {q.shape[2]} (as q), got {k.shape[2]}")
    group = check_gqa(q.shape[1], k.shape[1])
    cq, ck = check_cu_seqlens_pair(
        cu_seqlens_q, cu_seqlens_k, total_q=q.shape[0], total_k=k.shape[0], device=q.device
    )
    bs = check_positive_int("block_size", block_size)
    top_k = check_positive_int("top_k", top_k, allow_zero=True)
    always = [int(a) for a in always]
    if len(always) > top_k:
        raise InputError(f"always: expected at most top_k={top_k} blocks, got {len(always)}")

    tq, h_kv, d = q.shape[0], k.shape[1], q.shape[2]
    out = torch.full((tq, h_kv, top_k), -1, dtype=torch.int64, device=q.device)
    counts = (ck.diff() + bs - 1) // bs
    if tq == 0 or top_k == 0 or int(counts.sum()) == 0:
        return out
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    pooled = _block_means(k.to(dt), ck, counts, bs)  # [blocks of all sequences, H_kv, D]
    q_group = q.to(dt).view(tq, h_kv, group, d).sum(2)
    base = torch.cumsum(counts, 0) - counts
    for b in range(cq.numel() - 1):
        q0, q1, nb = int(cq[b]), int(cq[b + 1]), int(counts[b])
        if q1 == q0 or nb == 0:
            continue
        lq, lk = q1 - q0, int(ck[b + 1] - ck[b])
        keys = pooled[int(base[b]) : int(base[b]) + nb]
        chunk = max(1, MAX_SCORE_ELEMENTS // (h_kv * nb))
        for r0 in range(0, lq, chunk):
            rows = torch.arange(r0, min(r0 + chunk, lq), device=q.device)
            limit = (rows + lk - lq + 1).clamp(0, lk) if causal else torch.full_like(rows, lk)
            scores = torch.einsum("thd,jhd->thj", q_group[q0 + rows], keys)
            _rank(out, q0 + rows, scores, limit, bs, always, top_k)
    return out


def _block_means(
    k: torch.Tensor, cu_k: torch.Tensor, counts: torch.Tensor, bs: int
) -> torch.Tensor:
    """Mean of the keys of every block of every sequence, [sum(counts), H_kv, D]."""
    dev = k.device
    seq = torch.searchsorted(cu_k[1:].to(dev), torch.arange(k.shape[0], device=dev), right=True)
    base = (torch.cumsum(counts, 0) - counts).to(dev)
    block = base[seq] + (torch.arange(k.shape[0], device=dev) - cu_k.to(dev)[seq]) // bs
    total = int(counts.sum())
    sums = torch.zeros(total, *k.shape[1:], dtype=k.dtype, device=dev).index_add_(0, block, k)
    sizes = torch.zeros(total, dtype=k.dtype, device=dev).index_add_(
        0, block, torch.ones_like(block, dtype=k.dtype)
    )
    return sums / sizes[:, None, None]


def _rank(out, rows, scores, limit, bs, always, top_k) -> None:
    """Write the top-k visible blocks of `scores` [rows, H_kv, nb] into out[rows], ascending,
    -1 padded; `always` blocks first (score +inf) where visible."""
    nb = scores.shape[-1]
    blocks = torch.arange(nb, device=scores.device)
    visible = blocks[None, :] * bs < limit[:, None]  # [rows, nb]
    if always:
        last = ((limit - 1).clamp(min=0) // bs)[:, None]  # block of the last visible key
        wanted = torch.tensor(always, device=scores.device)[None, :]
        wanted = torch.where(wanted >= 0, wanted, last + 1 + wanted)  # [rows, n_always]
        forced = (blocks[None, None, :] == wanted[:, :, None]).any(1)
        scores = torch.where(forced[:, None, :], torch.inf, scores)
    scores = torch.where(visible[:, None, :], scores, -torch.inf)
    kk = min(top_k, nb)
    values, picked = scores.topk(kk, dim=-1)
    picked = torch.where(values == -torch.inf, nb, picked).sort(-1).values
    out[rows, :, :kk] = torch.where(picked == nb, -1, picked)
