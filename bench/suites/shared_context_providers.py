"""The providers of the `shared_context` suite; each callable returns (out [G, S, H, Lq, D],
lse [G, S, H, Lq] or None). The suite module (`bench.suites.shared_context`) says what
each one is and registers them.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

import torch

from bench.harness import Inputs, Unavailable, compile_static, need_gpu_or_interpreter
from bench.suites.flex import compiled_flex_lse, flex_lse, need_cuda, teacher_forcing_block_mask

DECODE, TEACHER_FORCING = "decode", "teacher_forcing"
GRAPH_WARMUP_CALLS = 3
REFERENCE_MAX_SCORE_BYTES = 4 * 2**30  # reference provider: dense fp32 scores at most 4 GiB
REFERENCE_MAX_BYTES = 24 * 2**30  # ... and its working set (scores, per-path fp32 K/V)


def buffer_rows(case: dict[str, Any]) -> int:
    """Valid buffer rows: T (decode) or Nt (teacher forcing)."""
    return case["T"] if case["mode"] == DECODE else case["Nt"]


def query_rows(case: dict[str, Any]) -> int:
    return case["Lq"] if case["mode"] == DECODE else 2 * case["Nt"]


def tensors(inputs: Inputs) -> tuple[torch.Tensor, ...]:
    """q, k_ctx, v_ctx, k_buf, v_buf."""
    return tuple(inputs.leaves[n] for n in ("q", "k_ctx", "v_ctx", "k_buf", "v_buf"))


def _gqa(case: dict[str, Any]) -> bool:
    return case["H_kv"] < case["H"]


def _buffer_view(t: torch.Tensor, rows: int) -> torch.Tensor:
    """The valid rows of a buffer [G, S, H_kv, T_cap, D] as [G*S, H_kv, rows, D] (a view)."""
    g, s, h_kv, _, d = t.shape
    return t[:, :, :, :rows].reshape(g * s, h_kv, rows, d)


def _concat(ctx: torch.Tensor, buf: torch.Tensor, rows: int) -> torch.Tensor:
    """Per-path K or V: [G*S, H_kv, Nc + rows, D] = cat(context expanded to every path,
    the path's first `rows` buffer rows), contiguous (what the naive sampling loop builds)."""
    g, h_kv, nc, d = ctx.shape
    s = buf.shape[1]
    full = torch.cat([ctx.unsqueeze(1).expand(g, s, h_kv, nc, d), buf[:, :, :, :rows]], dim=3)
    return full.reshape(g * s, h_kv, nc + rows, d)


def _materialised(case: dict[str, Any], inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-path materialised K/V, built once per case (outside timing) and shared by the
    providers that read it."""
    if "materialised" not in inputs.extra:
        _, k_ctx, v_ctx, k_buf, v_buf = tensors(inputs)
        rows = buffer_rows(case)
        with torch.no_grad():
            inputs.extra["materialised"] = (
                _concat(k_ctx, k_buf, rows),
                _concat(v_ctx, v_buf, rows),
            )
    return inputs.extra["materialised"]


def _as_op_layout(case: dict[str, Any], out: torch.Tensor, lse: torch.Tensor | None):
    """[G*S, H, L, D] / [G*S, H, L] back to [G, S, H, L, D] / [G, S, H, L] (views)."""
    g, s = case["G"], case["S"]
    out = out.reshape(g, s, *out.shape[1:])
    return out, (None if lse is None else lse.reshape(g, s, *lse.shape[1:]))


@functools.cache
def _tabattn_op(name: str) -> Callable[..., Any]:
    try:
        module = importlib.import_module("tabattn_triton.ops.shared_context")
        return getattr(module, name)
    except Exception as exc:
        raise Unavailable(
            f"tabattn_triton.ops.shared_context.{name}: {type(exc).__name__}: {exc}"
        ) from exc


def make_tabattn(case: dict[str, Any], inputs: Inputs):
    q, k_ctx, v_ctx, k_buf, v_buf = tensors(inputs)
    need_gpu_or_interpreter(q, "tabattn (Triton)")
    scale = inputs.extra["scale"]
    if case["mode"] == DECODE:
        op = _tabattn_op("shared_context_attention")
        t = case["T"]
        return lambda: op(q, k_ctx, v_ctx, k_buf, v_buf, buffer_len=t, scale=scale)
    op = _tabattn_op("teacher_forcing_attention")
    return lambda: op(q, k_ctx, v_ctx, k_buf, v_buf, scale=scale)


def make_tabattn_graph(case: dict[str, Any], inputs: Inputs):
    """`make_tabattn`'s call captured once in a CUDA graph (GRAPH_WARMUP_CALLS warm-up
    calls on a side stream first); the callable replays it and returns its outputs."""
    from tabattn_core.graphs import capture

    q = inputs.leaves["q"]
    need_cuda(q, "tabattn-graph (CUDA graph replay)")
    call = make_tabattn(case, inputs)

    def forward():
        with torch.no_grad():
            return call()

    return capture(forward, device=q.device, warmup=GRAPH_WARMUP_CALLS).replay


def make_sdpa_materialised(case: dict[str, Any], inputs: Inputs):
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    q = inputs.leaves["q"]
    k, v = _materialised(case, inputs)
    q2 = q.reshape(-1, *q.shape[2:])
    scale, kw = inputs.extra["scale"], ({"enable_gqa": True} if _gqa(case) else {})
    return lambda: _as_op_layout(case, sdpa(q2, k, v, scale=scale, **kw), None)


def make_sdpa_concat(case: dict[str, Any], inputs: Inputs):
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    q, k_ctx, v_ctx, k_buf, v_buf = tensors(inputs)
    q2, t = q.reshape(-1, *q.shape[2:]), case["T"]
    scale, kw = inputs.extra["scale"], ({"enable_gqa": True} if _gqa(case) else {})

    def fn():
        k, v = _concat(k_ctx, k_buf, t), _concat(v_ctx, v_buf, t)
        return _as_op_layout(case, sdpa(q2, k, v, scale=scale, **kw), None)

    return fn


def make_sdpa_mask(case: dict[str, Any], inputs: Inputs):
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from tabattn_core.masks import TeacherForcingMask

    q = inputs.leaves["q"]
    k, v = _materialised(case, inputs)
    q2 = q.reshape(-1, *q.shape[2:])
    mask = TeacherForcingMask(case["Nt"], case["Nc"]).dense(q.device)  # [1, 1, 2Nt, Nc+Nt]
    scale, kw = inputs.extra["scale"], ({"enable_gqa": True} if _gqa(case) else {})
    return lambda: _as_op_layout(case, sdpa(q2, k, v, attn_mask=mask, scale=scale, **kw), None)


@functools.cache
def _compiled_split() -> Callable[..., Any]:
    """The split-merge decode step under torch.compile(dynamic=False)."""
    from tabattn_core.reference import merge_states

    with_lse = flex_lse()

    def split(q, k_ctx, v_ctx, k_buf, v_buf, scale, enable_gqa=False):
        # q [G, S, H, Lq, D]; k_buf/v_buf the valid rows [G*S, H_kv, T, D].
        g, s, h, lq, d = q.shape
        # Context: all paths of a dataset folded into the query rows, one call over k_ctx.
        q_ctx = q.transpose(1, 2).reshape(g, h, s * lq, d)
        o_c, l_c = with_lse(q_ctx, k_ctx, v_ctx, scale, None, enable_gqa)
        o_c = o_c.reshape(g, h, s, lq, d).transpose(1, 2)
        l_c = l_c.reshape(g, h, s, lq).transpose(1, 2)
        # Buffer: per path (the single new row sees every valid buffer row).
        o_b, l_b = with_lse(q.reshape(g * s, h, lq, d), k_buf, v_buf, scale, None, enable_gqa)
        o_b, l_b = o_b.reshape(g, s, h, lq, d), l_b.reshape(g, s, h, lq)
        return merge_states(o_c, l_c, o_b, l_b)

    return compile_static(split)


def make_flex_materialised(case: dict[str, Any], inputs: Inputs):
    q = inputs.leaves["q"]
    need_cuda(q, "flex")
    k, v = _materialised(case, inputs)
    q2 = q.reshape(-1, *q.shape[2:])
    compiled, scale, gqa = compiled_flex_lse(), inputs.extra["scale"], _gqa(case)
    return lambda: _as_op_layout(case, *compiled(q2, k, v, scale, None, gqa))


def make_flex_split(case: dict[str, Any], inputs: Inputs):
    q, k_ctx, v_ctx, k_buf, v_buf = tensors(inputs)
    need_cuda(q, "flex")
    if case["Lq"] != 1:
        raise Unavailable("flex-split: written for Lq = 1 (no mask on the buffer part)")
    t = case["T"]
    kb, vb = _buffer_view(k_buf, t), _buffer_view(v_buf, t)
    compiled, scale, gqa = _compiled_split(), inputs.extra["scale"], _gqa(case)
    return lambda: compiled(q, k_ctx, v_ctx, kb, vb, scale, gqa)


def make_flex_tf(case: dict[str, Any], inputs: Inputs):
    q = inputs.leaves["q"]
    need_cuda(q, "flex")
    k, v = _materialised(case, inputs)
    q2 = q.reshape(-1, *q.shape[2:])
    block_mask = teacher_forcing_block_mask(case["Nt"], case["Nc"], q.device)
    compiled, scale, gqa = compiled_flex_lse(), inputs.extra["scale"], _gqa(case)
    return lambda: _as_op_layout(case, *compiled(q2, k, v, scale, block_mask, gqa))


def _reference_bytes(case: dict[str, Any]) -> tuple[int, int]:
    """(fp32 score bytes, working-set estimate) of the dense reference: scores, their
    softmax, and the fp32 K/V that its broadcast matmul materialises per path."""
    rows = case["G"] * case["S"] * case["H"] * query_rows(case)
    keys = case["Nc"] + buffer_rows(case)
    scores = 4 * rows * keys
    per_path_kv = 4 * 2 * case["G"] * case["S"] * case["H"] * keys * case["D"]
    return scores, 3 * scores + per_path_kv


def make_reference(case: dict[str, Any], inputs: Inputs):
    from tabattn_core import reference as core_reference

    q, k_ctx, v_ctx, k_buf, v_buf = tensors(inputs)
    scores, working = _reference_bytes(case)
    if scores > REFERENCE_MAX_SCORE_BYTES or working > REFERENCE_MAX_BYTES:
        raise Unavailable(
            f"reference skipped: dense fp32 scores {scores / 2**30:.1f} GiB (limit "
            f"{REFERENCE_MAX_SCORE_BYTES / 2**30:.0f}), working set ~{working / 2**30:.1f} GiB "
            f"(limit {REFERENCE_MAX_BYTES / 2**30:.0f})"
        )
    scale = inputs.extra["scale"]
    if case["mode"] == DECODE:
        t = case["T"]
        return lambda: core_reference.shared_context_attention(
            q, k_ctx, v_ctx, k_buf, v_buf, buffer_len=t, scale=scale
        )
    return lambda: core_reference.teacher_forcing_attention(
        q, k_ctx, v_ctx, k_buf, v_buf, scale=scale
    )
