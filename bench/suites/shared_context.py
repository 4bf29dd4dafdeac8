"""Suite `shared_context`: joint-sampling decode and teacher forcing over a shared context.

G datasets, S sample paths each, H heads (H_kv key/value heads), head dim D, bf16, forward
only. The context K/V of each dataset `[G, H_kv, Nc, D]` is shared by its S paths; each
path has its own buffer K/V `[G, S, H_kv, T_cap, D]`.

- mode `decode` (one step of joint sampling): q `[G, S, H, Lq=1, D]`, the first T of the
  T_cap = T + 8 buffer slots valid; with the "causal" row rule the new row sees all Nc
  context keys and all T buffer keys (it occupies the last valid slot), so no key is
  masked and unmasked SDPA / FlexAttention on per-path materialised K/V compute the same
  function.
- mode `teacher_forcing` (joint density in one pass): q `[G, S, H, 2*Nt, D]` = rows
  `[buf_0..buf_{Nt-1}, tgt_0..tgt_{Nt-1}]` over keys `[ctx | buf]` (`TeacherForcingMask`).

Correctness: every provider is compared with an fp64 run of `tabattn_core.reference` on the
first dataset's first 8 sample paths (all heads, all query rows): out and, where the
provider returns one, LSE.

Each row also carries a floor: `floor_us = max(bytes / copy bandwidth, FLOPs / GEMM rate)`
with the device copy bandwidth and the bf16 GEMM rate measured in the same run (see
`_calibrate`), `ratio_to_floor` = time / floor, and `floor_plus_launch_us` = floor + the
measured cost of launching an empty Triton kernel from Python.
"""

from __future__ import annotations

import functools
import importlib
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from bench.harness import (
    Check,
    Inputs,
    Provider,
    RunConfig,
    Suite,
    Unavailable,
    need_gpu_or_interpreter,
    register_suite,
)

DECODE, TEACHER_FORCING = "decode", "teacher_forcing"
MODES = (DECODE, TEACHER_FORCING)

# decode: (G, S, Nc, T) at H=8, D=64, plus the prototype model's H=4, D=32.
DECODE_SIZES = ((1, 512, 1024, 16), (1, 1024, 4096, 64), (1, 64, 16384, 32), (4, 128, 1024, 16))
DECODE_PROTOTYPE = ((1, 512, 1024, 16),)
H, D = 8, 64
PROTOTYPE_H, PROTOTYPE_D = 4, 32
LQ = 1
SPARE_SLOTS = 8  # T_cap = T + SPARE_SLOTS (slots past T hold data that must not be read)
# teacher forcing: (S, Nc, Nt) at G=1, H=8, D=64.
TF_SIZES = ((256, 1024, 64), (64, 4096, 256))

SMOKE_H, SMOKE_D = 2, 32
SMOKE_DECODE_SIZES = ((1, 3, 17, 5), (2, 2, 9, 3))
SMOKE_TF_SIZES = ((2, 9, 4),)

CHECK_PATHS = 8  # the fp64 check covers the first dataset's first CHECK_PATHS sample paths
REFERENCE_MAX_SCORE_BYTES = 4 * 2**30  # reference provider: dense fp32 scores at most 4 GiB
REFERENCE_MAX_BYTES = 24 * 2**30  # ... and its working set (scores, per-path fp32 K/V)
GRAPH_WARMUP_CALLS = 3

# Calibration (the floor): copy of COPY_BYTES, a GEMM_N^3 matmul, LAUNCH_CALLS empty launches.
COPY_BYTES = 2**30
GEMM_N = 8192
LAUNCH_CALLS = 2000
LAUNCH_REPEATS = 7
GRAPH_LAUNCHES = 1000  # empty kernels captured in one CUDA graph
GRAPH_REPLAYS = 20
CPU_COPY_BYTES = 2**26
CPU_GEMM_N = 512
CPU_REPS = 5

SDPA_OF_MODE = {DECODE: "sdpa-materialised", TEACHER_FORCING: "sdpa-mask"}
FLEX_OF_MODE = {DECODE: ("flex-materialised", "flex-split"), TEACHER_FORCING: ("flex-tf",)}


def _cases(cfg: RunConfig) -> list[dict[str, Any]]:
    if cfg.smoke:
        decode = [(g, s, nc, t, SMOKE_H, SMOKE_D) for g, s, nc, t in SMOKE_DECODE_SIZES]
        tf = [(s, nc, nt, SMOKE_H, SMOKE_D) for s, nc, nt in SMOKE_TF_SIZES]
    else:
        decode = [(g, s, nc, t, H, D) for g, s, nc, t in DECODE_SIZES]
        decode += [(g, s, nc, t, PROTOTYPE_H, PROTOTYPE_D) for g, s, nc, t in DECODE_PROTOTYPE]
        tf = [(s, nc, nt, H, D) for s, nc, nt in TF_SIZES]
    cases: list[dict[str, Any]] = [
        {
            "mode": DECODE,
            "G": g,
            "S": s,
            "H": h,
            "H_kv": h,
            "Lq": LQ,
            "Nc": nc,
            "T": t,
            "T_cap": t + SPARE_SLOTS,
            "D": d,
        }
        for g, s, nc, t, h, d in decode
    ]
    cases += [
        {"mode": TEACHER_FORCING, "G": 1, "S": s, "H": h, "H_kv": h, "Nc": nc, "Nt": nt, "D": d}
        for s, nc, nt, h, d in tf
    ]
    return cases


def _case_modes(case: dict[str, Any]) -> tuple[str, ...]:
    return (case["mode"],)


def _dtype(cfg: RunConfig) -> torch.dtype:
    # The smoke run on CPU uses fp32 (the Triton interpreter has no bf16).
    return torch.float32 if cfg.smoke and cfg.device.type == "cpu" else torch.bfloat16


def _buffer_rows(case: dict[str, Any]) -> int:
    """Valid buffer rows: T (decode) or Nt (teacher forcing)."""
    return case["T"] if case["mode"] == DECODE else case["Nt"]


def _query_rows(case: dict[str, Any]) -> int:
    return case["Lq"] if case["mode"] == DECODE else 2 * case["Nt"]


def _make_inputs(case: dict[str, Any], cfg: RunConfig, seed: int) -> Inputs:
    g, s, h, h_kv, nc, d = (case[k] for k in ("G", "S", "H", "H_kv", "Nc", "D"))
    cap = case["T_cap"] if case["mode"] == DECODE else case["Nt"]
    gen = torch.Generator(device=cfg.device).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        t = torch.randn(*shape, generator=gen, device=cfg.device, dtype=torch.float32)
        return t.to(_dtype(cfg))

    leaves = {
        "q": randn(g, s, h, _query_rows(case), d),
        "k_ctx": randn(g, h_kv, nc, d),
        "v_ctx": randn(g, h_kv, nc, d),
        "k_buf": randn(g, s, h_kv, cap, d),
        "v_buf": randn(g, s, h_kv, cap, d),
    }
    # Forward only: no upstream gradient; grad_out only tells the harness the device.
    grad_out = torch.empty(0, device=cfg.device)
    return Inputs(leaves=leaves, grad_out=grad_out, extra={"scale": d**-0.5})


def _forward_flops(case: dict[str, Any]) -> float:
    # 4 * rows * visible keys * D. Decode: every new row sees Nc + T keys. Teacher forcing:
    # 2*Nt rows see the context; buffer keys visible: Nt(Nt+1)/2 + Nt(Nt-1)/2 = Nt^2.
    paths = case["G"] * case["S"] * case["H"] * case["D"]
    if case["mode"] == DECODE:
        return 4.0 * paths * case["Lq"] * (case["Nc"] + case["T"])
    nt = case["Nt"]
    return 4.0 * paths * (2 * nt * case["Nc"] + nt * nt)


def _floor_bytes(case: dict[str, Any], element_size: int) -> int:
    """Bytes that must move: context K/V once, the valid buffer K/V, q and out."""
    g, s, h, h_kv, nc, d = (case[k] for k in ("G", "S", "H", "H_kv", "Nc", "D"))
    elements = 2 * g * h_kv * nc * d
    elements += 2 * g * s * h_kv * _buffer_rows(case) * d
    elements += 2 * g * s * h * _query_rows(case) * d
    return elements * element_size


def _shape_label(case: dict[str, Any]) -> str:
    head = f"G{case['G']} S{case['S']} H{case['H']} D{case['D']} Nc{case['Nc']}"
    return head + (f" T{case['T']}" if case["mode"] == DECODE else f" Nt{case['Nt']}")


def _x_label(case: dict[str, Any]) -> str:
    tail = f"T{case['T']}" if case["mode"] == DECODE else f"Nt{case['Nt']}"
    return f"G{case['G']} S{case['S']}\nNc{case['Nc']} {tail}\nH{case['H']} D{case['D']}"


def _baseline(mode: str, cfg: RunConfig) -> str:
    if mode == DECODE:
        return "sdpa-materialised"
    return "reference" if cfg.device.type == "cpu" else "flex-tf"


# ---------------------------------------------------------------------------------------
# correctness reference: fp64 on the first dataset's first CHECK_PATHS sample paths


def _reference(case: dict[str, Any], inputs: Inputs, mode: str, cfg: RunConfig) -> dict[str, Check]:
    from tabattn_core import reference

    q, k_ctx, v_ctx, k_buf, v_buf = _tensors(inputs)
    paths, scale = min(CHECK_PATHS, case["S"]), inputs.extra["scale"]
    kc, vc = (t[:1].to(torch.float64) for t in (k_ctx, v_ctx))
    outs, lses = [], []
    # One path at a time: teacher-forcing scores of one path are [H, 2*Nt, Nc + Nt].
    for s in range(paths):
        qs, kb, vb = (t[:1, s : s + 1].to(torch.float64) for t in (q, k_buf, v_buf))
        if mode == DECODE:
            out, lse = reference.shared_context_attention(
                qs, kc, vc, kb, vb, buffer_len=case["T"], scale=scale
            )
        else:
            out, lse = reference.teacher_forcing_attention(qs, kc, vc, kb, vb, scale=scale)
        outs.append(out)
        lses.append(lse)

    def subset(t: torch.Tensor) -> torch.Tensor:
        return t[:1, :paths]

    return {
        "out": Check(torch.cat(outs, dim=1), subset),
        "lse": Check(torch.cat(lses, dim=1), subset),
    }


# ---------------------------------------------------------------------------------------
# providers: each callable returns (out [G, S, H, Lq, D], lse [G, S, H, Lq] or None)


def _tensors(inputs: Inputs) -> tuple[torch.Tensor, ...]:
    return tuple(inputs.leaves[n] for n in ("q", "k_ctx", "v_ctx", "k_buf", "v_buf"))


def _need_cuda(q: torch.Tensor, what: str) -> None:
    if not q.is_cuda:
        raise Unavailable(f"{what}: measured on CUDA only")


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
        _, k_ctx, v_ctx, k_buf, v_buf = _tensors(inputs)
        rows = _buffer_rows(case)
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


def _make_tabattn(case: dict[str, Any], inputs: Inputs):
    q, k_ctx, v_ctx, k_buf, v_buf = _tensors(inputs)
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


def _make_tabattn_graph(case: dict[str, Any], inputs: Inputs):
    q = inputs.leaves["q"]
    _need_cuda(q, "tabattn-graph (CUDA graph replay)")
    return _graphed(_make_tabattn(case, inputs), q.device)


def _make_sdpa_materialised(case: dict[str, Any], inputs: Inputs):
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    q = inputs.leaves["q"]
    k, v = _materialised(case, inputs)
    q2 = q.reshape(-1, *q.shape[2:])
    scale, kw = inputs.extra["scale"], ({"enable_gqa": True} if _gqa(case) else {})
    return lambda: _as_op_layout(case, sdpa(q2, k, v, scale=scale, **kw), None)


def _make_sdpa_concat(case: dict[str, Any], inputs: Inputs):
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    q, k_ctx, v_ctx, k_buf, v_buf = _tensors(inputs)
    q2, t = q.reshape(-1, *q.shape[2:]), case["T"]
    scale, kw = inputs.extra["scale"], ({"enable_gqa": True} if _gqa(case) else {})

    def fn():
        k, v = _concat(k_ctx, k_buf, t), _concat(v_ctx, v_buf, t)
        return _as_op_layout(case, sdpa(q2, k, v, scale=scale, **kw), None)

    return fn


def _make_sdpa_mask(case: dict[str, Any], inputs: Inputs):
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from tabattn_core.masks import TeacherForcingMask

    q = inputs.leaves["q"]
    k, v = _materialised(case, inputs)
    q2 = q.reshape(-1, *q.shape[2:])
    mask = TeacherForcingMask(case["Nt"], case["Nc"]).dense(q.device)  # [1, 1, 2Nt, Nc+Nt]
    scale, kw = inputs.extra["scale"], ({"enable_gqa": True} if _gqa(case) else {})
    return lambda: _as_op_layout(case, sdpa(q2, k, v, attn_mask=mask, scale=scale, **kw), None)


@functools.cache
def _compiled_flex() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """(flex with LSE, the split-merge decode step), each torch.compile(dynamic=False)."""
    import torch._dynamo.config as dynamo_config
    from torch.nn.attention import flex_attention as flex_module

    from tabattn_core.reference import merge_states

    # One compiled graph per shape: lift the recompile limit so that no case falls back to
    # the (dense, memory-hungry) eager path.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(64, getattr(dynamo_config, name)))
    aux_request = getattr(flex_module, "AuxRequest", None)
    flex = flex_module.flex_attention

    def with_lse(q, k, v, scale, block_mask=None, enable_gqa=False):
        kw = {"block_mask": block_mask, "scale": scale, "enable_gqa": enable_gqa}
        if aux_request is not None:
            out, aux = flex(q, k, v, return_aux=aux_request(lse=True), **kw)
            return out, aux.lse
        return flex(q, k, v, return_lse=True, **kw)

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

    return torch.compile(with_lse, dynamic=False), torch.compile(split, dynamic=False)


def _make_flex_materialised(case: dict[str, Any], inputs: Inputs):
    q = inputs.leaves["q"]
    _need_cuda(q, "flex")
    k, v = _materialised(case, inputs)
    q2 = q.reshape(-1, *q.shape[2:])
    compiled, scale, gqa = _compiled_flex()[0], inputs.extra["scale"], _gqa(case)
    return lambda: _as_op_layout(case, *compiled(q2, k, v, scale, None, gqa))


def _make_flex_split(case: dict[str, Any], inputs: Inputs):
    q, k_ctx, v_ctx, k_buf, v_buf = _tensors(inputs)
    _need_cuda(q, "flex")
    if case["Lq"] != 1:
        raise Unavailable("flex-split: written for Lq = 1 (no mask on the buffer part)")
    t = case["T"]
    kb, vb = _buffer_view(k_buf, t), _buffer_view(v_buf, t)
    compiled, scale, gqa = _compiled_flex()[1], inputs.extra["scale"], _gqa(case)
    return lambda: compiled(q, k_ctx, v_ctx, kb, vb, scale, gqa)


def _make_flex_tf(case: dict[str, Any], inputs: Inputs):
    from torch.nn.attention.flex_attention import create_block_mask

    from tabattn_core.masks import TeacherForcingMask

    q = inputs.leaves["q"]
    _need_cuda(q, "flex")
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
    compiled, scale, gqa = _compiled_flex()[0], inputs.extra["scale"], _gqa(case)
    return lambda: _as_op_layout(case, *compiled(q2, k, v, scale, block_mask, gqa))


def _reference_bytes(case: dict[str, Any]) -> tuple[int, int]:
    """(fp32 score bytes, working-set estimate) of the dense reference: scores, their
    softmax, and the fp32 K/V that its broadcast matmul materialises per path."""
    rows = case["G"] * case["S"] * case["H"] * _query_rows(case)
    keys = case["Nc"] + _buffer_rows(case)
    scores = 4 * rows * keys
    per_path_kv = 4 * 2 * case["G"] * case["S"] * case["H"] * keys * case["D"]
    return scores, 3 * scores + per_path_kv


def _make_reference(case: dict[str, Any], inputs: Inputs):
    from tabattn_core import reference

    q, k_ctx, v_ctx, k_buf, v_buf = _tensors(inputs)
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
        return lambda: reference.shared_context_attention(
            q, k_ctx, v_ctx, k_buf, v_buf, buffer_len=t, scale=scale
        )
    return lambda: reference.teacher_forcing_attention(q, k_ctx, v_ctx, k_buf, v_buf, scale=scale)


# ---------------------------------------------------------------------------------------
# the floor: copy bandwidth, GEMM rate and launch cost measured once per run


@functools.cache
def _empty_kernel():
    import triton

    @triton.jit
    def empty_kernel(x_ptr):
        pass

    return empty_kernel


def _median_seconds(fn: Callable[[], Any], reps: int, sync: Callable[[], None]) -> float:
    fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _launch_us(device: torch.device) -> float:
    """Host cost of one launch of an empty Triton kernel from Python: LAUNCH_CALLS launches
    back to back, then a synchronize, divided by LAUNCH_CALLS (median of LAUNCH_REPEATS)."""
    kernel = _empty_kernel()
    x = torch.empty(1, device=device)

    def launches():
        for _ in range(LAUNCH_CALLS):
            kernel[(1,)](x)

    seconds = _median_seconds(launches, LAUNCH_REPEATS, lambda: torch.cuda.synchronize(device))
    return seconds / LAUNCH_CALLS * 1e6


def _copy_and_gemm_ms(
    dev: torch.device, dtype: torch.dtype, copy_bytes: int, n: int, bench: Callable[..., float]
) -> tuple[float, float]:
    """Median ms of a device copy of `copy_bytes` and of an n^3 matmul (buffers freed on
    return)."""
    src = torch.ones(copy_bytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    c = torch.empty(n, n, device=dev, dtype=dtype)
    return bench(lambda: dst.copy_(src)), bench(lambda: torch.mm(a, b, out=c))


def _graph_launch_us(device: torch.device) -> float:
    """Cost per kernel inside a CUDA graph: GRAPH_LAUNCHES empty launches captured in one
    graph, GRAPH_REPLAYS replays then a synchronize, host time / launches (median of
    LAUNCH_REPEATS)."""
    kernel = _empty_kernel()
    x = torch.empty(1, device=device)
    kernel[(1,)](x)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_LAUNCHES):
            kernel[(1,)](x)

    def replays():
        for _ in range(GRAPH_REPLAYS):
            graph.replay()

    seconds = _median_seconds(replays, LAUNCH_REPEATS, lambda: torch.cuda.synchronize(device))
    return seconds / (GRAPH_REPLAYS * GRAPH_LAUNCHES) * 1e6


def _calibrate(cfg: RunConfig) -> dict[str, Any]:
    dtype, dev = _dtype(cfg), cfg.device
    cuda = dev.type == "cuda"
    copy_bytes, n = (COPY_BYTES, GEMM_N) if cuda else (CPU_COPY_BYTES, CPU_GEMM_N)
    result: dict[str, Any] = {
        "copy_bytes": copy_bytes,
        "copy_bandwidth_counts": "read + write (2 x copy_bytes per copy)",
        "gemm_shape": [n, n, n],
        "gemm_dtype": str(dtype).removeprefix("torch."),
        "launch_calls": LAUNCH_CALLS,
        "graph_launches": GRAPH_LAUNCHES,
    }
    if cuda:
        from triton.testing import do_bench

        result["method"] = "triton.testing.do_bench median (copy, GEMM); host clock (launch)"

        def bench(fn: Callable[[], Any]) -> float:
            return float(do_bench(fn, warmup=cfg.warmup_ms, rep=cfg.rep_ms, return_mode="median"))

    else:
        result["method"] = f"time.perf_counter median of {CPU_REPS} calls"

        def bench(fn: Callable[[], Any]) -> float:
            return _median_seconds(fn, CPU_REPS, lambda: None) * 1e3

    copy_ms, gemm_ms = _copy_and_gemm_ms(dev, dtype, copy_bytes, n, bench)
    result.update(
        copy_ms=copy_ms,
        copy_bandwidth_gbps=2 * copy_bytes / (copy_ms * 1e-3) / 1e9,
        gemm_ms=gemm_ms,
        gemm_tflops=2.0 * n**3 / (gemm_ms * 1e-3) / 1e12,
        launch_us=None,
        graph_launch_us=None,
    )
    if not cuda:
        result["launch_note"] = "the empty Triton kernel launch is measured on CUDA only"
        return result
    torch.cuda.empty_cache()
    for key, measure in (("launch_us", _launch_us), ("graph_launch_us", _graph_launch_us)):
        try:
            result[key] = measure(dev)
        except Exception as exc:  # the floor stays; only the floor + launch fields are lost
            result[key.replace("_us", "_note")] = f"failed: {type(exc).__name__}: {exc}"
    return result


def _annotate(
    case: dict[str, Any],
    mode: str,
    rows: list[dict[str, Any]],
    calibration: dict[str, Any],
    cfg: RunConfig,
) -> None:
    """Per row: floor, time / floor, ratios to SDPA and to the fastest flex variant."""
    nbytes = _floor_bytes(case, _dtype(cfg).itemsize)
    flops = _forward_flops(case)
    bandwidth, rate = calibration.get("copy_bandwidth_gbps"), calibration.get("gemm_tflops")
    launch, graph_launch = calibration.get("launch_us"), calibration.get("graph_launch_us")
    floor = bound = None
    if bandwidth and rate:
        memory_us, compute_us = nbytes / (bandwidth * 1e3), flops / (rate * 1e6)
        floor = max(memory_us, compute_us)
        bound = "memory" if memory_us >= compute_us else "compute"
    ms = {r["provider"]: r["ms"] for r in rows if r["ms"]}
    flex = [name for name in FLEX_OF_MODE[mode] if name in ms]
    best_flex = min(flex, key=ms.__getitem__) if flex else None
    sdpa = SDPA_OF_MODE[mode]
    for r in rows:
        us = r["ms"] * 1e3 if r["ms"] else None
        plus_launch = floor + launch if floor is not None and launch is not None else None
        plus_graph = floor + graph_launch if floor is not None and graph_launch else None
        r.update(
            us=us,
            floor_bytes=nbytes,
            floor_flops=flops,
            floor_bound=bound,
            floor_us=floor,
            floor_plus_launch_us=plus_launch,
            floor_plus_graph_launch_us=plus_graph,
            ratio_to_floor=us / floor if us and floor else None,
            ratio_to_floor_plus_launch=us / plus_launch if us and plus_launch else None,
            sdpa_provider=sdpa,
            speedup_vs_sdpa=ms[sdpa] / r["ms"] if us and sdpa in ms else None,
            best_flex=best_flex,
            speedup_vs_best_flex=ms[best_flex] / r["ms"] if us and best_flex else None,
        )


TABLE_COLUMNS = [
    {"title": "µs", "key": "us", "format": ".4g"},
    {"title": "vs SDPA", "key": "speedup_vs_sdpa", "format": ".3g", "suffix": "x"},
    {"title": "vs best flex", "key": "speedup_vs_best_flex", "format": ".3g", "suffix": "x"},
    {"title": "floor µs", "key": "floor_us", "format": ".3g"},
    {"title": "/ floor", "key": "ratio_to_floor", "format": ".3g"},
    {"title": "floor+launch µs", "key": "floor_plus_launch_us", "format": ".3g"},
]
TABLE_NOTES = [
    "vs SDPA = sdpa-materialised (decode) or sdpa-mask (teacher_forcing) µs / provider µs; "
    "vs best flex = the fastest of flex-materialised, flex-split (decode) or flex-tf "
    "(teacher_forcing) / provider; floor = max(bytes / copy bandwidth, FLOPs / GEMM rate) "
    "measured in this run (header.calibration); / floor = provider µs / floor; "
    "floor+launch = floor + one empty Triton launch from Python.",
]


SUITE = register_suite(
    Suite(
        name="shared_context",
        description=(
            "shared-context joint sampling: decode (q [G, S, H, 1, D] over the shared context "
            "[G, H_kv, Nc, D] and per-path buffers [G, S, H_kv, T_cap, D], T valid) and "
            "teacher forcing (q [G, S, H, 2*Nt, D], TeacherForcingMask), forward, bf16"
        ),
        cases=_cases,
        providers={
            "tabattn": Provider(
                "tabattn",
                _make_tabattn,
                "tabattn_triton.ops.shared_context.shared_context_attention / "
                "teacher_forcing_attention (num_splits automatic)",
            ),
            "tabattn-graph": Provider(
                "tabattn-graph",
                _make_tabattn_graph,
                "tabattn decode, one call captured in a CUDA graph (after warm-up on a side "
                "stream); graph.replay() timed",
                modes=(DECODE,),
            ),
            "sdpa-materialised": Provider(
                "sdpa-materialised",
                _make_sdpa_materialised,
                "SDPA (default backend) on per-path K/V [G*S, H_kv, Nc+T, D] built once "
                "outside timing, q [G*S, H, 1, D], no mask",
                modes=(DECODE,),
            ),
            "sdpa-concat": Provider(
                "sdpa-concat",
                _make_sdpa_concat,
                "the naive loop's step: torch.cat(context expanded to every path, buffer) "
                "then SDPA, both timed",
                modes=(DECODE,),
            ),
            "flex-materialised": Provider(
                "flex-materialised",
                _make_flex_materialised,
                "torch.compile(flex_attention) with LSE on the per-path materialised K/V, no "
                "block mask",
                modes=(DECODE,),
            ),
            "flex-split": Provider(
                "flex-split",
                _make_flex_split,
                "split-merge: one flex_attention over the context with all S paths folded "
                "into query rows [G, H, S*Lq, D], one per-path flex over the T buffer rows, "
                "merged by tabattn_core.reference.merge_states; the whole step in one "
                "torch.compile(dynamic=False)",
                modes=(DECODE,),
            ),
            "flex-tf": Provider(
                "flex-tf",
                _make_flex_tf,
                "torch.compile(flex_attention) with LSE and a BlockMask from "
                "TeacherForcingMask(Nt, Nc).mask_mod() (built once), per-path K/V "
                "[S, H_kv, Nc+Nt, D], q [S, H, 2Nt, D]",
                modes=(TEACHER_FORCING,),
            ),
            "sdpa-mask": Provider(
                "sdpa-mask",
                _make_sdpa_mask,
                "SDPA (default backend) with the dense boolean TeacherForcingMask on the "
                "per-path K/V",
                modes=(TEACHER_FORCING,),
            ),
            "reference": Provider(
                "reference",
                _make_reference,
                "tabattn_core.reference.shared_context_attention / teacher_forcing_attention "
                "(dense, fp32 softmax)",
            ),
        },
        make_inputs=_make_inputs,
        forward_flops=_forward_flops,
        reference=_reference,
        baseline=_baseline,
        dtype=_dtype,
        shape_label=_shape_label,
        x_label=_x_label,
        panel_keys=(),
        modes=MODES,
        case_modes=_case_modes,
        calibrate=_calibrate,
        annotate=_annotate,
        header_extra={
            "plot": {"metric": "us", "yscale": "log", "floor": "floor_us"},
            "table_columns": TABLE_COLUMNS,
            "table_notes": TABLE_NOTES,
            "floor_method": (
                "floor_us = max(floor_bytes / copy bandwidth, floor_flops / GEMM rate); "
                "floor_bytes = element size x (context K/V once + the valid buffer K/V + q "
                "+ out); floor_flops = forward FLOPs; bandwidth: device copy of copy_bytes "
                "counted as read + write, GEMM rate: an n^3 matmul in the suite's dtype; "
                "launch_us: host time per launch of an empty @triton.jit kernel from Python; "
                "graph_launch_us: time per launch of it inside a CUDA graph"
            ),
        },
        reference_method=(
            "fp64 run of tabattn_core.reference.shared_context_attention / "
            f"teacher_forcing_attention on the first dataset's first {CHECK_PATHS} sample "
            "paths, all heads and query rows, from the same inputs: out and lse. Error = "
            "||x - ref|| / ||ref|| (tabattn_core.testing.rel_error), bound REL_TOL[dtype]."
        ),
    )
)
