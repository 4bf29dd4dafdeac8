"""Flash attention: launchers -> autograd Function -> public functions.

`flash_attention` runs the kernels of `kernel.py` for the prefix masks of tabattn-core
(no mask, context-target with fixed or per-dataset M, causal, AR-TabPFN training rows);
`context_target_attention` is the registry op of the same name.
"""

from __future__ import annotations

import logging
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
from tabattn_triton.ops.attention.dispatch import (
    backward_kernel,
    choose_kernel,
    cudnn_attention,
    requested_kernel,
)
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

_said = LogOnce()
_sm90_failed: set[tuple] = set()  # (dtype, head dim, constexpr flags) whose build failed


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
    """Grid sizes (batch, Lq, Lk), the keyword arguments every attention kernel takes (the
    mask's runtime form, the sequences, the LSE row length) and the mask's constexprs."""
    if varlen is None:
        batch, lq, lk, cu_q, cu_k = q.shape[0], q.shape[2], k.shape[2], None, None
    else:
        batch, lq, lk = varlen.cu_seqlens_q.numel() - 1, varlen.max_seqlen_q, varlen.max_seqlen_k
        cu_q, cu_k = varlen.cu_seqlens_q, varlen.cu_seqlens_k
    lens = None if pm.ctx_lens is None else pm.ctx_lens.to(device=q.device, dtype=torch.int64)
    shared = {
        "CTX_LENS": lens, "CU_Q": cu_q, "CU_K": cu_k, "GROUP": group, "Lq": lq, "Lk": lk,
        "ctx_len": pm.ctx_len, "causal_offset": pm.causal_offset, "ar_buffer": pm.ar_buffer,
        "ar_chunked": pm.ar_chunked, "lse_len": q.shape[2],
        "MASK": pm.kind, "HAS_CTX_LENS": lens is not None, "IS_VARLEN": varlen is not None,
    }  # fmt: skip
    return batch, lq, lk, shared


def _portable_args(q: torch.Tensor, group: int, lq: int, lk: int) -> dict:
    """The portable kernels' extra keyword arguments: head dim, autotune keys, dot flags."""
    return {
        "D": q.shape[3], "LQ_BUCKET": bucket(lq), "LK_BUCKET": bucket(lk),
        "GROUP_BUCKET": bucket(group), "BLOCK_D": head_block(q.shape[3]),
        "DOT_PRECISION": dot_precision(q.dtype),
    }  # fmt: skip


def _strides(name: str, t: torch.Tensor, rows: str) -> dict[str, int]:
    """stride_{name}b, _{name}h, _{name}{rows}, _{name}d of a [B, H, L, D] tensor."""
    return {
        f"stride_{name}{axis}": st
        for axis, st in zip(("b", "h", rows, "d"), t.stride(), strict=True)
    }


def _run_sm90(launch, key: tuple, fallback: bool) -> bool:
    """Run an sm90 launch and return True. With `fallback` (kernel "auto"), a launch that
    fails to build is logged once and remembered by `key`, and False asks for the portable
    kernel instead; forced, the error is raised."""
    if fallback and key in _sm90_failed:
        return False
    try:
        launch()
        return True
    except Exception as exc:
        if not fallback or isinstance(exc, InputError):
            raise
        _sm90_failed.add(key)
        why = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
        _said(key, logging.WARNING, "tabattn attention: sm90 %s failed (%s); the portable "
              "kernel runs", key[0], why)  # fmt: skip
        return False


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pm: PrefixMask,
    scale: float,
    group: int,
    varlen: Varlen | None = None,
    kernel: str = "portable",
    fallback: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward (kernel "sm90" or "portable", see dispatch.py); returns out
    [B, H, Lq, D] (q.dtype) and lse [B, H, Lq] fp32 (with varlen: q is [1, H, Tq, D] and lse
    [1, H, Tq]). fallback: an sm90 kernel that fails to build runs the portable one instead
    (logged once; kernels that failed are not built again)."""
    h, d = q.shape[1], q.shape[3]
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    batch, lq, lk, shared = _launch_args(q, k, group, pm, varlen)
    flags = (shared["MASK"], shared["HAS_CTX_LENS"], shared["IS_VARLEN"])
    if kernel == "sm90" and _run_sm90(
        lambda: _attention_fwd_sm90(q, k, v, out, lse, scale, batch, shared),
        ("forward", q.dtype, d, *flags),
        fallback,
    ):  # fmt: skip
        return out, lse
    attention_fwd_kernel[lambda meta: (batch * h * triton.cdiv(lq, meta["BLOCK_M"]),)](
        Q=q, K=k, V=v, O=out, LSE=lse, H=h, qk_scale=scale * LOG2E,
        **_strides("q", q, "m"), **_strides("k", k, "n"), **_strides("v", v, "n"),
        **_strides("o", out, "m"), **shared, **_portable_args(q, group, lq, lk),
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
    kernel: str = "portable",
    fallback: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward (kernel "sm90": kernel_sm90_bwd.py's, else the portable one;
    fallback as in `attention_fwd`); returns dq, dk, dv in the layouts of q, k, v."""
    b, h, rows, d = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if rows == 0 or k.shape[2] == 0 or b * h == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    if do.stride(-1) != 1:
        do = do.contiguous()
    batch, lq, lk, shared = _launch_args(q, k, group, pm, varlen)
    portable = _portable_args(q, group, lq, lk)
    delta = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
    pre_block = 64
    attention_bwd_preprocess_kernel[(b * h * triton.cdiv(rows, pre_block),)](
        O=out, DO=do, DELTA=delta, **_strides("o", out, "m"), **_strides("do", do, "m"),
        H=h, Lq=rows, D=d, BLOCK_M=pre_block, BLOCK_D=portable["BLOCK_D"],
    )  # fmt: skip
    flags = (shared["MASK"], shared["HAS_CTX_LENS"], shared["IS_VARLEN"])
    if kernel == "sm90" and _run_sm90(
        lambda: _attention_bwd_sm90(do, q, k, v, dq, dk, dv, lse, delta, scale, batch, shared),
        ("backward", q.dtype, d, *flags),
        fallback,
    ):  # fmt: skip
        return dq, dk, dv
    common = {
        "Q": q, "K": k, "V": v, "DO": do, "LSE": lse, "DELTA": delta, "H": h,
        "sm_scale": scale, "qk_scale": scale * LOG2E, **_strides("q", q, "m"),
        **_strides("k", k, "n"), **_strides("v", v, "n"), **_strides("do", do, "m"),
        **shared, **portable,
    }  # fmt: skip
    h_kv = k.shape[1]
    attention_bwd_dkdv_kernel[lambda meta: (batch * h_kv * triton.cdiv(lk, meta["BLOCK_N"]),)](
        DK=dk, DV=dv, **_strides("dk", dk, "n"), **_strides("dv", dv, "n"), **common
    )
    attention_bwd_dq_kernel[lambda meta: (batch * h * triton.cdiv(lq, meta["BLOCK_M"]),)](
        DQ=dq, **_strides("dq", dq, "m"), **common
    )
    return dq, dk, dv


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


def _attention_fwd_sm90(q, k, v, out, lse, scale, batch, shared):
    """Launch kernel_sm90's forward: the config measured best for this shape bucket (the
    first config while autotuning is off or a graph is being captured)."""
    from tabattn_triton.ops.attention.kernel_sm90 import (
        CONSUMER_REGS,
        ROWS_PER_CONSUMER,
        SM90_FWD_CONFIGS,
        attention_fwd_sm90_kernel,
    )

    h, d = q.shape[1], q.shape[3]
    group, lq, lk = shared["GROUP"], shared["Lq"], shared["Lk"]
    q_desc = _sm90_descriptor(q, ROWS_PER_CONSUMER)

    def launch(config):
        block_n, stages, consumers, pingpong = config
        grid = (batch * h * triton.cdiv(lq, consumers * ROWS_PER_CONSUMER),)
        attention_fwd_sm90_kernel[grid](
            q_desc=q_desc, k_desc=_sm90_descriptor(k, block_n),
            v_desc=_sm90_descriptor(v, block_n), O=out, LSE=lse,
            stride_ob=out.stride(0), stride_oh=out.stride(1), stride_om=out.stride(2),
            H=h, qk_scale=scale * LOG2E, **shared,
            BLOCK_N=block_n, STAGES=stages, CONSUMERS=consumers, PINGPONG=pingpong,
            CONSUMER_REGS=CONSUMER_REGS[consumers], num_warps=4,
        )  # fmt: skip

    configs = SM90_FWD_CONFIGS[d]
    key = (d, q.dtype, shared["MASK"], bucket(lq), bucket(lk), bucket(group), bucket(batch * h))
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


def _attention_bwd_sm90(do, q, k, v, dq, dk, dv, lse, delta, scale, batch, shared):
    """Launch kernel_sm90_bwd's backward into dq, dk, dv (dq through an fp32 buffer)."""
    from tabattn_triton.ops.attention.kernel_sm90_bwd import (
        CONSUMER_REGS,
        CONSUMERS,
        KEYS_PER_CONSUMER,
        SM90_BWD_BLOCK_M,
        attention_bwd_sm90_kernel,
    )

    block_m = SM90_BWD_BLOCK_M[q.shape[3]]
    if do.data_ptr() % 16 or any(st % 8 for st in do.stride()[:3]):
        do = do.contiguous()
    dq_acc = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
    dv_out = dv if dv.stride() == dk.stride() else torch.empty_like(dk)  # one stride set
    h_kv = k.shape[1]
    grid = (batch * h_kv * triton.cdiv(shared["Lk"], CONSUMERS * KEYS_PER_CONSUMER),)
    attention_bwd_sm90_kernel[grid](
        q_desc=_sm90_descriptor(q, block_m), k_desc=_sm90_descriptor(k, KEYS_PER_CONSUMER),
        v_desc=_sm90_descriptor(v, KEYS_PER_CONSUMER), do_desc=_sm90_descriptor(do, block_m),
        DK=dk, DV=dv_out, DQ_ACC=dq_acc, LSE=lse, DELTA=delta,
        stride_kb=dk.stride(0), stride_kh=dk.stride(1), stride_km=dk.stride(2),
        H_KV=h_kv, qk_scale=scale * LOG2E, scale=scale, **shared,
        CONSUMER_REGS=CONSUMER_REGS, num_warps=4,
    )  # fmt: skip
    dq.copy_(dq_acc.mul_(scale))
    if dv_out is not dv:
        dv.copy_(dv_out)


class FlashAttentionFunction(torch.autograd.Function):
    """kernels: (forward, backward) kernel names (dispatch.py). Saves q, k, v, out, lse;
    the LSE output is not differentiable."""

    @staticmethod
    def forward(
        ctx, q, k, v, pm: PrefixMask, scale: float, group: int, varlen: Varlen | None,
        kernels: tuple[str, str], fallback: bool,
    ):  # fmt: skip
        out, lse = attention_fwd(q, k, v, pm, scale, group, varlen, kernels[0], fallback)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.pm, ctx.scale, ctx.group, ctx.varlen = pm, scale, group, varlen
        ctx.kernel, ctx.fallback = kernels[1], fallback
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        args = (ctx.pm, ctx.scale, ctx.group, ctx.varlen, ctx.kernel, ctx.fallback)
        dq, dk, dv = attention_bwd(do, q, k, v, out, lse, *args)
        return dq, dk, dv, None, None, None, None, None, None


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
    -inf with out 0 for rows that see no key). kernel: "auto" (the fastest by measured
    rules: the Hopper forward of kernel_sm90.py, the portable kernels, or SDPA on cuDNN
    for calls it can express without LSE), or forced "sm90" (the Gluon forward and
    backward), "portable" or "cudnn"; None reads TABATTN_ATTENTION_KERNEL (default "auto").
    See dispatch.py.
    """
    args = check_attention_inputs(q, k, v, mask=mask, scale=scale)
    pm = prefix_mask_of(mask, q.shape[2], k.shape[2], q.shape[0])
    if pm is None:
        raise InputError(
            f"mask: expected None, FullMask, ContextTargetMask, CausalMask or ARTrainingRowMask, "
            f"got {type(mask).__name__} (decode, teacher-forcing and selection masks have their own ops)"
        )
    choice = choose_kernel(q, k, v, kernel, pm, lse=return_lse)
    if choice == "cudnn":
        return cudnn_attention(q, k, v, pm, args.scale)
    kernels, auto = (choice, backward_kernel(choice, kernel)), requested_kernel(kernel) == "auto"
    out, lse = FlashAttentionFunction.apply(
        q, k, v, pm, args.scale, args.group, None, kernels, auto
    )
    return (out, lse) if return_lse else out


def _kernels(q, k, v, pm: PrefixMask, varlen: bool) -> tuple[tuple[str, str], bool]:
    """(forward, backward) kernels and the fallback flag of a registry op (which returns the
    LSE, so never cuDNN): TABATTN_ATTENTION_KERNEL, else auto."""
    forward = choose_kernel(q, k, v, None, pm, lse=True, varlen=varlen)
    return (forward, backward_kernel(forward, None)), requested_kernel(None) == "auto"


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
    kernels = _kernels(q, k, v, pm, varlen=False)
    return FlashAttentionFunction.apply(q, k, v, pm, args.scale, args.group, None, *kernels)


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
    kernels = _kernels(q4, k4, v4, pm, varlen=True)
    out, lse = FlashAttentionFunction.apply(
        q4, k4, v4, pm, args.scale, args.group, varlen, *kernels
    )
    return out[0].transpose(0, 1), lse[0]
