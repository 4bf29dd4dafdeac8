"""How the kernel backends multiply float32 operands on tensor cores, chosen per scope.

A float32 dot runs in one of three modes (Triton's input precisions of the same names; every
mode accumulates in fp32):

- "tf32x3": each operand split into a high and a low TF32 part, three products: about
  fp32's accuracy (relative error ~1e-6 per dot).
- "bf16x3": each operand as the sum of two bf16 numbers, three bf16 products: about 16
  mantissa bits (~1e-5), the class torch calls "high" float32 matmul precision, and on Hopper
  about 1.5x faster than "tf32x3" in attention and small-K GEMMs.
- "tf32": one TF32 product (10 mantissa bits, ~5e-4).

Outside any `fp32_dot_precision` scope the backends follow torch: "tf32" when
`torch.backends.cuda.matmul.allow_tf32` is set, else "tf32x3". Inside one, the scope's mode
applies to every kernel launched (and every CUDA graph captured) from this thread or task.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from tabattn_core.checks import InputError

__all__ = ["FP32_DOT_PRECISIONS", "fp32_dot_precision", "scoped_fp32_dot_precision"]

FP32_DOT_PRECISIONS = ("tf32x3", "bf16x3", "tf32")

_scoped: ContextVar[str | None] = ContextVar("tabattn_fp32_dot_precision", default=None)


def check_fp32_dot_precision(name: str, mode: str) -> str:
    """`mode` if it is one of FP32_DOT_PRECISIONS, else an InputError naming `name`."""
    if mode not in FP32_DOT_PRECISIONS:
        raise InputError(f"{name}: expected one of {FP32_DOT_PRECISIONS}, got {mode!r}")
    return mode


@contextmanager
def fp32_dot_precision(mode: str) -> Iterator[None]:
    """Run the kernels launched inside the `with` block with float32 dots in `mode` (one of
    FP32_DOT_PRECISIONS); scopes nest, and the previous mode returns on exit."""
    token = _scoped.set(check_fp32_dot_precision("mode", mode))
    try:
        yield
    finally:
        _scoped.reset(token)


def scoped_fp32_dot_precision() -> str | None:
    """The mode of the innermost `fp32_dot_precision` scope, or None outside every scope."""
    return _scoped.get()
