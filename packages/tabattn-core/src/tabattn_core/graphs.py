"""CUDA-graph capture as torch's CUDA-graph notes describe it: warm-up calls on a side
stream, one capture, replays. Used by the predictor's stages, the training step and the
bench harness's graph timing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import torch

from tabattn_core.checks import InputError, check_positive_int

__all__ = ["CapturedGraph", "capture"]

T = TypeVar("T")


class CapturedGraph(Generic[T]):
    """A captured CUDA graph and what the captured call returned (`outputs`): tensors in the
    graph's memory pool that each replay rewrites in place."""

    def __init__(self, graph: torch.cuda.CUDAGraph, outputs: T) -> None:
        self.graph = graph
        self.outputs = outputs

    def replay(self) -> T:
        """Replay the graph; returns `outputs` (the same objects every call: read or copy
        them before the next replay)."""
        self.graph.replay()
        return self.outputs


def capture(
    fn: Callable[[], T],
    *,
    device: torch.device | str | None = None,
    warmup: int = 1,
    after_warmup: Callable[[], None] | None = None,
) -> CapturedGraph[T]:
    """`fn()` captured in a CUDA graph on `device` (default: the current CUDA device).

    fn runs `warmup` (>= 1) times on a side stream first, so that autotuning, compilation
    and lazy initialisation (cuBLAS's handle, for one) happen outside the capture; the
    current stream waits for it, then `after_warmup()` (when given) runs on the current
    stream, e.g. to reset gradients or optimizer state that the warm-up changed, and fn is
    called once more under capture. Everything fn reads and writes must stay at its address
    while the graph is replayed. Bad arguments raise InputError before fn runs; a capture
    CUDA refuses raises torch's RuntimeError.
    """
    if not callable(fn):
        raise InputError(f"fn: expected a callable, got {type(fn).__name__}")
    warmup = check_positive_int("warmup", warmup)
    if after_warmup is not None and not callable(after_warmup):
        raise InputError(f"after_warmup: expected a callable or None, got {after_warmup!r}")
    device = _cuda_device(device)
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    current.wait_stream(side)
    if after_warmup is not None:
        after_warmup()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return CapturedGraph(graph, outputs)


def _cuda_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        if not torch.cuda.is_available():
            raise InputError("device: expected a CUDA device, got None (CUDA is unavailable)")
        return torch.device("cuda", torch.cuda.current_device())
    resolved = torch.device(device)
    if resolved.type != "cuda":
        raise InputError(f"device: expected a CUDA device, got {resolved}")
    return resolved
