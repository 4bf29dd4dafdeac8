"""Brute-force ground truth for the core tests: visibility written rule by rule from
DESIGN.md as Python loops (independent of tabattn_core.masks), and attention computed
row by row in fp64 from such a matrix."""

from __future__ import annotations

import math

import torch


def context_target(lq, lk, context_len):
    return [[k < context_len for k in range(lk)] for _ in range(lq)]


def causal(lq, lk):
    return [[k <= lk - lq + i for k in range(lk)] for i in range(lq)]


def buffer_decode(lq, t, context_len, cap, rules):
    rows = []
    for q in range(lq):
        slot = t - lq + q
        last = slot if rules[q] == "causal" else slot - 1  # last visible buffer slot
        rows.append([k < context_len if k < cap else (k - cap) <= last for k in range(cap + t)])
    return rows


def teacher_forcing(nt, context_len, cap):
    rows = []
    for q in range(2 * nt):
        for_row = []
        for k in range(cap + nt):
            if k < cap:
                for_row.append(k < context_len)
            elif q < nt:  # buf_q sees buf_0..buf_q
                for_row.append(k - cap <= q)
            else:  # tgt_i sees buf_0..buf_{i-1}
                for_row.append(k - cap < q - nt)
        rows.append(for_row)
    return rows


def ar_training(nc, nb, nt, a):
    r = nc + nb + nt
    rows = []
    for q in range(r):
        row = []
        for k in range(r):
            ok = k < nc
            ok |= q < nc + nb and k < nc + nb and k <= q
            j = q - nc - nb
            ok |= j >= 0 and nc <= k < nc + nb and j < a * nb and (k - nc) <= j % nb
            row.append(bool(ok))
        rows.append(row)
    return rows


def selection(blocks_per_row, block_size, lk, is_causal):
    lq = len(blocks_per_row)
    rows = []
    for q, blocks in enumerate(blocks_per_row):
        chosen = {b for b in blocks if b >= 0}
        row = [k // block_size in chosen and (not is_causal or k <= lk - lq + q) for k in range(lk)]
        rows.append(row)
    return rows


def tiles(dense, lq, lk, bq, bk):
    """EMPTY=0 / PARTIAL=1 / FULL=2 per tile of an [lq][lk] list-of-lists matrix."""
    nq, nk = math.ceil(lq / bq), math.ceil(lk / bk)
    out = []
    for i in range(nq):
        row = []
        for j in range(nk):
            vals = [
                dense[q][k]
                for q in range(i * bq, min(lq, (i + 1) * bq))
                for k in range(j * bk, min(lk, (j + 1) * bk))
            ]
            row.append(0 if not any(vals) else 2 if all(vals) else 1)
        out.append(row)
    return out


def attention(q, k, v, visible, scale):
    """q [Lq, D], k/v [Lk, D], visible [Lq][Lk] -> out [Lq, D], lse [Lq], all fp64, row by row."""
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros(q.shape[0], v.shape[1], dtype=torch.float64)
    lse = torch.full((q.shape[0],), float("-inf"), dtype=torch.float64)
    for i in range(q.shape[0]):
        cols = [j for j in range(k.shape[0]) if visible[i][j]]
        if not cols:
            continue
        s = (k[cols] @ q[i]) * scale
        lse[i] = torch.logsumexp(s, 0)
        out[i] = torch.softmax(s, 0) @ v[cols]
    return out, lse
