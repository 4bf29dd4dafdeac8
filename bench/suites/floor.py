"""The floor of a call, measured once per run (a suite's `calibrate` hook): the device copy
bandwidth, the GEMM rate and the cost of launching a kernel, from Python and inside a CUDA
graph. `floor_us` turns them into the least time a call moving `bytes` and doing `flops`
can take.

CUDA: a copy of COPY_BYTES (counted as read + write) and a GEMM_N^3 matmul in the suite's
dtype, each timed by the harness's `median_ms`; `launch_us`, the host time per launch of an
empty `@triton.jit` kernel (LAUNCH_CALLS launches back to back, then a synchronize; median
of LAUNCH_REPEATS) and `graph_launch_us`, that kernel's cost per launch inside a CUDA graph
(GRAPH_LAUNCHES launches in one graph, GRAPH_REPLAYS replays, then a synchronize). CPU: a
copy of CPU_COPY_BYTES and a CPU_GEMM_N^3 matmul, median of CPU_REPS calls; no launch cost.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from bench.harness import RunConfig, host_median_ms, median_ms

COPY_BYTES = 2**30
GEMM_N = 8192
LAUNCH_CALLS = 2000
LAUNCH_REPEATS = 7
GRAPH_LAUNCHES = 1000  # empty kernels captured in one CUDA graph
GRAPH_REPLAYS = 20
CPU_COPY_BYTES = 2**26
CPU_GEMM_N = 512
CPU_REPS = 5

METHOD = (  # of the calibration
    "bandwidth: device copy of copy_bytes counted as read + write, GEMM rate: an n^3 matmul "
    "in the suite's dtype; launch_us: host time per launch of an empty @triton.jit kernel "
    "from Python; graph_launch_us: time per launch of it inside a CUDA graph"
)


@functools.cache
def _empty_kernel():
    import triton

    @triton.jit
    def empty_kernel(x_ptr):
        pass

    return empty_kernel


def _launch_us(device: torch.device) -> float:
    """Host cost of one launch of an empty Triton kernel from Python."""
    kernel = _empty_kernel()
    x = torch.empty(1, device=device)

    def launches():
        for _ in range(LAUNCH_CALLS):
            kernel[(1,)](x)

    return host_median_ms(launches, device, LAUNCH_REPEATS) / LAUNCH_CALLS * 1e3


def _graph_launch_us(device: torch.device) -> float:
    """Cost per kernel inside a CUDA graph."""
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

    ms = host_median_ms(replays, device, LAUNCH_REPEATS)
    return ms / (GRAPH_REPLAYS * GRAPH_LAUNCHES) * 1e3


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


def calibrate(cfg: RunConfig, dtype: torch.dtype) -> dict[str, Any]:
    """Bandwidth, GEMM rate and launch costs on cfg's device (the header's `calibration`)."""
    dev = cfg.device
    cuda = dev.type == "cuda"
    copy_bytes, n = (COPY_BYTES, GEMM_N) if cuda else (CPU_COPY_BYTES, CPU_GEMM_N)
    result: dict[str, Any] = {
        "copy_bytes": copy_bytes,
        "copy_bandwidth_counts": "read + write (2 x copy_bytes per copy)",
        "gemm_shape": [n, n, n],
        "gemm_dtype": str(dtype).removeprefix("torch."),
        "launch_calls": LAUNCH_CALLS,
        "graph_launches": GRAPH_LAUNCHES,
        "method": (
            "triton.testing.do_bench median (copy, GEMM); host clock (launch)"
            if cuda
            else f"time.perf_counter median of {CPU_REPS} calls"
        ),
    }
    copy_ms, gemm_ms = _copy_and_gemm_ms(
        dev, dtype, copy_bytes, n, lambda fn: median_ms(fn, cfg, cpu_reps=CPU_REPS)
    )
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


def floor_us(nbytes: float, flops: float, calibration: dict[str, Any]):
    """(floor µs, "memory" or "compute"): max(bytes / bandwidth, FLOPs / GEMM rate); (None,
    None) without a calibration."""
    bandwidth, rate = calibration.get("copy_bandwidth_gbps"), calibration.get("gemm_tflops")
    if not (bandwidth and rate):
        return None, None
    memory_us, compute_us = nbytes / (bandwidth * 1e3), flops / (rate * 1e6)
    return max(memory_us, compute_us), ("memory" if memory_us >= compute_us else "compute")
