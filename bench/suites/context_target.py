"""Suite `context_target`: every query row (M context + N target) over the M context keys.

q [B, H, M+N, D], k/v [B, H, M, D], bf16, H=8, D in {64, 128}. Since k/v hold exactly the M
context rows, no key is masked: plain (unmasked) SDPA and FlexAttention compute the same
function as the context-target op, so they are fair baselines.

Correctness: every provider is compared with an fp64 recomputation in plain torch of one
head (batch 0, head 0) from the same bf16 q, k, v and upstream gradient: out, LSE and dq on
a seeded random subset of up to 256 query rows (always with the first and last row), and,
in fwd+bwd mode, dk and dv of that head on all keys (accumulated over query chunks).

The sm90 forward's configs at these shapes: the study `bench.studies.sm90_fwd_configs`.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import torch

from bench import harness
from bench.harness import Check, Inputs, Provider, RunConfig, Suite, Unavailable, by_name
from bench.suites.flex import compiled_flex_lse, need_cuda

H = 8
HEAD_DIMS = (64, 128)
SIZES = ((16, 1024, 512), (8, 4096, 1024), (4, 10000, 1000), (2, 20000, 2000), (1, 50000, 5000))
SMOKE_H = 2
SMOKE_HEAD_DIMS = (16, 32)
SMOKE_SIZES = ((1, 40, 24), (2, 33, 7))
REFERENCE_MAX_SCORES = 2e9  # skip the dense reference provider above B*H*(M+N)*M scores
CHECK_CHUNK_ELEMENTS = 2**26  # fp64 score elements per query chunk of the gradient check


def cases(cfg: RunConfig) -> list[dict[str, Any]]:
    heads, dims, sizes = (
        (SMOKE_H, SMOKE_HEAD_DIMS, SMOKE_SIZES) if cfg.smoke else (H, HEAD_DIMS, SIZES)
    )
    return [{"B": b, "H": heads, "M": m, "N": n, "D": d} for d in dims for (b, m, n) in sizes]


def make_inputs(case: dict[str, Any], cfg: RunConfig, seed: int) -> Inputs:
    b, h, m, n, d = case["B"], case["H"], case["M"], case["N"], case["D"]
    randn = harness.normal(cfg, seed, harness.smoke_dtype(cfg))
    q, k, v = randn(b, h, m + n, d), randn(b, h, m, d), randn(b, h, m, d)
    grad_out = randn(b, h, m + n, d)
    leaves = {name: t.requires_grad_(True) for name, t in (("q", q), ("k", k), ("v", v))}
    return Inputs(leaves=leaves, grad_out=grad_out, extra={"scale": d**-0.5})


def forward_flops(case: dict[str, Any]) -> float:
    # 4 * B * H * Lq * Lk_visible * D with Lq = M + N and M visible keys per query.
    return 4.0 * case["B"] * case["H"] * (case["M"] + case["N"]) * case["M"] * case["D"]


def shape_label(case: dict[str, Any]) -> str:
    return f"B{case['B']} H{case['H']} M{case['M']} N{case['N']} D{case['D']}"


def x_label(case: dict[str, Any]) -> str:
    return f"B{case['B']}\nM{case['M']}\nN{case['N']}"


def baseline(mode: str, cfg: RunConfig) -> str:
    if cfg.device.type == "cpu":
        return "reference"
    return "sdpa-cudnn" if mode == "fwd" else "sdpa-flash"


# ---------------------------------------------------------------------------------------
# correctness reference: one head in fp64


def reference(case: dict[str, Any], inputs: Inputs, mode: str, cfg: RunConfig) -> dict[str, Check]:
    scale = inputs.extra["scale"]
    q, k, v = (inputs.leaves[n].detach()[0, 0].to(torch.float64) for n in ("q", "k", "v"))
    do = inputs.grad_out[0, 0].to(torch.float64)
    rows = harness.check_rows(q.shape[0], cfg.seed).to(q.device)

    s = (q[rows] @ k.T) * scale
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[:, None])
    out = p @ v

    def at_rows(t: torch.Tensor) -> torch.Tensor:
        return t[0, 0].index_select(0, rows.to(t.device))

    def head(t: torch.Tensor) -> torch.Tensor:
        return t[0, 0]

    checks = {"out": Check(out, at_rows), "lse": Check(lse, at_rows)}
    if mode == "fwd":
        return checks
    delta = (do[rows] * out).sum(-1)
    ds = p * ((do[rows] @ v.T) - delta[:, None])
    checks["dq"] = Check((ds @ k) * scale, at_rows)
    del s, p, ds
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    chunk = max(1, CHECK_CHUNK_ELEMENTS // max(1, k.shape[0]))
    for start in range(0, q.shape[0], chunk):
        qi, doi = q[start : start + chunk], do[start : start + chunk]
        si = (qi @ k.T) * scale
        pi = torch.exp(si - torch.logsumexp(si, dim=-1, keepdim=True))
        del si
        deltai = (doi * (pi @ v)).sum(-1, keepdim=True)
        dv += pi.T @ doi
        dk += ((pi * ((doi @ v.T) - deltai)).T @ qi) * scale
        del pi
    checks["dk"] = Check(dk, head)
    checks["dv"] = Check(dv, head)
    return checks


# ---------------------------------------------------------------------------------------
# providers (also the fp8 suite's bf16 ones)


def qkv(inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return inputs.leaves["q"], inputs.leaves["k"], inputs.leaves["v"]


@functools.cache
def _tabattn_entry(device: str) -> tuple[str, Any]:
    """The Triton kernel: tabattn_triton.ops.attention.flash_attention, else the registry's
    "triton" backend. Imported on first use; raises Unavailable with both import errors."""
    try:
        module = importlib.import_module("tabattn_triton.ops.attention")
        return "flash_attention", module.flash_attention
    except Exception as exc:
        first = f"tabattn_triton.ops.attention.flash_attention: {type(exc).__name__}: {exc}"
    try:
        from tabattn_core.registry import registry

        backend = registry.choose("triton", device=device, op="context_target_attention")
        return "registry", backend.backend.ops["context_target_attention"]
    except Exception as exc:
        second = f"registry backend 'triton': {type(exc).__name__}: {exc}"
    raise Unavailable(f"{first}; {second}")


def _as_pair(result: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(result, tuple):
        return result[0], (result[1] if len(result) > 1 else None)
    return result, None


def make_tabattn(kernel: str):
    """tabattn's flash_attention with its kernel "auto" (what users get: our kernels or
    cuDNN by dispatch.py's measured rules), "sm90" (the Gluon forward forced) or "portable"
    (the plain Triton kernels forced)."""

    def make(case: dict[str, Any], inputs: Inputs):
        q, k, v = qkv(inputs)
        harness.need_gpu_or_interpreter(q, "tabattn (Triton)")
        kind, entry = _tabattn_entry(q.device.type)
        m, scale = case["M"], inputs.extra["scale"]
        if kind != "flash_attention":
            if kernel != "auto":
                raise Unavailable(f"kernel={kernel!r} needs tabattn_triton's flash_attention")
            return lambda: _as_pair(entry(q, k, v, context_lens=m, scale=scale))
        from tabattn_core.masks import ContextTargetMask

        if kernel == "sm90":
            from tabattn_triton.ops.attention.dispatch import sm90_unsupported

            why = sm90_unsupported(q, k, v)
            if why is not None:
                raise Unavailable(f"tabattn-sm90 {why}")
        mask = ContextTargetMask(q.shape[-2], k.shape[-2], m)
        # "auto" is called as a training step calls it, without the LSE, so that it may
        # route to cuDNN; the forced kernels also return the LSE to be checked.
        lse = kernel != "auto"
        return lambda: _as_pair(
            entry(q, k, v, mask=mask, scale=scale, return_lse=lse, kernel=kernel)
        )

    return make


def make_sdpa(backend_name: str):
    """SDPA under `sdpa_kernel(SDPBackend.<backend_name>)`, no mask, no LSE."""

    def make(case: dict[str, Any], inputs: Inputs):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.functional import scaled_dot_product_attention

        q, k, v = qkv(inputs)
        if not q.is_cuda:
            raise Unavailable(f"SDPA {backend_name} needs a CUDA GPU")
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise Unavailable(f"SDPA {backend_name} needs fp16/bf16, got {q.dtype}")
        backend = getattr(SDPBackend, backend_name)
        scale = inputs.extra["scale"]

        def fn():
            with sdpa_kernel(backend):
                return scaled_dot_product_attention(q, k, v, scale=scale), None

        return fn

    return make


def _make_flex(case: dict[str, Any], inputs: Inputs):
    q, k, v = qkv(inputs)
    need_cuda(q, "flex")
    compiled, scale = compiled_flex_lse(), inputs.extra["scale"]
    return lambda: compiled(q, k, v, scale)


def _make_reference(case: dict[str, Any], inputs: Inputs):
    from tabattn_core import reference as core_reference

    q, k, v = qkv(inputs)
    scores = case["B"] * case["H"] * (case["M"] + case["N"]) * case["M"]
    if scores > REFERENCE_MAX_SCORES:
        raise Unavailable(
            f"reference skipped: B*H*(M+N)*M = {scores:.3g} > {REFERENCE_MAX_SCORES:.0g} "
            f"(dense fp32 scores alone would take {scores * 4 / 2**30:.1f} GiB)"
        )
    m, scale = case["M"], inputs.extra["scale"]
    return lambda: core_reference.context_target_attention(q, k, v, context_lens=m, scale=scale)


SUITE = harness.register_suite(
    Suite.from_module(
        __name__,
        name="context_target",
        description=(
            "context-target attention: q [B, H, M+N, D] over k/v [B, H, M, D] (all M keys "
            "visible), H=8, D in {64, 128}, bf16"
        ),
        providers=by_name(
            Provider(
                "tabattn",
                make_tabattn("auto"),
                "tabattn_triton.ops.attention.flash_attention with ContextTargetMask, "
                "kernel='auto' (fallback: registry backend 'triton')",
            ),
            Provider(
                "tabattn-sm90",
                make_tabattn("sm90"),
                "flash_attention, kernel='sm90' (the Gluon forward forced; Hopper only)",
            ),
            Provider(
                "tabattn-plain",
                make_tabattn("portable"),
                "flash_attention, kernel='portable' (the plain Triton kernel forced)",
            ),
            Provider("sdpa-cudnn", make_sdpa("CUDNN_ATTENTION"), "SDPA, cuDNN backend, no mask"),
            Provider("sdpa-flash", make_sdpa("FLASH_ATTENTION"), "SDPA, flash backend, no mask"),
            Provider("flex", _make_flex, "torch.compile(flex_attention), no block mask, with LSE"),
            Provider(
                "reference",
                _make_reference,
                "tabattn_core.reference.context_target_attention (dense, fp32 softmax)",
            ),
        ),
        panel_keys=("D",),
        reference_method=(
            "fp64 recomputation in plain torch of batch 0, head 0 from the same q, k, v and "
            f"upstream gradient: out, lse and dq on up to {harness.CHECK_ROWS} seeded random query "
            "rows (first and last row included); dk and dv of that head on all keys "
            "(fwd+bwd). Error = ||x - ref|| / ||ref|| (tabattn_core.testing.rel_error), "
            "bound REL_TOL[dtype]."
        ),
    )
)
