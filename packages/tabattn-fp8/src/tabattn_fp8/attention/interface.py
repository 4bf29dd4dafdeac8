"""FP8 attention: quantisation + forward launcher -> autograd Function -> public functions.

`fp8_attention` quantises q, k (smoothed) and v (`tabattn_fp8.quantize`) and runs the FP8
forward of `kernel.py` for tabattn-triton's prefix masks; the backward is tabattn-triton's
bf16/fp16 flash backward on the saved unquantised q, k, v, the FP8 output and the true LSE.
The forward is two launchers, `fp8_quantize_kv` (k and v) and `fp8_attention_launch` (q and
the kernel), so that the shared-context ops can quantise a context once for many calls.
`fp8_context_target_attention` is the registry op `context_target_attention` of the `fp8`
backend.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton

from tabattn_core.checks import InputError
from tabattn_core.contracts import context_target_args
from tabattn_core.masks import ContextTargetMask, MaskSpec
from tabattn_fp8.attention.kernel import K_BLOCK, fp8_attention_fwd_kernel
from tabattn_fp8.quantize.interface import Fp8Tensor, quantize_fp8_launch
from tabattn_fp8.quantize.kernel import MEAN_NONE, MEAN_ROW_DOT, MEAN_SUBTRACT
from tabattn_fp8.reference import apply_rotation, key_mean, value_scale
from tabattn_triton.building_blocks import (
    LOG2E,
    PrefixMask,
    attention_bwd,
    bucket,
    check_attention_inputs,
    check_kernel_tensors,
    dot_precision,
    head_block,
    interpreting,
    prefix_mask_of,
)

__all__ = ["FP8AttentionFunction", "fp8_attention", "fp8_context_target_attention"]

Q_BLOCK = 128  # rows per Q scale
# P·V in FP8 only where it keeps the accuracy bound (cosine >= 0.999 against fp64 on
# Gaussian inputs): it does not (0.9985 with P and V in E4M3, 0.9992 with P·V in bf16;
# `python -m bench.studies.fp8_emulated_accuracy` and bench/results/fp8.json), so P·V runs in bf16 unless asked.
P_FP8_DEFAULT = False


def check_fp8_device(device: torch.device) -> None:
    """The FP8 kernels run on Hopper (sm90), or on CPU under the Triton interpreter; anything
    else raises `require_sm90`'s error naming the device."""
    from tabattn_fp8 import require_sm90

    if device.type == "cpu" and interpreting():
        return
    require_sm90(device)


@dataclass(frozen=True)
class QuantizedKV:
    """K and V quantised for `fp8_attention_launch`; nothing in it refers to the unquantised
    tensors. k: K [B, H_kv, Lk, D] in E4M3, one scale per block of K_BLOCK rows, rotated
    first when `k.rotated`, minus `mean` when smoothed. mean: fp32 [B, H_kv, D] (K
    smoothing) or None. v: V transposed for the FP8 P·V dot, one scale per (batch, kv head)
    (p_fp8), or None (P·V on the unquantised v that the launch is given)."""

    k: Fp8Tensor
    mean: torch.Tensor | None
    v: Fp8Tensor | None


def fp8_quantize_kv(
    k: torch.Tensor, v: torch.Tensor, *, smooth_k: bool, p_fp8: bool, rotate: bool
) -> QuantizedKV:
    """Rotate (an fp32 copy of k), smooth and quantise k [B, H_kv, Lk, D], and with p_fp8
    v [B, H_kv, Lk, D]: the q-independent half of the forward."""
    if rotate:
        k = apply_rotation(k)
    mean = key_mean(k) if smooth_k else None
    k8, _ = quantize_fp8_launch(
        k, block=K_BLOCK, mean=mean, mean_mode=MEAN_SUBTRACT if smooth_k else MEAN_NONE
    )
    v8 = None
    if p_fp8:
        v8, _ = quantize_fp8_launch(v, block=K_BLOCK, scale=value_scale(v), transpose=True)
    return QuantizedKV(replace(k8, rotated=rotate), mean, v8)


def fp8_attention_launch(
    q: torch.Tensor,
    v: torch.Tensor,
    kv: QuantizedKV,
    pm: PrefixMask,
    scale: float,
    group: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate (an fp32 copy of q, when kv.k is rotated) and quantise q [B, H, Lq, D], then
    launch the forward over kv; v [B, H_kv, Lk, D] is read only when kv.v is None. Returns
    out [B, H, Lq, D] (q.dtype) and the true lse [B, H, Lq] fp32."""
    b, h, lq, d = q.shape
    k8 = kv.k
    lk = k8.data.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty((b, h, lq), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    if k8.rotated:
        q = apply_rotation(q)
    smooth_k = kv.mean is not None
    q8, row_dot = quantize_fp8_launch(
        q, block=Q_BLOCK, mean=kv.mean, mean_mode=MEAN_ROW_DOT if smooth_k else MEAN_NONE,
        group=group,
    )  # fmt: skip
    v_arg, v_scale = (v, None) if kv.v is None else (kv.v.data, kv.v.scales)
    lens = None if pm.ctx_lens is None else pm.ctx_lens.to(device=q.device, dtype=torch.int64)
    grid = lambda meta: (b * h * triton.cdiv(lq, meta["BLOCK_M"]),)
    fp8_attention_fwd_kernel[grid](
        q8.data, q8.scales, k8.data, k8.scales, v_arg, v_scale, row_dot, out, lse, lens,
        *q8.data.stride(), *k8.data.stride(), *v_arg.stride(), *out.stride(),
        h, group, lq, lk, d, scale, scale * LOG2E,
        pm.ctx_len, pm.causal_offset, pm.ar_buffer, pm.ar_chunked,
        q8.scales.shape[2], k8.scales.shape[2], bucket(lq), bucket(lk),
        MASK=pm.kind, HAS_CTX_LENS=lens is not None, P_FP8=kv.v is not None, SMOOTH_K=smooth_k,
        ROUND_FIRST=interpreting(),
        Q_BLOCK=Q_BLOCK, KB=K_BLOCK, BLOCK_D=max(32, head_block(d)),
        DOT_PRECISION=dot_precision(q.dtype),
    )  # fmt: skip
    return out, lse


def fp8_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pm: PrefixMask,
    scale: float,
    group: int,
    smooth_k: bool,
    p_fp8: bool,
    rotate: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise k and v (`fp8_quantize_kv`), then q and launch (`fp8_attention_launch`);
    returns out [B, H, Lq, D] (q.dtype) and the true lse [B, H, Lq] fp32."""
    kv = fp8_quantize_kv(k, v, smooth_k=smooth_k, p_fp8=p_fp8, rotate=rotate)
    return fp8_attention_launch(q, v, kv, pm, scale, group)


class FP8AttentionFunction(torch.autograd.Function):
    """Forward in FP8; backward by tabattn-triton's flash backward (`attention_bwd`) on the
    saved unquantised q, k, v, the FP8 forward's out and its (true) LSE. The LSE output is
    not differentiable."""

    @staticmethod
    def forward(
        ctx,
        q,
        k,
        v,
        pm: PrefixMask,
        scale: float,
        group: int,
        smooth_k: bool,
        p_fp8: bool,
        rotate: bool,
    ):
        out, lse = fp8_attention_fwd(q, k, v, pm, scale, group, smooth_k, p_fp8, rotate)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.pm, ctx.scale, ctx.group = pm, scale, group
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_bwd(do, q, k, v, out, lse, ctx.pm, ctx.scale, ctx.group)
        return dq, dk, dv, None, None, None, None, None, None


def fp8_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: MaskSpec | None = None,
    scale: float | None = None,
    smooth_k: bool = True,
    p_fp8: bool = P_FP8_DEFAULT,
    rotate: bool = True,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """FP8 (E4M3) attention forward on Hopper, with tabattn-triton's backward.

    q: [B, H, Lq, D]; k, v: [B, H_kv, Lk, D] with H % H_kv == 0 (GQA); any strides with a
    unit stride on D; D in 16..256; bf16, fp16 or fp32 (fp32 only for the interpreter's
    tests). mask: as `tabattn_triton.building_blocks.flash_attention` takes it: None,
    `FullMask`, `ContextTargetMask` (fixed or per-dataset M), `CausalMask` (bottom-right or
    top-left) or `ARTrainingRowMask`:

    ```
    context-target (M=3)   causal (Lq=2, Lk=4)
    ■ ■ ■ · ·              ■ ■ ■ ·
    ■ ■ ■ · ·              ■ ■ ■ ■
    ■ ■ ■ · ·
    ```
    q and k are quantised with one fp32 scale per (batch, head, block of 128 rows); with
    smooth_k (default) k minus its mean over the Lk keys (all Lk rows, padding included, so
    they must be finite), which leaves out unchanged and is corrected for in the LSE.
    rotate (default): q and k are first multiplied along D by one fixed orthogonal matrix
    (`tabattn_fp8.reference.rotation_matrix`: random signs times a Hadamard matrix for
    power-of-two D, a seeded QR factor otherwise; FlashAttention-3's incoherent
    processing), which leaves q kᵀ unchanged but spreads outlier channels over all of D,
    so the per-block scales lose far less (one fp32 [L, D] x [D, D] GEMM per tensor).
    p_fp8=True: P·V as an FP8 dot (P scaled by 448, v with one scale per (batch, kv head));
    p_fp8=False (default, `P_FP8_DEFAULT`): P·V in the input precision with the unquantised
    v (slower, more accurate: the only mode that keeps cosine >= 0.999 on Gaussian inputs). Relative L2 error against fp64 (FP8-emulated, Lq 1024, Lk 2048): Gaussian
    inputs ~5.4% with p_fp8 (cosine 0.9985), ~4% without (0.9992), rotation or not; two
    q/k channels 100x larger: 13-23% rotated, 33-34% not (bf16 kernel: under 1% on both);
    use the bf16 kernel where that matters.

    Returns out [B, H, Lq, D] (q.dtype), and with return_lse also lse [B, H, Lq] (fp32,
    natural log, the true LSE; -inf with out 0 for rows that see no key). Differentiable
    in q, k, v (tabattn-triton's backward with this forward's out and LSE). Runs on sm90
    only (CPU under TRITON_INTERPRET=1 for tests); elsewhere raises `require_sm90`'s error.
    """
    args = check_attention_inputs(q, k, v, mask=mask, scale=scale)
    check_fp8_device(q.device)
    pm = prefix_mask_of(mask, q.shape[2], k.shape[2], q.shape[0])
    if pm is None:
        raise InputError(
            f"mask: expected None, FullMask, ContextTargetMask, CausalMask or ARTrainingRowMask, "
            f"got {type(mask).__name__}"
        )
    out, lse = FP8AttentionFunction.apply(
        q, k, v, pm, args.scale, args.group, smooth_k, p_fp8, rotate
    )
    return (out, lse) if return_lse else out


def fp8_context_target_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    context_lens: int | torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 kernel for `tabattn_core.reference.context_target_attention` (its contract and
    docstring): `fp8_attention` with smooth_k and rotate, P·V in bf16."""
    args = context_target_args(q, k, v, context_lens=context_lens, scale=scale)
    check_kernel_tensors(q=q, k=k, v=v)
    lens = args.ctx_len if args.ctx_lens is None else args.ctx_lens
    mask = ContextTargetMask(q.shape[2], k.shape[2], lens)
    return fp8_attention(q, k, v, mask=mask, scale=scale, return_lse=True)
