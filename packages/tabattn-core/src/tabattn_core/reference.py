"""PyTorch references for every attention op: the ground truth kernels are tested against,
and the `torch` backend of the op registry (CPU or CUDA).

All ops return `(out, lse)`: `out` in q's dtype, `lse` the natural-log sum of exp of the
scaled scores, float32 (float64 when the inputs are float64), shape `[..., H, Lq]`. A query
row that sees no key gets output 0 and LSE -inf, never NaN. Softmax and accumulation run in
fp32 (fp64 for fp64 inputs); `scale` defaults to `D ** -0.5`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tabattn_core.checks import (
    FLOAT_DTYPES,
    InputError,
    check_block_indices,
    check_cu_seqlens_pair,
    check_gqa,
    check_head_dim,
    check_lengths,
    check_same_device,
    check_scale,
    check_tensor,
)
from tabattn_core.masks import (
    BufferDecodeMask,
    CausalMask,
    ContextBufferMask,
    ContextTargetMask,
    MaskSpec,
    SelectionMask,
    TeacherForcingMask,
)

__all__ = [
    "attention",
    "context_target_attention",
    "merge_states",
    "selection_attention",
    "shared_context_attention",
    "softmax_with_lse",
    "teacher_forcing_attention",
    "varlen_attention",
]


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    return (
        torch.float64
        if any(t is not None and t.dtype == torch.float64 for t in tensors)
        else torch.float32
    )


def softmax_with_lse(
    scores: torch.Tensor, visible: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax over the last axis, safe for rows that see nothing.

    scores: [..., Lk] (already scaled); visible: bool broadcastable to scores, or None.
    Returns (p [..., Lk], lse [...]); rows with no visible key give p = 0, lse = -inf, and
    gradients stay finite.
    """
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    if scores.shape[-1] == 0:
        lse = scores.new_full(scores.shape[:-1], float("-inf"))
        return scores, lse
    row_max = scores.amax(-1, keepdim=True).detach()
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    e = torch.exp(scores - row_max)
    total = e.sum(-1, keepdim=True)
    empty = total == 0
    safe_total = torch.where(empty, torch.ones_like(total), total)
    lse = torch.where(empty, torch.full_like(total, float("-inf")), row_max + torch.log(safe_total))
    return e / safe_total, lse.squeeze(-1)


def _check_qkv(q, k, v, *, q_dims: str, kv_dims: str) -> int:
    """Common checks for q [..., H, Lq, D], k/v [..., H_kv, Lk, D]; returns the GQA group."""
    check_tensor("q", q, dtypes=FLOAT_DTYPES, dims=q_dims)
    check_tensor("k", k, ndim=q.dim(), dtypes=(q.dtype,), device=q.device, dims=kv_dims)
    check_tensor("v", v, shape=k.shape, dtypes=(q.dtype,), device=q.device, dims=kv_dims)
    check_head_dim("q", q.shape[-1])
    if k.shape[-1] != q.shape[-1]:
        raise InputError(f"k: expected head dim {q.shape[-1]} (as q), got {k.shape[-1]}")
    if k.shape[:-3] != q.shape[:-3]:
        raise InputError(
            f"k: expected leading dims {list(q.shape[:-3])} (as q {q_dims}), got {list(k.shape[:-3])}"
        )
    return check_gqa(q.shape[-3], k.shape[-3])


def _expand_heads(t: torch.Tensor, group: int) -> torch.Tensor:
    return t if group == 1 else t.repeat_interleave(group, dim=-3)


def _visible_from_spec(mask: MaskSpec, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Dense [nb, H or 1, Lq, Lk] visibility of a spec, checked against q/k."""
    if (mask.q_len, mask.kv_len) != (q.shape[-2], k.shape[-2]):
        raise InputError(
            f"mask: expected a spec for Lq={q.shape[-2]}, Lk={k.shape[-2]}, "
            f"got Lq={mask.q_len}, Lk={mask.kv_len}"
        )
    if mask.num_batches not in (1, q.shape[0]):
        raise InputError(f"mask: expected 1 or {q.shape[0]} batches, got {mask.num_batches}")
    dense = mask.dense(q.device)
    if mask.num_groups > 1:
        per_group = q.shape[1] // mask.num_groups
        if per_group * mask.num_groups != q.shape[1]:
            raise InputError(
                f"mask: expected head groups dividing H={q.shape[1]}, got {mask.num_groups}"
            )
        dense = dense.repeat_interleave(per_group, dim=1)
    return dense


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: MaskSpec | torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked attention with GQA.

    q: [B, H, Lq, D]; k, v: [B, H_kv, Lk, D] (H % H_kv == 0); mask: a MaskSpec for
    (Lq, Lk), or a bool tensor broadcastable to [B, H, Lq, Lk] (True = visible), or None.
    Returns out [B, H, Lq, D] (q.dtype), lse [B, H, Lq].
    """
    check_tensor("q", q, ndim=4, dims="[B, H, Lq, D]")
    group = _check_qkv(q, k, v, q_dims="[B, H, Lq, D]", kv_dims="[B, H_kv, Lk, D]")
    scale = check_scale(scale, q.shape[-1])
    if isinstance(mask, MaskSpec):
        visible = _visible_from_spec(mask, q, k)
    elif mask is not None:
        check_tensor("mask", mask, dtypes=(torch.bool,), device=q.device)
        try:
            torch.broadcast_shapes(mask.shape, (*q.shape[:-1], k.shape[-2]))
        except RuntimeError:
            raise InputError(
                f"mask: expected a shape broadcastable to {[*q.shape[:-1], k.shape[-2]]}, "
                f"got {list(mask.shape)}"
            ) from None
        visible = mask
    else:
        visible = None
    dt = _compute_dtype(q)
    kf, vf = _expand_heads(k, group).to(dt), _expand_heads(v, group).to(dt)
    scores = (q.to(dt) @ kf.transpose(-1, -2)) * scale
    p, lse = softmax_with_lse(scores, visible)
    return (p @ vf).to(q.dtype), lse


def context_target_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    context_lens: int | torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Context-target attention: all queries (context rows then target rows) over the
    context keys only.

    q: [B, H, M+N, D]; k, v: [B, H_kv, Lk, D] holding the context rows first; context_lens:
    M as an int or an int tensor [B] (per dataset), default Lk (keys past M_b are ignored).
    Returns out [B, H, M+N, D], lse [B, H, M+N].
    """
    check_tensor("k", k, ndim=4, dims="[B, H_kv, Lk, D]")
    lk = k.shape[-2]
    if context_lens is None:
        context_lens = lk
    elif isinstance(context_lens, torch.Tensor):
        check_lengths("context_lens", context_lens, count=k.shape[0], max_len=lk)
    elif not 0 <= int(context_lens) <= lk:
        raise InputError(f"context_lens: expected an int in [0, {lk}], got {context_lens}")
    if isinstance(context_lens, torch.Tensor):
        context_lens = context_lens.cpu()
    return attention(q, k, v, mask=ContextTargetMask(q.shape[-2], lk, context_lens), scale=scale)


def _context_buffer_attention(
    q: torch.Tensor,
    k_ctx: torch.Tensor,
    v_ctx: torch.Tensor,
    k_buf: torch.Tensor | None,
    v_buf: torch.Tensor | None,
    mask: ContextBufferMask,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [G, S, H, Lq, D] over the shared context [G, H_kv, Nc, D] (broadcast over S, never
    copied) and per-sample buffers [G, S, H_kv, T, D], visibility from `mask`."""
    group = q.shape[2] // k_ctx.shape[1]
    dt = _compute_dtype(q)
    qf = q.to(dt)
    kc = _expand_heads(k_ctx, group).to(dt).unsqueeze(1)  # [G, 1, H, Nc, D]
    vc = _expand_heads(v_ctx, group).to(dt).unsqueeze(1)
    scores = [(qf @ kc.transpose(-1, -2)) * scale]
    nc = k_ctx.shape[-2]
    kv_idx = torch.arange(nc, device=q.device)
    lens = mask.context_lens.to(q.device).view(-1, 1, 1, 1, 1)  # [G or 1, 1, 1, 1, 1]
    visible = [(kv_idx < lens).expand(-1, 1, 1, q.shape[3], nc)]
    t = mask.buffer_len
    if t:
        kb = _expand_heads(k_buf[..., :t, :], group).to(dt)
        vb = _expand_heads(v_buf[..., :t, :], group).to(dt)
        scores.append((qf @ kb.transpose(-1, -2)) * scale)
        buf_idx = torch.arange(t, device=q.device)
        row_vis = mask.buffer_visible.to(q.device).view(-1, 1)
        visible.append((buf_idx < row_vis).expand(visible[0].shape[0], 1, 1, -1, -1))
    p, lse = softmax_with_lse(torch.cat(scores, -1), torch.cat(visible, -1))
    out = p[..., :nc] @ vc
    if t:
        out = out + p[..., nc:] @ vb
    return out.to(q.dtype), lse


def _check_context_buffer(
    q, k_ctx, v_ctx, k_buf, v_buf, context_lens, *, buf_len_name: str, min_buffer: int
) -> int | torch.Tensor:
    """Checks shared by the decode and teacher-forcing ops; returns the context lengths."""
    check_tensor("q", q, ndim=5, dtypes=FLOAT_DTYPES, dims="[G, S, H, Lq, D]")
    g, s, h, _, d = q.shape
    check_head_dim("q", d)
    check_tensor(
        "k_ctx", k_ctx, ndim=4, dtypes=(q.dtype,), device=q.device, dims="[G, H_kv, Nc, D]"
    )
    check_tensor(
        "v_ctx",
        v_ctx,
        shape=k_ctx.shape,
        dtypes=(q.dtype,),
        device=q.device,
        dims="[G, H_kv, Nc, D]",
    )
    if k_ctx.shape[0] != g or k_ctx.shape[-1] != d:
        raise InputError(f"k_ctx: expected shape [{g}, H_kv, Nc, {d}], got {list(k_ctx.shape)}")
    check_gqa(h, k_ctx.shape[1], kv_name="k_ctx")
    if k_buf is None or v_buf is None:
        if min_buffer:
            raise InputError(
                f"k_buf, v_buf: expected tensors holding at least {min_buffer} rows, got None"
            )
    else:
        dims = "[G, S, H_kv, T_cap, D]"
        check_tensor("k_buf", k_buf, ndim=5, dtypes=(q.dtype,), device=q.device, dims=dims)
        check_tensor(
            "v_buf", v_buf, shape=k_buf.shape, dtypes=(q.dtype,), device=q.device, dims=dims
        )
        want = [g, s, k_ctx.shape[1], None, d]
        if any(w is not None and w != a for w, a in zip(want, k_buf.shape, strict=True)):
            raise InputError(
                f"k_buf: expected shape [{g}, {s}, {k_ctx.shape[1]}, T_cap, {d}], got {list(k_buf.shape)}"
            )
        if k_buf.shape[3] < min_buffer:
            raise InputError(
                f"k_buf: expected capacity T_cap >= {buf_len_name}={min_buffer}, got {k_buf.shape[3]}"
            )
    nc = k_ctx.shape[2]
    if context_lens is None:
        return nc
    if isinstance(context_lens, torch.Tensor):
        check_lengths("context_lens", context_lens, count=g, max_len=nc)
        return context_lens.cpu()
    if not 0 <= int(context_lens) <= nc:
        raise InputError(f"context_lens: expected an int in [0, {nc}], got {context_lens}")
    return int(context_lens)


def shared_context_attention(
    q: torch.Tensor,
    k_ctx: torch.Tensor,
    v_ctx: torch.Tensor,
    k_buf: torch.Tensor | None = None,
    v_buf: torch.Tensor | None = None,
    *,
    buffer_len: int | torch.Tensor = 0,
    context_lens: int | torch.Tensor | None = None,
    row_rule: str | Sequence[str] = "causal",
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of joint sampling over a context shared by S sample paths.

    q: [G, S, H, Lq, D] (G datasets, S paths each, Lq new rows per path);
    k_ctx, v_ctx: [G, H_kv, Nc, D], read by all S paths (never copied);
    k_buf, v_buf: [G, S, H_kv, T_cap, D], the first `buffer_len` (T) slots valid, the Lq new
    rows in the last Lq of them (an int, or a 0-dim int tensor, which kernels read on the
    device); context_lens: int or int tensor [G] (default Nc);
    row_rule: "causal" (row sees its own slot) / "strict" (not), one or one per row; see
    `BufferDecodeMask`. Nc = 0 and T = 0 are legal.
    Returns out [G, S, H, Lq, D], lse [G, S, H, Lq].
    """
    if isinstance(buffer_len, torch.Tensor):
        check_tensor("buffer_len", buffer_len, shape=(), dtypes=(torch.int32, torch.int64))
        buffer_len = int(buffer_len)
    if int(buffer_len) != buffer_len or buffer_len < 0:
        raise InputError(f"buffer_len: expected a non-negative int, got {buffer_len!r}")
    lens = _check_context_buffer(
        q,
        k_ctx,
        v_ctx,
        k_buf,
        v_buf,
        context_lens,
        buf_len_name="buffer_len",
        min_buffer=buffer_len,
    )
    mask = BufferDecodeMask(
        q.shape[3], buffer_len, lens, context_capacity=k_ctx.shape[2], row_rule=row_rule
    )
    return _context_buffer_attention(
        q, k_ctx, v_ctx, k_buf, v_buf, mask, check_scale(scale, q.shape[-1])
    )


def teacher_forcing_attention(
    q: torch.Tensor,
    k_ctx: torch.Tensor,
    v_ctx: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    *,
    context_lens: int | torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint density in one pass (see `TeacherForcingMask`).

    q: [G, S, H, 2*Nt, D] = rows [buf_0..buf_{Nt-1}, tgt_0..tgt_{Nt-1}] per sample path;
    k_ctx, v_ctx: [G, H_kv, Nc, D] shared by the S paths; k_buf, v_buf: [G, S, H_kv, Nt, D]
    (the buffer rows' keys/values); context_lens: int or int tensor [G] (default Nc).
    Returns out [G, S, H, 2*Nt, D], lse [G, S, H, 2*Nt].
    """
    check_tensor("q", q, ndim=5, dims="[G, S, H, 2*Nt, D]")
    if q.shape[3] % 2:
        raise InputError(f"q: expected an even row count 2*Nt on dim 3, got {q.shape[3]}")
    nt = q.shape[3] // 2
    lens = _check_context_buffer(
        q, k_ctx, v_ctx, k_buf, v_buf, context_lens, buf_len_name="Nt", min_buffer=nt
    )
    if k_buf.shape[3] != nt:
        raise InputError(
            f"k_buf: expected Nt={nt} rows on dim 3 (q has 2*Nt rows), got {k_buf.shape[3]}"
        )
    mask = TeacherForcingMask(nt, lens, context_capacity=k_ctx.shape[2])
    return _context_buffer_attention(
        q, k_ctx, v_ctx, k_buf, v_buf, mask, check_scale(scale, q.shape[-1])
    )


def _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, q_dims: str, kv_dims: str):
    """Checks for packed varlen q [Tq, H, D], k/v [Tk, H_kv, D]; returns (group, cq, ck)."""
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES, dims=q_dims)
    check_tensor("k", k, ndim=3, dtypes=(q.dtype,), device=q.device, dims=kv_dims)
    check_tensor("v", v, shape=k.shape, dtypes=(q.dtype,), device=q.device, dims=kv_dims)
    check_head_dim("q", q.shape[-1])
    if k.shape[-1] != q.shape[-1]:
        raise InputError(f"k: expected head dim {q.shape[-1]} (as q), got {k.shape[-1]}")
    group = check_gqa(q.shape[1], k.shape[1])
    cq, ck = check_cu_seqlens_pair(
        cu_seqlens_q, cu_seqlens_k, total_q=q.shape[0], total_k=k.shape[0], device=q.device
    )
    return group, cq, ck


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over varlen sequences packed end to end (no padding), e.g. datasets of
    different sizes in one context-target batch: sequence b's queries attend to its keys only.

    q: [Tq, H, D]; k, v: [Tk, H_kv, D]; cu_seqlens_q / cu_seqlens_k: int [B+1] offsets;
    causal: bottom-right aligned within each sequence. Returns out [Tq, H, D], lse [H, Tq].
    """
    _, cq, ck = _check_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, q_dims="[Tq, H, D]", kv_dims="[Tk, H_kv, D]"
    )
    out = torch.zeros_like(q)
    lse = q.new_full((q.shape[1], q.shape[0]), float("-inf"), dtype=_compute_dtype(q))
    for b in range(cq.numel() - 1):
        q0, q1, k0, k1 = int(cq[b]), int(cq[b + 1]), int(ck[b]), int(ck[b + 1])
        if q1 == q0:
            continue
        qs, ks, vs = (t.transpose(0, 1).unsqueeze(0) for t in (q[q0:q1], k[k0:k1], v[k0:k1]))
        mask = CausalMask(q1 - q0, k1 - k0) if causal else None
        o, l_ = attention(qs, ks, vs, mask=mask, scale=scale)
        out[q0:q1] = o[0].transpose(0, 1)
        lse[:, q0:q1] = l_[0]
    return out, lse


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
    """Selection (block-sparse, NSA-style) attention over varlen rows packed end to end.

    q: [Tq, H, D]; k, v: [Tk, H_kv, D]; cu_seqlens_q / cu_seqlens_k: int [B+1] offsets of
    each sequence; block_indices: int [Tq, H_kv, n_sel] key blocks (relative to the
    sequence's first key; -1 = unused) that each query row selects, shared by the H // H_kv
    query heads of a group; causal clamps row i of an Lq x Lk sequence to keys
    `<= Lk - Lq + i`. Returns out [Tq, H, D], lse [H, Tq] (the varlen LSE layout).
    """
    group, cq, ck = _check_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, q_dims="[Tq, H, D]", kv_dims="[Tk, H_kv, D]"
    )
    check_block_indices(block_indices, rows=q.shape[0], kv_heads=k.shape[1], device=q.device)
    out = torch.zeros_like(q)
    lse = q.new_full((q.shape[1], q.shape[0]), float("-inf"), dtype=_compute_dtype(q))
    for b in range(cq.numel() - 1):
        q0, q1, k0, k1 = int(cq[b]), int(cq[b + 1]), int(ck[b]), int(ck[b + 1])
        if q1 == q0:
            continue
        mask = SelectionMask(
            block_indices[q0:q1].permute(1, 0, 2).unsqueeze(0).cpu(),
            block_size=block_size,
            kv_len=k1 - k0,
            causal=causal,
            heads_per_group=group,
        )
        qs, ks, vs = (t.transpose(0, 1).unsqueeze(0) for t in (q[q0:q1], k[k0:k1], v[k0:k1]))
        o, l_ = attention(qs, ks, vs, mask=mask, scale=scale)
        out[q0:q1] = o[0].transpose(0, 1)
        lse[:, q0:q1] = l_[0]
    return out, lse


def merge_states(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial attentions over disjoint key sets into the attention over both.

    out_*: [..., L, D]; lse_*: [..., L]. Safe when either or both LSEs are -inf (that side
    contributes nothing; both -inf gives output 0, LSE -inf). Returns (out, lse) with out in
    out_a's dtype and lse in the promoted LSE dtype (at least fp32).
    """
    check_tensor("out_a", out_a, dtypes=FLOAT_DTYPES)
    check_tensor("out_b", out_b, shape=out_a.shape, device=out_a.device)
    check_tensor("lse_a", lse_a, shape=out_a.shape[:-1], device=out_a.device, dims="[..., L]")
    check_tensor("lse_b", lse_b, shape=out_a.shape[:-1], device=out_a.device, dims="[..., L]")
    check_same_device(out_a=out_a, out_b=out_b, lse_a=lse_a, lse_b=lse_b)
    dt = _compute_dtype(out_a, lse_a, lse_b)
    a, b = lse_a.to(dt), lse_b.to(dt)
    m = torch.maximum(a, b)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    wa, wb = torch.exp(a - m), torch.exp(b - m)
    total = wa + wb
    empty = total == 0
    safe_total = torch.where(empty, torch.ones_like(total), total)
    lse = torch.where(empty, torch.full_like(total, float("-inf")), m + torch.log(safe_total))
    wa, wb = (wa / safe_total).unsqueeze(-1), (wb / safe_total).unsqueeze(-1)
    part_a = torch.where(wa > 0, wa * out_a.to(dt), torch.zeros((), dtype=dt, device=out_a.device))
    part_b = torch.where(wb > 0, wb * out_b.to(dt), torch.zeros((), dtype=dt, device=out_a.device))
    return (part_a + part_b).to(out_a.dtype), lse
