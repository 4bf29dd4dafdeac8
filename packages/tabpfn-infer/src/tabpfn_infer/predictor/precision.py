"""Precision scoping: a predictor method's kernels multiply float32 operands in the
predictor's `fp32_precision`."""

from __future__ import annotations

import functools
from collections.abc import Callable

from tabattn_core.precision import fp32_dot_precision

__all__ = ["in_precision_scope"]


def in_precision_scope(method: Callable) -> Callable:
    """Run a predictor method with its kernels' float32 dots in `self.fp32_precision`."""

    @functools.wraps(method)
    def scoped(self, *args, **kwargs):
        with fp32_dot_precision(self.fp32_precision):
            return method(self, *args, **kwargs)

    return scoped
