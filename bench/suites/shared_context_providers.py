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
from bench.suites.flex import compiled_flex_lse, flex_lse, need_cuda

DECODE, TEACHER_FORCING = "decode", "teacher_forcing"
GRAPH_WARMUP_CALLS = 3


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


def _graphed(call: Callable[[], Any], device: torch.device):
    """`call` captured once in a CUDA graph (after warm-up calls on a side stream, as the
    torch docs ask); the returned callable replays it and returns the static outputs."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(GRAPH_WARMUP_CALLS):
            call()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static = call()
    torch.cuda.synchronize(device)

    def replay():
        graph.replay()
        return static

    return replay


def make_tabattn_graph(case: dict[str, Any], inputs: Inputs):
    q = inputs.leaves["q"]
    need_cuda(q, "tabattn-graph (CUDA graph replay)")
    return _graphed(make_tabattn(case, inputs), q.device)


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
    from torch.nn.attention.flex_attention import create_block_mask

    from tabattn_core.masks import TeacherForcingMask

    q = inputs.leaves["q"]
    need_cuda(q, "flex")
    k, v = _materialised(case, inputs)
    q2 = q.reshape(-1, *q.shape[2:])
    nt, nc = case["Nt"], case["Nc"]
    spec = TeacherForcingMask(nt, nc)  # one fixed context length: context_lens has 1 entry
    # The spec's tensors on the device, so its mask_mod moves nothing inside the kernel.
    spec.context_lens = spec.context_lens.to(q.device)
    spec.buffer_visible = spec.buffer_visible.to(q.device)
    spec_mod = spec.mask_mod()

    def mask_mod(b, h, q_idx, kv_idx):
        # The spec indexes its (single) context length by b; every path has the same one.
        return spec_mod(torch.zeros_like(b), h, q_idx, kv_idx)

    block_mask = create_block_mask(
        mask_mod, B=None, H=None, Q_LEN=2 * nt, KV_LEN=nc + nt, device=q.device
    )
    compiled, scale, gqa = compiled_flex_lse(), inputs.extra["scale"], _gqa(case)
    return lambda: _as_op_layout(case, *compiled(q2, k, v, scale, block_mask, gqa))
