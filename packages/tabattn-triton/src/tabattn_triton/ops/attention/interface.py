"""Flash attention: launchers -> autograd Function -> public functions.

`flash_attention` runs the kernels of `kernel.py` for the prefix masks of tabattn-core
(no mask, context-target with fixed or per-dataset M, causal, AR-TabPFN training rows);
`context_target_attention` is the registry op of the same name.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import cache

import torch
import triton

from tabattn_core.checks import InputError
from tabattn_core.contracts import (
    AttentionArgs,
    attention_args,
    context_target_args,
    varlen_args,
)
from tabattn_core.logs import LogOnce
from tabattn_core.masks import ARTrainingRowMask, CausalMask, ContextTargetMask, FullMask, MaskSpec
from tabattn_triton.ops.attention.kernel import (
    attention_bwd_dkdv_kernel,
    attention_bwd_dq_kernel,
    attention_bwd_preprocess_kernel,
    attention_fwd_kernel,
)
from tabattn_triton.ops.common import (
    LOG2E,
    MASK_AR_ROWS,
    MASK_CAUSAL,
    MASK_CONTEXT,
    MASK_NONE,
    autotune_enabled,
    bucket,
    capturing,
    dot_precision,
    head_block,
)
from tabattn_triton.ops.kernel_checks import check_kernel_tensors

__all__ = ["PrefixMask", "context_target_attention", "flash_attention", "prefix_mask_of"]

ENV_KERNEL = "TABATTN_ATTENTION_KERNEL"
KERNELS = ("auto", "sm90", "portable")
_said = LogOnce()


@dataclass(frozen=True)
class PrefixMask:
    """Kernel parameters of a prefix mask (row q sees keys [0, end(q)); see common.py)."""

    kind: int = MASK_NONE
    ctx_len: int = 0
    ctx_lens: torch.Tensor | None = None  # int64 [B], per-dataset context lengths
    causal_offset: int = 0
    ar_buffer: int = 0
    ar_chunked: int = 0


def prefix_mask_of(mask: MaskSpec | None, q_len: int, kv_len: int, batch: int) -> PrefixMask | None:
    """The kernel form of a mask spec, or None when the spec is not a prefix mask."""
    if mask is None or isinstance(mask, FullMask):
        return PrefixMask()
    if (mask.q_len, mask.kv_len) != (q_len, kv_len):
        raise InputError(
            f"mask: expected a spec for Lq={q_len}, Lk={kv_len}, got Lq={mask.q_len}, Lk={mask.kv_len}"
        )
    if isinstance(mask, ContextTargetMask):
        lens = mask.context_lens
        if lens.numel() == 1:
            return PrefixMask(MASK_CONTEXT, ctx_len=int(lens[0]))
        if lens.numel() != batch:
            raise InputError(
                f"mask: expected context lengths for {batch} datasets, got {lens.numel()}"
            )
        return PrefixMask(MASK_CONTEXT, ctx_lens=lens)
    if isinstance(mask, CausalMask):
        return PrefixMask(MASK_CAUSAL, causal_offset=mask.offset)
    if isinstance(mask, ARTrainingRowMask):
        return PrefixMask(
            MASK_AR_ROWS,
            ctx_len=mask.context_len,
            ar_buffer=mask.buffer_len,
            ar_chunked=mask.attending_chunks * mask.buffer_len,
        )
    return None


def check_attention_inputs(q, k, v, *, mask=None, scale=None) -> AttentionArgs:
    """The contract of `attention` (`tabattn_core.contracts.attention_args`), then the
    kernels' checks (dtypes, device, unit stride on D)."""
    args = attention_args(q, k, v, mask=mask, scale=scale)
    check_kernel_tensors(q=q, k=k, v=v)
    return args


@dataclass(frozen=True)
class Varlen:
    """Packed sequences: int64 offsets [B+1] of queries and keys, and the longest of each."""

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int


def _launch_args(
    q: torch.Tensor, k: torch.Tensor, group: int, pm: PrefixMask, varlen: Varlen | None
):
    """Grid sizes, the kernels' shared runtime arguments and their constexpr flags."""
    if varlen is None:
        batch, lq, lk, cu_q, cu_k = q.shape[0], q.shape[2], k.shape[2], None, None
    else:
        batch, lq, lk = varlen.cu_seqlens_q.numel() - 1, varlen.max_seqlen_q, varlen.max_seqlen_k
        cu_q, cu_k = varlen.cu_seqlens_q, varlen.cu_seqlens_k
    lens = None if pm.ctx_lens is None else pm.ctx_lens.to(device=q.device, dtype=torch.int64)
    pointers = (lens, cu_q, cu_k)
    runtime = (pm.ctx_len, pm.causal_offset, pm.ar_buffer, pm.ar_chunked, q.shape[2])
    tune = (bucket(lq), bucket(lk), bucket(group))
    flags = {
        "MASK": pm.kind,
        "HAS_CTX_LENS": lens is not None,
        "IS_VARLEN": varlen is not None,
        "BLOCK_D": head_block(q.shape[3]),
        "DOT_PRECISION": dot_precision(q.dtype),
    }
    return batch, lq, lk, pointers, runtime, tune, flags


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pm: PrefixMask,
    scale: float,
    group: int,
    varlen: Varlen | None = None,
    kernel: str = "portable",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward (kernel "sm90" or "portable", see `forward_kernel`); returns out
    [B, H, Lq, D] (q.dtype) and lse [B, H, Lq] fp32 (with varlen: q is [1, H, Tq, D] and lse
    [1, H, Tq])."""
    h, d = q.shape[1], q.shape[3]
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    batch, lq, lk, pointers, runtime, tune, flags = _launch_args(q, k, group, pm, varlen)
    if kernel == "sm90":
        _attention_fwd_sm90(q, k, v, out, lse, pm, scale, group, batch, lq, lk, pointers, flags)
        return out, lse
    grid = lambda meta: (batch * h * triton.cdiv(lq, meta["BLOCK_M"]),)
    attention_fwd_kernel[grid](
        q, k, v, out, lse, *pointers,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        h, group, lq, lk, d, scale * LOG2E, *runtime, *tune,
        STORE_LSE=True, **flags,
    )  # fmt: skip
    return out, lse


def attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    pm: PrefixMask,
    scale: float,
    group: int,
    varlen: Varlen | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward; returns dq, dk, dv in the layouts of q, k, v."""
    b, h, rows, d = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if rows == 0 or k.shape[2] == 0 or b * h == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    if do.stride(-1) != 1:
        do = do.contiguous()
    batch, lq, lk, pointers, runtime, tune, flags = _launch_args(q, k, group, pm, varlen)
    delta = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
    pre_block = 64
    attention_bwd_preprocess_kernel[(b * h * triton.cdiv(rows, pre_block),)](
        out, do, delta, *out.stride(), *do.stride(), h, rows, d,
        BLOCK_M=pre_block, BLOCK_D=flags["BLOCK_D"],
    )  # fmt: skip
    dims = (h, group, lq, lk, d, scale, scale * LOG2E)
    h_kv = k.shape[1]
    attention_bwd_dkdv_kernel[lambda meta: (batch * h_kv * triton.cdiv(lk, meta["BLOCK_N"]),)](
        q, k, v, do, dk, dv, lse, delta, *pointers,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        *dims, *runtime, *tune, **flags,
    )  # fmt: skip
    attention_bwd_dq_kernel[lambda meta: (batch * h * triton.cdiv(lq, meta["BLOCK_M"]),)](
        q, k, v, do, dq, lse, delta, *pointers,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        *dims, *runtime, *tune, **flags,
    )  # fmt: skip
    return dq, dk, dv


@cache
def _sm90_device(index: int) -> bool:
    """A Hopper GPU and a Triton with Gluon's Hopper API."""
    if torch.cuda.get_device_capability(index) != (9, 0):
        return False
    try:
        from tabattn_triton.ops.attention import kernel_sm90  # noqa: F401
    except ImportError as exc:
        why = f"the sm90 kernel is unavailable ({exc}); the portable kernel runs"
        _said(why, logging.WARNING, "tabattn attention: %s", why)
        return False
    return True


def sm90_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the sm90 forward cannot run these inputs, or None when it can."""
    if q.device.type != "cuda" or not _sm90_device(q.device.index or 0):
        return f"needs a Hopper (sm90) GPU, got {q.device}"
    from tabattn_triton.ops.attention.kernel_sm90 import SM90_HEAD_DIMS

    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"needs fp16 or bf16, got {q.dtype}"
    if q.shape[3] not in SM90_HEAD_DIMS:
        return f"needs head dim in {SM90_HEAD_DIMS}, got {q.shape[3]}"
    if k.shape[2] == 0:
        return "needs at least one key"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.data_ptr() % 16 or any(st % 8 for st in t.stride()[:3]):
            return f"needs 16-byte aligned {name} (base and strides), got strides {t.stride()}"
    return None


# The masks whose sm90 forward has passed the GPU tests against the fp64 reference (H200):
# `auto` takes the sm90 kernel only for these; the others run it when forced.
SM90_AUTO_MASKS = (MASK_CONTEXT,)


def forward_kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel: str | None,
    pm: PrefixMask | None = None,
    varlen: bool = False,
) -> str:
    """The forward kernel for a call: `kernel` ("auto", "sm90", "portable"), else the
    TABATTN_ATTENTION_KERNEL environment variable, else "auto": sm90 where it can run and
    the mask is one of SM90_AUTO_MASKS with one context length (not varlen)."""
    choice = kernel or os.environ.get(ENV_KERNEL, "auto")
    if choice not in KERNELS:
        source = "kernel" if kernel else ENV_KERNEL
        raise InputError(f"{source}: expected one of {KERNELS}, got {choice!r}")
    if choice == "portable":
        return "portable"
    if choice == "sm90":
        why = sm90_unsupported(q, k, v)
        if why is not None:
            raise InputError(f"kernel: 'sm90' {why}")
        return "sm90"
    verified = pm is not None and pm.kind in SM90_AUTO_MASKS and pm.ctx_lens is None
    return "sm90" if verified and not varlen and sm90_unsupported(q, k, v) is None else "portable"


@cache
def _sm90_layout(dtype: torch.dtype, rows: int, head_dim: int):
    from tabattn_triton.ops.gluon_compat import gl

    gl_dtype = gl.bfloat16 if dtype == torch.bfloat16 else gl.float16
    return gl.NVMMASharedLayout.get_default_for([1, 1, rows, head_dim], gl_dtype)


def _sm90_descriptor(t: torch.Tensor, rows: int):
    from tabattn_triton.ops.gluon_compat import TensorDescriptor

    block = [1, 1, rows, t.shape[3]]
    layout = _sm90_layout(t.dtype, rows, t.shape[3])
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block, layout)


_sm90_configs: dict[tuple, tuple] = {}


def _attention_fwd_sm90(q, k, v, out, lse, pm, scale, group, batch, lq, lk, pointers, flags):
    """Launch kernel_sm90's forward: the config measured best for this shape bucket (the
    first config while autotuning is off or a graph is being captured)."""
    from tabattn_triton.ops.attention.kernel_sm90 import (
        CONSUMER_REGS,
        ROWS_PER_CONSUMER,
        SM90_FWD_CONFIGS,
        attention_fwd_sm90_kernel,
    )

    h, d = q.shape[1], q.shape[3]
    q_desc = _sm90_descriptor(q, ROWS_PER_CONSUMER)

    def launch(config):
        block_n, stages, consumers, pingpong = config
        kv_desc = (_sm90_descriptor(k, block_n), _sm90_descriptor(v, block_n))
        grid = (batch * h * triton.cdiv(lq, consumers * ROWS_PER_CONSUMER),)
        attention_fwd_sm90_kernel[grid](
            q_desc, *kv_desc, out, lse, *pointers,
            out.stride(0), out.stride(1), out.stride(2),
            h, group, lq, lk, scale * LOG2E,
            pm.ctx_len, pm.causal_offset, pm.ar_buffer, pm.ar_chunked, q.shape[2],
            MASK=flags["MASK"], HAS_CTX_LENS=flags["HAS_CTX_LENS"], IS_VARLEN=flags["IS_VARLEN"],
            BLOCK_N=block_n, STAGES=stages, CONSUMERS=consumers, PINGPONG=pingpong,
            CONSUMER_REGS=CONSUMER_REGS[consumers], num_warps=4,
        )  # fmt: skip

    configs = SM90_FWD_CONFIGS[d]
    key = (d, q.dtype, flags["MASK"], bucket(lq), bucket(lk), bucket(group), bucket(batch * h))
    config = _sm90_configs.get(key)
    if config is None:
        if len(configs) == 1 or not autotune_enabled() or capturing():
            config = configs[0]
        else:
            timings = [
                triton.testing.do_bench(lambda c=c: launch(c), warmup=5, rep=20) for c in configs
            ]
            config = configs[timings.index(min(timings))]
            _sm90_configs[key] = config
    launch(config)


class FlashAttentionFunction(torch.autograd.Function):
    """Saves q, k, v, out, lse; the LSE output is not differentiable."""

    @staticmethod
    def forward(
        ctx, q, k, v, pm: PrefixMask, scale: float, group: int, varlen: Varlen | None, kernel: str
    ):
        out, lse = attention_fwd(q, k, v, pm, scale, group, varlen, kernel)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.pm, ctx.scale, ctx.group, ctx.varlen = pm, scale, group, varlen
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_bwd(do, q, k, v, out, lse, ctx.pm, ctx.scale, ctx.group, ctx.varlen)
        return dq, dk, dv, None, None, None, None, None


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: MaskSpec | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    kernel: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Flash attention forward and backward with a prefix mask.

    q: [B, H, Lq, D]; k, v: [B, H_kv, Lk, D] with H % H_kv == 0 (GQA); any strides with a
    unit stride on D; D in 16..256; fp16, bf16 or fp32 (fp32 dots follow
    torch.backends.cuda.matmul.allow_tf32). mask: None, `FullMask`, `ContextTargetMask`
    (fixed or per-dataset M), `CausalMask` (bottom-right), or `ARTrainingRowMask`:

    ```
    context-target (M=3)   causal (Lq=2, Lk=4)   AR rows (Nc=1, Nb=2, Nt=2, A=1)
    ■ ■ ■ · ·              ■ ■ ■ ·               ■ · · · ·
    ■ ■ ■ · ·              ■ ■ ■ ■               ■ ■ · · ·
    ■ ■ ■ · ·                                    ■ ■ ■ · ·
                                                 ■ ■ · · ·
                                                 ■ ■ ■ · ·
    ```
    Returns out [B, H, Lq, D], and with return_lse also lse [B, H, Lq] (fp32, natural log;
    -inf with out 0 for rows that see no key). kernel: the forward kernel, "auto" (the
    Hopper kernel of kernel_sm90.py where it can run, else the portable one), "sm90" or
    "portable"; None reads TABATTN_ATTENTION_KERNEL (default "auto").
    """
    args = check_attention_inputs(q, k, v, mask=mask, scale=scale)
    pm = prefix_mask_of(mask, q.shape[2], k.shape[2], q.shape[0])
    if pm is None:
        raise InputError(
            f"mask: expected None, FullMask, ContextTargetMask, CausalMask or ARTrainingRowMask, "
            f"got {type(mask).__name__} (decode, teacher-forcing and selection masks have their own ops)"
        )
    out, lse = FlashAttentionFunction.apply(
        q, k, v, pm, args.scale, args.group, None, forward_kernel(q, k, v, kernel, pm)
    )
    return (out, lse) if return_lse else out


def context_target_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    context_lens: int | torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel for `tabattn_core.reference.context_target_attention` (its contract and
    docstring), forward and backward: any strides with a unit stride on D; fp16, bf16 or
    fp32 on CUDA (CPU under TRITON_INTERPRET=1)."""
    args = context_target_args(q, k, v, context_lens=context_lens, scale=scale)
    check_kernel_tensors(q=q, k=k, v=v)
    pm = PrefixMask(MASK_CONTEXT, ctx_len=args.ctx_len, ctx_lens=args.ctx_lens)
    return FlashAttentionFunction.apply(
        q, k, v, pm, args.scale, args.group, None, forward_kernel(q, k, v, None, pm)
    )


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel for `tabattn_core.reference.varlen_attention` (its contract and docstring),
    forward and backward: any strides with a unit stride on D; fp16, bf16 or fp32 on CUDA
    (CPU under TRITON_INTERPRET=1). Returns out [Tq, H, D], lse [H, Tq] (fp32)."""
    args = varlen_args(
        q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, causal=causal, scale=scale
    )
    check_kernel_tensors(q=q, k=k, v=v)
    cu_q, cu_k = args.cu_seqlens_q, args.cu_seqlens_k
    longest_q, longest_k = (int(cu.diff().max()) if cu.numel() > 1 else 0 for cu in (cu_q, cu_k))
    varlen = Varlen(cu_q.to(q.device), cu_k.to(q.device), longest_q, longest_k)
    pm = PrefixMask(MASK_CAUSAL) if args.causal else PrefixMask()
    q4, k4, v4 = (t.permute(1, 0, 2).unsqueeze(0) for t in (q, k, v))
    out, lse = FlashAttentionFunction.apply(
        q4, k4, v4, pm, args.scale, args.group, varlen,
        forward_kernel(q4, k4, v4, None, pm, varlen=True),
    )  # fmt: skip
    return out[0].transpose(0, 1), lse[0]
