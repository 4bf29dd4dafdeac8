"""Test helpers used by every package: relative-error assertion with per-dtype bounds,
random inputs on awkward shapes, NaN-poisoned outputs."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

__all__ = [
    "AWKWARD_SHAPES",
    "AttentionShape",
    "REL_TOL",
    "assert_rel_close",
    "interpret_triton_without_cuda",
    "nan_poisoned_empty",
    "poison_nan",
    "random_qkv",
    "rel_error",
    "skip_gpu_tests_without_cuda",
]

# Bound on ||out - ref|| / ||ref|| for a result computed at this precision against an
# fp64 reference ("tf32" names fp32 inputs whose dots run on TF32 tensor cores).
REL_TOL: dict[torch.dtype | str, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    "tf32": 5e-4,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in fp64; infinities must agree exactly.

    Positions where `expected` is +-inf must hold the same value in `actual` and are left
    out of the norm; NaN anywhere in `actual` gives inf.
    """
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64).to(a.device)
    if a.shape != e.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    if torch.isnan(a).any():
        return float("inf")
    inf = torch.isinf(e)
    if not torch.equal(a[inf], e[inf]) or torch.isinf(a[~inf]).any():
        return float("inf")
    a, e = a[~inf], e[~inf]
    denom = torch.linalg.vector_norm(e).item()
    diff = torch.linalg.vector_norm(a - e).item()
    if denom == 0.0:
        return diff
    return diff / denom


def assert_rel_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    dtype: torch.dtype | str | None = None,
    tol: float | None = None,
    name: str = "output",
) -> None:
    """Assert relative error under `tol` (default: REL_TOL of `dtype`, else actual.dtype)."""
    bound = tol if tol is not None else REL_TOL[dtype if dtype is not None else actual.dtype]
    err = rel_error(actual, expected)
    if not err <= bound:
        raise AssertionError(f"{name}: relative error {err:.3e} > bound {bound:.1e}")


@dataclass(frozen=True)
class AttentionShape:
    """One attention problem size: q [B, H, Lq, D], k/v [B, H_kv, Lk, D]."""

    B: int
    H: int
    H_kv: int
    Lq: int
    Lk: int
    D: int

    def __str__(self) -> str:
        return f"B{self.B}-H{self.H}:{self.H_kv}-Lq{self.Lq}-Lk{self.Lk}-D{self.D}"


# Small shapes that break kernels with power-of-two or tile-multiple assumptions.
AWKWARD_SHAPES: tuple[AttentionShape, ...] = (
    AttentionShape(1, 1, 1, 1, 1, 16),
    AttentionShape(1, 2, 2, 1, 37, 48),
    AttentionShape(2, 4, 2, 63, 63, 80),
    AttentionShape(3, 4, 1, 17, 111, 96),
    AttentionShape(2, 8, 2, 130, 65, 64),
    AttentionShape(1, 2, 1, 5, 0, 32),
)


def random_qkv(
    shape: AttentionShape,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    requires_grad: bool = False,
    layout: str = "bhld",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh standard-normal q [B, H, Lq, D], k, v [B, H_kv, Lk, D].

    layout="blhd" returns the same logical tensors as transposed views of [B, L, H, D]
    storage (non-contiguous strides), as models that keep heads inner produce.
    """

    def make(heads: int, length: int) -> torch.Tensor:
        if layout == "blhd":
            t = torch.randn(
                shape.B, length, heads, shape.D, generator=generator, dtype=torch.float32
            )
            t = t.to(device=device, dtype=dtype).transpose(1, 2)
        elif layout == "bhld":
            t = torch.randn(
                shape.B, heads, length, shape.D, generator=generator, dtype=torch.float32
            )
            t = t.to(device=device, dtype=dtype)
        else:
            raise ValueError(f"layout: expected 'bhld' or 'blhd', got {layout!r}")
        return t.requires_grad_(requires_grad)

    return make(shape.H, shape.Lq), make(shape.H_kv, shape.Lk), make(shape.H_kv, shape.Lk)


def poison_nan(t: torch.Tensor) -> torch.Tensor:
    """Fill a floating tensor with NaN in place (for outputs a kernel must overwrite)."""
    if t.is_floating_point():
        t.fill_(float("nan"))
    return t


@contextlib.contextmanager
def nan_poisoned_empty() -> Iterator[None]:
    """Within the block, torch.empty / torch.empty_like / Tensor.new_empty return NaN-filled
    floating tensors, so any output element a kernel forgets to write fails the test."""
    real_empty, real_empty_like, real_new_empty = (
        torch.empty,
        torch.empty_like,
        torch.Tensor.new_empty,
    )

    def empty(*args, **kwargs):
        return poison_nan(real_empty(*args, **kwargs))

    def empty_like(*args, **kwargs):
        return poison_nan(real_empty_like(*args, **kwargs))

    def new_empty(self, *args, **kwargs):
        return poison_nan(real_new_empty(self, *args, **kwargs))

    torch.empty, torch.empty_like, torch.Tensor.new_empty = empty, empty_like, new_empty
    try:
        yield
    finally:
        torch.empty, torch.empty_like, torch.Tensor.new_empty = (
            real_empty,
            real_empty_like,
            real_new_empty,
        )


def interpret_triton_without_cuda() -> None:
    """For a kernel package's conftest, before anything imports its kernels: without a CUDA
    device, Triton kernels run under the interpreter (`TRITON_INTERPRET=1`, which Triton
    reads as each kernel is defined), so plain `pytest` runs the CPU tier there. A value
    already set wins."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def skip_gpu_tests_without_cuda(items: list) -> None:
    """For a conftest's `pytest_collection_modifyitems`: mark tests carrying `gpu` as skipped
    when no CUDA device is present (they are deselected with -m "not gpu" in CI anyway)."""
    if torch.cuda.is_available():
        return
    import pytest

    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
