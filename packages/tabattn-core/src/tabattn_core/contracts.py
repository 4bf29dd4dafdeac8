"""The contract of every attention op of the registry, written once: one function per op
checks and normalises its arguments and returns a small frozen record of them. Every
backend calls it before anything else, so that the same bad input raises the same
`InputError` (same text) everywhere; a kernel backend adds only the checks of its kernels
(device, strides, kernel dtypes). The ops' docstrings live on the references
(`tabattn_core.reference`), which are the `torch` backend.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tabattn_core.checks import (
    FLOAT_DTYPES,
    InputError,
    check_block_indices,
    check_cu_seqlens_pair,
    check_gqa,
    check_head_dim,
    check_int,
    check_lengths,
    check_positive_int,
    check_scale,
    check_tensor,
)
from tabattn_core.masks import BufferDecodeMask, MaskSpec

__all__ = [
    "AttentionArgs",
    "ContextTargetArgs",
    "DecodeArgs",
    "SelectionArgs",
    "TeacherForcingArgs",
    "VarlenArgs",
    "attention_args",
    "check_buffer_capacity",
    "check_context_buffer",
    "context_target_args",
    "selection_args",
    "shared_context_args",
    "teacher_forcing_args",
    "varlen_args",
]


@dataclass(frozen=True)
class AttentionArgs:
    """`attention`: the GQA group H // H_kv and the softmax scale."""

    group: int
    scale: float


@dataclass(frozen=True)
class ContextTargetArgs:
    """`context_target_attention`: group, scale, and the context length: one int `ctx_len`
    for every dataset, or (ctx_lens not None) int64 per-dataset lengths [B] on q's device
    (ctx_len is then Lk)."""

    group: int
    scale: float
    ctx_len: int
    ctx_lens: torch.Tensor | None


@dataclass(frozen=True)
class DecodeArgs:
    """`shared_context_attention`: group, scale, context lengths (as `ContextTargetArgs`,
    ctx_len Nc with ctx_lens), the valid buffer rows and the row rule of each query row.

    buffer_len: the int given; with a 0-dim tensor (buffer_len_tensor, on q's device, read
    by the kernels with no host sync), T_cap (0 without buffers)."""

    group: int
    scale: float
    ctx_len: int
    ctx_lens: torch.Tensor | None
    buffer_len: int
    buffer_len_tensor: torch.Tensor | None
    row_rule: tuple[str, ...]


@dataclass(frozen=True)
class TeacherForcingArgs:
    """`teacher_forcing_attention`: group, scale, context lengths (as `DecodeArgs`) and Nt,
    the buffer rows (q holds 2 * Nt rows per sample path)."""

    group: int
    scale: float
    ctx_len: int
    ctx_lens: torch.Tensor | None
    buffer_rows: int


@dataclass(frozen=True)
class VarlenArgs:
    """`varlen_attention`: group, scale, causal and the offsets as int64 CPU tensors [B+1]."""

    group: int
    scale: float
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    causal: bool


@dataclass(frozen=True)
class SelectionArgs:
    """`selection_attention`: as `VarlenArgs`, and the keys per block."""

    group: int
    scale: float
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    causal: bool
    block_size: int


# ---- attention ------------------------------------------------------------------------


def _check_qkv(q, k, v, *, q_dims: str, kv_dims: str) -> int:
    """q [..., H, Lq, D], k/v [..., H_kv, Lk, D]: one dtype and device; returns the group."""
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


def _check_mask(mask: object, q: torch.Tensor, k: torch.Tensor) -> None:
    """A MaskSpec for (Lq, Lk) with 1 or B batches and head groups dividing H, or a bool
    tensor broadcastable to [B, H, Lq, Lk], or None."""
    if mask is None:
        return
    if isinstance(mask, MaskSpec):
        if (mask.q_len, mask.kv_len) != (q.shape[-2], k.shape[-2]):
            raise InputError(
                f"mask: expected a spec for Lq={q.shape[-2]}, Lk={k.shape[-2]}, "
                f"got Lq={mask.q_len}, Lk={mask.kv_len}"
            )
        if mask.num_batches not in (1, q.shape[0]):
            raise InputError(f"mask: expected 1 or {q.shape[0]} batches, got {mask.num_batches}")
        if mask.num_groups > 1 and q.shape[1] % mask.num_groups:
            raise InputError(
                f"mask: expected head groups dividing H={q.shape[1]}, got {mask.num_groups}"
            )
        return
    check_tensor("mask", mask, dtypes=(torch.bool,), device=q.device)
    try:
        torch.broadcast_shapes(mask.shape, (*q.shape[:-1], k.shape[-2]))
    except RuntimeError:
        raise InputError(
            f"mask: expected a shape broadcastable to {[*q.shape[:-1], k.shape[-2]]}, "
            f"got {list(mask.shape)}"
        ) from None


def attention_args(q, k, v, *, mask=None, scale=None) -> AttentionArgs:
    """The contract of `attention` (see `tabattn_core.reference.attention`)."""
    check_tensor("q", q, ndim=4, dims="[B, H, Lq, D]")
    group = _check_qkv(q, k, v, q_dims="[B, H, Lq, D]", kv_dims="[B, H_kv, Lk, D]")
    scale = check_scale(scale, q.shape[-1])
    _check_mask(mask, q, k)
    return AttentionArgs(group, scale)


def _context_lens(context_lens, *, count: int, max_len: int, device: torch.device):
    """(ctx_len, ctx_lens) of an int, an int tensor [count] on `device`, or None (max_len)."""
    if context_lens is None:
        return max_len, None
    if isinstance(context_lens, torch.Tensor):
        check_lengths("context_lens", context_lens, count=count, max_len=max_len, device=device)
        return max_len, context_lens.to(torch.int64)
    return check_int("context_lens", context_lens, lo=0, hi=max_len), None


def context_target_args(q, k, v, *, context_lens=None, scale=None) -> ContextTargetArgs:
    """The contract of `context_target_attention` (see the reference)."""
    args = attention_args(q, k, v, scale=scale)
    ctx_len, ctx_lens = _context_lens(
        context_lens, count=k.shape[0], max_len=k.shape[2], device=q.device
    )
    return ContextTargetArgs(args.group, args.scale, ctx_len, ctx_lens)


# ---- shared context: decode and teacher forcing ------------------------------------------

_BUFFER_DIMS = "[G, S, H_kv, T_cap, D]"


def _check_capacity(arg: str, t, need: int, name: str) -> None:
    if t is None:
        raise InputError(f"{arg}: expected a tensor {_BUFFER_DIMS} holding {need} rows, got None")
    if t.shape[3] < need:
        raise InputError(f"{arg}: expected capacity T_cap >= {name}={need}, got {t.shape[3]}")


def check_buffer_capacity(k_buf, v_buf, need: int, *, name: str = "buffer_len") -> None:
    """k_buf and v_buf [G, S, H_kv, T_cap, D] (shapes checked) hold at least `need` rows;
    `name` is the argument that asks for them."""
    _check_capacity("k_buf", k_buf, need, name)
    _check_capacity("v_buf", v_buf, need, name)


def _check_context_buffer(q, k_ctx, v_ctx, k_buf, v_buf, *, need: int, name: str, q_dims: str):
    """Shapes, dtypes, devices, head dim and GQA of the shared-context ops' tensors;
    returns the group."""
    check_tensor("q", q, ndim=5, dtypes=FLOAT_DTYPES, dims=q_dims)
    g, s, h, _, d = q.shape
    check_head_dim("q", d)
    for arg, t in (("k_ctx", k_ctx), ("v_ctx", v_ctx)):
        check_tensor(arg, t, ndim=4, dtypes=(q.dtype,), device=q.device, dims="[G, H_kv, Nc, D]")
        if t.shape[0] != g or t.shape[3] != d or t.shape != k_ctx.shape:
            raise InputError(f"{arg}: expected shape [{g}, H_kv, Nc, {d}], got {list(t.shape)}")
    group = check_gqa(h, k_ctx.shape[1], kv_name="k_ctx")
    if need or k_buf is not None or v_buf is not None:
        h_kv = k_ctx.shape[1]
        for arg, t in (("k_buf", k_buf), ("v_buf", v_buf)):
            if t is None:
                _check_capacity(arg, t, need, name)
            check_tensor(arg, t, ndim=5, dtypes=(q.dtype,), device=q.device, dims=_BUFFER_DIMS)
            want = [g, s, h_kv, None, d]
            if (
                any(w is not None and w != a for w, a in zip(want, t.shape, strict=True))
                or t.shape != k_buf.shape
            ):
                raise InputError(
                    f"{arg}: expected shape [{g}, {s}, {h_kv}, T_cap, {d}], got {list(t.shape)}"
                )
            _check_capacity(arg, t, need, name)
    return group


_VALIDATED: dict[tuple, int] = {}  # tensor signatures and integer arguments already checked
_VALIDATED_MAX = 1024


def _signature(t: object) -> tuple | None:
    if t is None:
        return None
    return (t.shape, t.dtype, t.device) if isinstance(t, torch.Tensor) else (type(t),)


def check_context_buffer(q, k_ctx, v_ctx, k_buf, v_buf, context_lens, *, need, name, q_dims):
    """The checks shared by the decode and teacher-forcing contracts: shapes, dtypes,
    devices, head dim and GQA of the tensors, buffers of at least `need` rows (asked for by
    argument `name`) and the context lengths; returns (group, ctx_len, ctx_lens).

    The tensor checks depend only on shapes, dtypes, devices and the integer arguments, so
    a signature seen before skips them (a decode loop calls this every layer and step);
    tensor context lengths are value-checked on every call."""
    key = (*map(_signature, (q, k_ctx, v_ctx, k_buf, v_buf)), need, name, q_dims)
    group = _VALIDATED.get(key) if all(isinstance(t, torch.Tensor) for t in (q, k_ctx)) else None
    if group is None:
        group = _check_context_buffer(
            q, k_ctx, v_ctx, k_buf, v_buf, need=need, name=name, q_dims=q_dims
        )
        if len(_VALIDATED) >= _VALIDATED_MAX:
            _VALIDATED.clear()
        _VALIDATED[key] = group
    ctx_len, ctx_lens = _context_lens(
        context_lens, count=q.shape[0], max_len=k_ctx.shape[2], device=q.device
    )
    return group, ctx_len, ctx_lens


@functools.lru_cache(maxsize=256)
def _row_rule(lq: int, row_rule: str | tuple) -> tuple[str, ...]:
    rules = (row_rule,) * lq if isinstance(row_rule, str) else row_rule
    if len(rules) != lq or any(r not in BufferDecodeMask.RULES for r in rules):
        raise InputError(
            f"row_rule: expected 'causal', 'strict' or a sequence of them of length {lq}, "
            f"got {row_rule!r}"
        )
    return rules


def shared_context_args(
    q,
    k_ctx,
    v_ctx,
    k_buf=None,
    v_buf=None,
    *,
    buffer_len: int | torch.Tensor = 0,
    context_lens=None,
    row_rule: str | Sequence[str] = "causal",
    scale=None,
) -> DecodeArgs:
    """The contract of `shared_context_attention` (see the reference)."""
    buffer_len_tensor = None
    if isinstance(buffer_len, torch.Tensor):
        device = q.device if isinstance(q, torch.Tensor) else None
        check_tensor(
            "buffer_len", buffer_len, shape=(), dtypes=(torch.int32, torch.int64), device=device
        )
        # The value is read here only where that is free: a host tensor. A device tensor is
        # read by the kernels on the device (reading it here would be a host sync every
        # decode step, refused inside CUDA-graph capture); kernels clamp it to [0, T_cap],
        # and the reference, which reads it anyway, checks it as an int.
        if buffer_len.device.type == "cpu":
            check_int("buffer_len", buffer_len.item())
        buffer_len_tensor = buffer_len
        has_buffer = isinstance(k_buf, torch.Tensor) and k_buf.dim() == 5
        buffer_len = k_buf.shape[3] if has_buffer else 0
    else:
        buffer_len = check_int("buffer_len", buffer_len)
    group, ctx_len, ctx_lens = check_context_buffer(
        q, k_ctx, v_ctx, k_buf, v_buf, context_lens,
        need=int(buffer_len), name="buffer_len", q_dims="[G, S, H, Lq, D]",
    )  # fmt: skip
    rules = _row_rule(q.shape[3], row_rule if isinstance(row_rule, str) else tuple(row_rule))
    return DecodeArgs(
        group, check_scale(scale, q.shape[4]), ctx_len, ctx_lens, int(buffer_len),
        buffer_len_tensor, rules,
    )  # fmt: skip


def teacher_forcing_args(
    q, k_ctx, v_ctx, k_buf, v_buf, *, context_lens=None, scale=None
) -> TeacherForcingArgs:
    """The contract of `teacher_forcing_attention` (see the reference)."""
    check_tensor("q", q, ndim=5, dims="[G, S, H, 2*Nt, D]")
    if q.shape[3] % 2:
        raise InputError(f"q: expected an even row count 2*Nt on dim 3, got {q.shape[3]}")
    nt = q.shape[3] // 2
    if k_buf is None or v_buf is None:
        raise InputError("k_buf, v_buf: expected tensors [G, S, H_kv, Nt, D], got None")
    group, ctx_len, ctx_lens = check_context_buffer(
        q, k_ctx, v_ctx, k_buf, v_buf, context_lens,
        need=nt, name="Nt", q_dims="[G, S, H, 2*Nt, D]",
    )  # fmt: skip
    if k_buf.shape[3] != nt:
        raise InputError(
            f"k_buf: expected Nt={nt} rows on dim 3 (q has 2*Nt rows), got {k_buf.shape[3]}"
        )
    return TeacherForcingArgs(group, check_scale(scale, q.shape[4]), ctx_len, ctx_lens, nt)


# ---- packed (varlen) rows ---------------------------------------------------------------


def _check_packed(q, k, v, cu_seqlens_q, cu_seqlens_k):
    """q [Tq, H, D], k/v [Tk, H_kv, D] and their offsets; returns (group, cq, ck)."""
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES, dims="[Tq, H, D]")
    d = q.shape[2]
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, ndim=3, dtypes=(q.dtype,), device=q.device, dims="[Tk, H_kv, D]")
        if t.shape[2] != d or t.shape != k.shape:
            raise InputError(f"{name}: expected shape [Tk, H_kv, {d}], got {list(t.shape)}")
    check_head_dim("q", d)
    group = check_gqa(q.shape[1], k.shape[1])
    cq, ck = check_cu_seqlens_pair(
        cu_seqlens_q, cu_seqlens_k, total_q=q.shape[0], total_k=k.shape[0], device=q.device
    )
    return group, cq, ck


def varlen_args(
    q, k, v, *, cu_seqlens_q, cu_seqlens_k, causal: bool = False, scale=None
) -> VarlenArgs:
    """The contract of `varlen_attention` (see the reference)."""
    group, cq, ck = _check_packed(q, k, v, cu_seqlens_q, cu_seqlens_k)
    return VarlenArgs(group, check_scale(scale, q.shape[2]), cq, ck, bool(causal))


def selection_args(
    q,
    k,
    v,
    *,
    cu_seqlens_q,
    cu_seqlens_k,
    block_indices,
    block_size: int,
    causal: bool = False,
    scale=None,
) -> SelectionArgs:
    """The contract of `selection_attention` (see the reference); the index values are
    checked by the reference only (the kernels skip entries outside a sequence's blocks)."""
    group, cq, ck = _check_packed(q, k, v, cu_seqlens_q, cu_seqlens_k)
    check_block_indices(block_indices, rows=q.shape[0], kv_heads=k.shape[1], device=q.device)
    block_size = check_positive_int("block_size", block_size)
    return SelectionArgs(group, check_scale(scale, q.shape[2]), cq, ck, bool(causal), block_size)
