"""The Gluon (Hopper) API across Triton versions, in one place.

The GPU machine runs Triton 3.6; CPU CI runs the newer Triton of uv.lock. Between them TMA
copies were renamed (`async_copy_global_to_shared` -> `async_load`, the old names later
removed), `thread_barrier` became `barrier`, and `warp_specialize`'s register budgets
became optional. Kernels import these
names from here only. Module-level aliases of builtins are legal globals inside
`@gluon.jit`.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

__all__ = [
    "TensorDescriptor",
    "barrier",
    "fence_async_shared",
    "gl",
    "gluon",
    "mbarrier",
    "tma_load",
    "tma_store",
    "warpgroup_mma",
    "warpgroup_mma_wait",
]

# A barrier over the warps of the calling partition (3.6 names it thread_barrier).
barrier = getattr(gl, "barrier", None) or gl.thread_barrier
tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
