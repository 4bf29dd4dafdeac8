"""FlexAttention as the attention suites time it: with its LSE, compiled once per shape.

`flex_lse()` is the uncompiled call (for steps that compile a larger function around it,
as shared_context's split-merge decode); `compiled_flex_lse()` is it under
`compile_static` (one graph per shape and mode, none falling back to the dense eager path).
Both are measured on CUDA only (`need_cuda`): the CPU compile path is slow and not a target.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from bench.harness import Unavailable, compile_static


@functools.cache
def flex_lse() -> Callable[..., Any]:
    """`(q, k, v, scale, block_mask=None, enable_gqa=False) -> (out, lse)` of
    `flex_attention` (through torch's AuxRequest where it has one)."""
    from torch.nn.attention import flex_attention as flex_module

    aux_request = getattr(flex_module, "AuxRequest", None)
    flex = flex_module.flex_attention

    def with_lse(q, k, v, scale, block_mask=None, enable_gqa=False):
        kw = {"block_mask": block_mask, "scale": scale, "enable_gqa": enable_gqa}
        if aux_request is not None:
            out, aux = flex(q, k, v, return_aux=aux_request(lse=True), **kw)
            return out, aux.lse
        return flex(q, k, v, return_lse=True, **kw)

    return with_lse


@functools.cache
def compiled_flex_lse() -> Callable[..., Any]:
    """`flex_lse()` under torch.compile(dynamic=False)."""
    return compile_static(flex_lse())


def need_cuda(q: torch.Tensor, what: str) -> None:
    """Raise Unavailable unless q is on CUDA."""
    if not q.is_cuda:
        raise Unavailable(f"{what}: measured on CUDA only")
