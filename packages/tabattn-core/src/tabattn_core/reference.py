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

from tabattn_core.checks import FLOAT_DTYPES, check_same_device, check_tensor
from tabattn_core.contracts import (
    attention_args,
    check_buffer_capacity,
    context_target_args,
    selection_args,
    shared_context_args,
    teacher_forcing_args,
    varlen_args,
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


def _expand_heads(t: torch.Tensor, group: int) -> torch.Tensor:
    return t if group == 1 else t.repeat_interleave(group, dim=-3)


def _visible_from_spec(mask: MaskSpec, q: torch.Tensor) -> torch.Tensor:
    """Dense [nb, H or 1, Lq, Lk] visibility of a spec (checked by `attention_args`)."""
    dense = mask.dense(q.device)
    if mask.num_groups > 1:
        dense = dense.repeat_interleave(q.shape[1] // mask.num_groups, dim=1)
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
    args = attention_args(q, k, v, mask=mask, scale=scale)
    visible = _visible_from_spec(mask, q) if isinstance(mask, MaskSpec) else mask
    dt = _compute_dtype(q)
    kf, vf = _expand_heads(k, args.group).to(dt), _expand_heads(v, args.group).to(dt)
    scores = (q.to(dt) @ kf.transpose(-1, -2)) * args.scale
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
    M as an int or an int tensor [B] on q's device (per dataset), default Lk (keys past
    M_b are ignored).

    ```
    M=3, Lk=5:  ctx  ■ ■ ■ · ·
                tgt  ■ ■ ■ · ·
    ```
    Returns out [B, H, M+N, D], lse [B, H, M+N].
    """
    args = context_target_args(q, k, v, context_lens=context_lens, scale=scale)
    lens = args.ctx_len if args.ctx_lens is None else args.ctx_lens.cpu()
    mask = ContextTargetMask(q.shape[-2], k.shape[-2], lens)
    return attention(q, k, v, mask=mask, scale=args.scale)


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


def _mask_lens(ctx_len: int, ctx_lens: torch.Tensor | None) -> int | torch.Tensor:
    return ctx_len if ctx_lens is None else ctx_lens.cpu()


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
    k_ctx, v_ctx: [G, H_kv, Nc, D], read by all S paths (never copied; H % H_kv == 0);
    k_buf, v_buf: [G, S, H_kv, T_cap, D], the first `buffer_len` (T) slots valid, the Lq new
    rows in the last Lq of them;
    buffer_len: an int (a Python or numpy integer, not a bool or float), or a 0-dim int
    tensor on q's device, which kernels read on the device (no host sync, so a decode step
    can be captured in a CUDA graph; the contract checks a CPU tensor's value, kernels clamp
    a device tensor's to [0, T_cap], this reference reads it and raises outside that);
    context_lens: an int or an int tensor [G] on q's device (default Nc);
    row_rule: "causal" (a row sees its own slot) or "strict" (it does not), one rule for
    all rows or one per row; see `BufferDecodeMask`.

    ```
    T=3, Lq=2, ("causal","strict"):   ctx   buf0 buf1 tgt
                          buf1 (q=0)  ■ ■   ■    ■    ·
                          tgt  (q=1)  ■ ■   ■    ■    ·
    ```
    Nc = 0 and T = 0 are legal. Returns out [G, S, H, Lq, D], lse [G, S, H, Lq].
    """
    args = shared_context_args(
        q, k_ctx, v_ctx, k_buf, v_buf,
        buffer_len=buffer_len, context_lens=context_lens, row_rule=row_rule, scale=scale,
    )  # fmt: skip
    t = args.buffer_len
    if args.buffer_len_tensor is not None:
        t = int(args.buffer_len_tensor)  # the reference reads the length (one host sync)
        if t:
            check_buffer_capacity(k_buf, v_buf, t)
    mask = BufferDecodeMask(
        q.shape[3], t, _mask_lens(args.ctx_len, args.ctx_lens),
        context_capacity=k_ctx.shape[2], row_rule=args.row_rule,
    )  # fmt: skip
    return _context_buffer_attention(q, k_ctx, v_ctx, k_buf, v_buf, mask, args.scale)


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
    """Joint density in one pass (see `TeacherForcingMask`): rows [buf_0..buf_{Nt-1},
    tgt_0..tgt_{Nt-1}] per sample path over keys [context | buf]; buf_i sees the context and
    buf_0..buf_i, tgt_i the context and buf_0..buf_{i-1} (tgt_0 the context alone).

    q: [G, S, H, 2*Nt, D]; k_ctx, v_ctx: [G, H_kv, Nc, D] shared by the S paths; k_buf,
    v_buf: [G, S, H_kv, Nt, D] (the buffer rows' keys/values); context_lens: an int or an
    int tensor [G] on q's device (default Nc). The mask is drawn on `TeacherForcingMask`.
    Returns out [G, S, H, 2*Nt, D], lse [G, S, H, 2*Nt].
    """
    args = teacher_forcing_args(
        q, k_ctx, v_ctx, k_buf, v_buf, context_lens=context_lens, scale=scale
    )
    mask = TeacherForcingMask(
        args.buffer_rows, _mask_lens(args.ctx_len, args.ctx_lens), context_capacity=k_ctx.shape[2]
    )
    return _context_buffer_attention(q, k_ctx, v_ctx, k_buf, v_buf, mask, args.scale)


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

    q: [Tq, H, D]; k, v: [Tk, H_kv, D]; cu_seqlens_q / cu_seqlens_k: int32/int64 [B+1]
    offsets on q's device (validated on the host: one small device-to-host copy the first
    time a device tensor is seen); causal: bottom-right aligned within each sequence.
    Returns out [Tq, H, D], lse [H, Tq].
    """
    args = varlen_args(
        q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, causal=causal, scale=scale
    )
    cq, ck = args.cu_seqlens_q, args.cu_seqlens_k
    out = torch.zeros_like(q)
    lse = q.new_full((q.shape[1], q.shape[0]), float("-inf"), dtype=_compute_dtype(q))
    for b in range(cq.numel() - 1):
        q0, q1, k0, k1 = int(cq[b]), int(cq[b + 1]), int(ck[b]), int(ck[b + 1])
        if q1 == q0:
            continue
        qs, ks, vs = (t.transpose(0, 1).unsqueeze(0) for t in (q[q0:q1], k[k0:k1], v[k0:k1]))
        mask = CausalMask(q1 - q0, k1 - k0) if args.causal else None
        o, l_ = attention(qs, ks, vs, mask=mask, scale=args.scale)
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
    """Selection (block-sparse, NSA-style) attention over varlen rows packed end to end:
    each query row (all H // H_kv query heads of a kv-head group together) attends to the
    key blocks it selected.

    q: [Tq, H, D]; k, v: [Tk, H_kv, D] (H % H_kv == 0); cu_seqlens_q / cu_seqlens_k:
    int32/int64 [B+1] offsets on q's device (validated on the host); block_indices:
    int32/int64 [Tq, H_kv, n_sel], blocks of `block_size` keys counted from the sequence's
    first key, -1 = unused slot, a repeated index counts once, any order, shared by the
    H // H_kv query heads of a group; causal: row i of an Lq x Lk sequence also sees only
    keys `<= Lk - Lq + i`. Index values outside [-1, blocks of the sequence - 1] raise here;
    kernels skip such entries (tabattn-triton checks them on request).

    ```
    block_size=2, row 0 -> {0, 2}, row 1 -> {1, -1}:   ■ ■ · · ■ ■
                                                        · · ■ ■ · ·
    ```
    Returns out [Tq, H, D], lse [H, Tq] (the varlen LSE layout; a row that selected no
    visible key gets out 0 and lse -inf).
    """
    args = selection_args(
        q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        block_indices=block_indices, block_size=block_size, causal=causal, scale=scale,
    )  # fmt: skip
    cq, ck = args.cu_seqlens_q, args.cu_seqlens_k
    out = torch.zeros_like(q)
    lse = q.new_full((q.shape[1], q.shape[0]), float("-inf"), dtype=_compute_dtype(q))
    for b in range(cq.numel() - 1):
        q0, q1, k0, k1 = int(cq[b]), int(cq[b + 1]), int(ck[b]), int(ck[b + 1])
        if q1 == q0:
            continue
        mask = SelectionMask(
            block_indices[q0:q1].permute(1, 0, 2).unsqueeze(0).cpu(),
            block_size=args.block_size,
            kv_len=k1 - k0,
            causal=args.causal,
            heads_per_group=args.group,
        )
        qs, ks, vs = (t.transpose(0, 1).unsqueeze(0) for t in (q[q0:q1], k[k0:k1], v[k0:k1]))
        o, l_ = attention(qs, ks, vs, mask=mask, scale=args.scale)
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
