"""FlexAttention as the attention suites time it: with its LSE, compiled once per shape.

`flex_lse()` is the uncompiled call (for steps that compile a larger function around it,
as shared_context's split-merge decode); `compiled_flex_lse()` is it under
`compile_static` (one graph per shape and mode, none falling back to the dense eager path).
Both are measured on CUDA only (`need_cuda`): the CPU compile path is slow and not a target.
The block masks of the masked suites, built once per case outside the timing:
`selection_block_mask` and `teacher_forcing_block_mask`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from bench.harness import Unavailable, compile_static

FLEX_BLOCK = 128  # the BlockMask's tile (query rows and keys) of the selection


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


def selection_block_mask(bi: torch.Tensor, case: dict[str, Any]):
    """BlockMask of the selection `bi` [Lq, H_kv, n_sel] (blocks of case["bs"] keys, GQA
    group case["G"]): a kv block of FLEX_BLOCK keys is active for a query block where any
    of its rows selected a key block inside it; the mask_mod is exact per key."""
    from torch.nn.attention.flex_attention import BlockMask

    lq, lk, g, bs = case["Lq"], case["Lk"], case["G"], case["bs"]
    h_kv = bi.shape[1]
    n_qb, n_kb, n_blocks = -(-lq // FLEX_BLOCK), -(-lk // FLEX_BLOCK), -(-lk // bs)
    rows = torch.arange(lq, device=bi.device)[:, None, None].expand_as(bi)
    heads = torch.arange(h_kv, device=bi.device)[None, :, None].expand_as(bi)
    used = bi >= 0
    active = torch.zeros(h_kv, n_qb, n_kb, dtype=torch.bool, device=bi.device)
    active[heads[used], rows[used] // FLEX_BLOCK, bi[used] * bs // FLEX_BLOCK] = True
    selected = torch.zeros(h_kv, lq, n_blocks, dtype=torch.bool, device=bi.device)
    selected[heads[used], rows[used], bi[used]] = True
    active, selected = active.repeat_interleave(g, 0), selected.repeat_interleave(g, 0)
    num = active.sum(-1, dtype=torch.int32)[None]
    indices = torch.argsort((~active).to(torch.int8), dim=-1, stable=True).to(torch.int32)[None]

    def mask_mod(b, h, q_idx, kv_idx):
        return selected[h, q_idx, kv_idx // bs]

    return BlockMask.from_kv_blocks(num, indices, BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod)


def teacher_forcing_block_mask(nt: int, nc: int, device: torch.device):
    """BlockMask of `TeacherForcingMask(nt, nc)` (one context length, every batch index
    reads it): queries [buf | tgt] (2 nt rows) over keys [ctx | buf] (nc + nt)."""
    from torch.nn.attention.flex_attention import create_block_mask

    from tabattn_core.masks import TeacherForcingMask

    spec = TeacherForcingMask(nt, nc)  # one fixed context length: context_lens has 1 entry
    # The spec's tensors on the device, so its mask_mod moves nothing inside the kernel.
    spec.context_lens = spec.context_lens.to(device)
    spec.buffer_visible = spec.buffer_visible.to(device)
    spec_mod = spec.mask_mod()

    def mask_mod(b, h, q_idx, kv_idx):
        # The spec indexes its (single) context length by b; every path has the same one.
        return spec_mod(torch.zeros_like(b), h, q_idx, kv_idx)

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=2 * nt, KV_LEN=nc + nt, device=device)
