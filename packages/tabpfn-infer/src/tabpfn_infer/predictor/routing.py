"""The registry's ops as the predictor calls them: calls of a backend that materialises the
scores (`Backend.materialises_scores`: the PyTorch references) split to bound them, and
with `context_top_k` the context part of the decode and teacher-forcing ops read through
the top-k block selection, merged with their exact buffer part by LSE
(`tabattn_core.context_buffer_op`)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from tabattn_core.checks import InputError
from tabattn_core.context_buffer import context_buffer_op
from tabattn_core.registry import get_backend
from tabattn_core.selection import select_blocks

__all__ = ["CONTEXT_OPS", "SCORE_BUDGET", "routed_op"]

# The ops whose context part `context_top_k` replaces by selection attention.
CONTEXT_OPS = ("shared_context_attention", "teacher_forcing_attention")

# Bytes of fp32 scores per attention call of a backend that materialises them. The split
# stays here rather than in core's torch backend: its ops are the references (the ground
# truth, kept simple), and the predictor also splits its own top-k context op.
SCORE_BUDGET = 512 * 2**20


def split_call(
    op, name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *buffers, **kwargs
):
    """Run an op that materialises the scores in slices, so they stay under SCORE_BUDGET:
    "attention" (q [B, H, L, D]) along B; the shared-context ops and the top-k context
    (q [G, S, H, L, D]) along S, or along G (with the context) when S = 1. Returns
    (out, lse) like the op."""
    keys = k.shape[-2] + (buffers[0].shape[-2] if buffers and buffers[0] is not None else 0)
    dim = 0 if name == "attention" or q.shape[1] == 1 else 1
    per_slice = 4 * keys * (q.numel() // q.shape[-1]) // max(q.shape[dim], 1)
    step = max(1, SCORE_BUDGET // max(per_slice, 1))
    if step >= q.shape[dim]:
        return op(q, k, v, *buffers, **kwargs)
    lens = kwargs.get("context_lens")
    outs, lses = [], []
    for i in range(0, q.shape[dim], step):
        part = slice(i, i + step)
        if dim == 0:
            args = (
                q[part],
                k[part],
                v[part],
                *(b[part] if b is not None else None for b in buffers),
            )
            if isinstance(lens, torch.Tensor):
                kwargs = {**kwargs, "context_lens": lens[part]}
        else:
            args = (q[:, part], k, v, *(b[:, part] if b is not None else None for b in buffers))
        out, lse = op(*args, **kwargs)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim), torch.cat(lses, dim)


def top_k_context(
    attend,
    q: torch.Tensor,
    k_ctx: torch.Tensor,
    v_ctx: torch.Tensor,
    *,
    context_lens: int | torch.Tensor,
    scale: float,
    block_size: int,
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A context op (`tabattn_core.context_buffer.ContextOp`): rows q [G, S, H, L, D] over
    the top-k blocks of their dataset's first M = context_lens (one int) context rows of
    k_ctx, v_ctx [G, H_kv, Nc, D], chosen by `select_blocks` per row and kv head. Dataset g
    is one varlen sequence: its S*L rows over its M keys. attend: the registry's
    "selection_attention". Returns out [G, S, H, L, D], lse [G, S, H, L] (strided views of
    the packed results)."""
    if isinstance(context_lens, torch.Tensor):
        raise InputError(
            "context_lens: expected one int for every dataset with context_top_k, got a tensor"
        )
    if context_lens < k_ctx.shape[2]:
        k_ctx, v_ctx = k_ctx[:, :, :context_lens], v_ctx[:, :, :context_lens]
    g, s, h, rows, d = q.shape
    nc = k_ctx.shape[2]
    # [G, S, L, H, D] and [G, Nc, H_kv, D] are the projections' own layouts: views, no copies.
    q_rows = q.permute(0, 1, 3, 2, 4).reshape(g * s * rows, h, d)
    k, v = (t.transpose(1, 2).reshape(g * nc, t.shape[1], d) for t in (k_ctx, v_ctx))
    offsets = torch.arange(g + 1, device=q.device, dtype=torch.int64)
    cu = {"cu_seqlens_q": offsets * (s * rows), "cu_seqlens_k": offsets * nc}
    blocks = select_blocks(q_rows, k, block_size=block_size, top_k=top_k, **cu)
    out, lse = attend(q_rows, k, v, block_indices=blocks, block_size=block_size, scale=scale, **cu)
    return (
        out.unflatten(0, (g, s, rows)).permute(0, 1, 3, 2, 4),
        lse.unflatten(1, (g, s, rows)).permute(1, 2, 0, 3),
    )


def dense_or_top_k(dense, op, top_k, q, k_ctx, v_ctx, *buffers, **kwargs):
    """A decode or teacher-forcing call: `op` itself where `dense(Nc)`, as without top-k,
    else `top_k` (the op with its context part read through the top-k selection)."""
    return (op if dense(k_ctx.shape[2]) else top_k)(q, k_ctx, v_ctx, *buffers, **kwargs)


def routed_op(
    backend: str,
    name: str,
    device: torch.device,
    *,
    top_k: int | None,
    block_size: int,
    dense: Callable[[int], bool],
) -> Callable:
    """The registry's implementation of op `name` (of `backend` on `device`); where it
    materialises the scores (`Backend.materialises_scores`), the call is split along
    datasets or sample paths to keep them under SCORE_BUDGET bytes. With top_k, the decode
    and teacher-forcing ops read the context through `top_k_context` (blocks of block_size
    rows), merged with the op over the buffer alone (`context_buffer_op`), or densely where
    `dense(Nc)`."""
    chosen = get_backend(backend, device=device, op=name)
    op = chosen.ops[name]
    if chosen.materialises_scores:
        op = functools.partial(split_call, op, name)
    if top_k is None or name not in CONTEXT_OPS:
        return op
    selection = get_backend(backend, device=device, op="selection_attention")
    context = functools.partial(
        top_k_context, selection.ops["selection_attention"], block_size=block_size, top_k=top_k
    )
    if selection.materialises_scores:
        context = functools.partial(split_call, context, "selection_attention")
    return functools.partial(dense_or_top_k, dense, op, context_buffer_op(name, context, op))
