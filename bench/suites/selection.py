"""Suite `selection`: selection (NSA-style block-sparse) attention over a long context.

One sequence: Lq = 4096 query rows (target rows over a large table context, the TabPFN use;
cheaper than NSA's self-attention over every context row, and the per-row cost is the same)
over Lk in {8k, 32k, 64k, 128k} context keys; each row and kv head selects 16 blocks of 64
keys (`tabattn_core.selection.select_blocks`, top-k by q . mean-pooled block keys, computed
once per case outside the timing); H = 16 query heads, GQA group 1, 4, 16 (H_kv = 16/group);
D 64 and 128; bf16; fwd and fwd+bwd.

Each shape runs twice, as two cases:
- pattern "selection": the selection function. Providers: ours (sparse kernels), Flex with
  the equivalent BlockMask (kv blocks of 128 active where any row of the 128-row query block
  selected one of their keys, exact per-key mask_mod), the dense masked reference (small
  sizes only). Baseline: Flex.
- pattern "dense": full attention over the whole context, what the selection replaces (a
  different function, checked against its own reference). Providers: our dense kernel
  (`flash_attention`, no mask) and SDPA cuDNN (K/V repeated per query head inside the timed
  call under GQA). The selection rows of a shape carry `speedup_vs_dense`: dense ms / ms.

Correctness: fp64 recomputation in plain torch of the query heads of kv head 0: out, LSE
and dq on up to 256 seeded random rows (first and last included); dk, dv of kv head 0 on
all keys (fwd+bwd), accumulated over row chunks.

Studies of the selection: `bench.studies.selection_predictor_accuracy` (the predictor's
top-k context against dense attention), `bench.studies.selection_crossover` (where dense
attention is faster: the path rules), `bench.studies.selection_floor` (what gathering the
selected K/V alone costs).
"""

from __future__ import annotations

from typing import Any

import torch

from bench import harness
from bench.harness import Check, Inputs, Provider, RunConfig, Suite, Unavailable, by_name
from bench.suites.flex import FLEX_BLOCK, compiled_flex_lse, need_cuda, selection_block_mask

# the shapes: H query heads, Lq rows, Lk keys, GQA groups, head dims, n_sel blocks of bs keys
GRID = {"H": 16, "Lq": 4096, "contexts": (8192, 32768, 65536, 131072), "groups": (1, 4, 16),
        "dims": (64, 128), "bs": 64, "sel": 16}  # fmt: skip
# smoke: one shape (GQA 2, a short last block) under the interpreter
SMOKE = {"H": 2, "Lq": 8, "contexts": (72,), "groups": (2,), "dims": (16,), "bs": 16, "sel": 2}
REFERENCE_MAX_SCORES = 2**28  # the dense masked reference provider: H * Lq * Lk at most
CHECK_CHUNK_ELEMENTS = 2**26  # fp64 score elements per row chunk of the check
PATTERNS = ("dense", "selection")
_DENSE_MS: dict[tuple, float] = {}  # (shape without pattern, mode, provider) -> ms


def cases(cfg: RunConfig) -> list[dict[str, Any]]:
    grid = SMOKE if cfg.smoke else GRID
    return [
        {"pattern": p, "H": grid["H"], "G": g, "Lq": grid["Lq"], "Lk": lk, "D": d,
         "bs": grid["bs"], "n_sel": grid["sel"]}
        for d in grid["dims"]
        for g in grid["groups"]
        for lk in grid["contexts"]
        for p in PATTERNS  # dense first: the selection rows look its timings up
    ]  # fmt: skip


def make_inputs(case: dict[str, Any], cfg: RunConfig, seed: int) -> Inputs:
    from tabattn_core.selection import select_blocks

    h, g, lq, lk, d = case["H"], case["G"], case["Lq"], case["Lk"], case["D"]
    randn = harness.normal(cfg, seed, harness.smoke_dtype(cfg))
    q, k, v, grad_out = randn(lq, h, d), randn(lk, h // g, d), randn(lk, h // g, d), randn(lq, h, d)
    cu_q = torch.tensor([0, lq], device=cfg.device)
    cu_k = torch.tensor([0, lk], device=cfg.device)
    extra = {"scale": d**-0.5, "cu_q": cu_q, "cu_k": cu_k}
    if case["pattern"] == "selection":
        extra["block_indices"] = select_blocks(
            q, k, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, block_size=case["bs"], top_k=case["n_sel"]
        )
    leaves = {name: t.requires_grad_(True) for name, t in (("q", q), ("k", k), ("v", v))}
    return Inputs(leaves=leaves, grad_out=grad_out, extra=extra)


def _visible_keys(case: dict[str, Any]) -> int:
    return case["n_sel"] * case["bs"] if case["pattern"] == "selection" else case["Lk"]


def forward_flops(case: dict[str, Any]) -> float:
    return 4.0 * case["H"] * case["Lq"] * _visible_keys(case) * case["D"]


def shape_label(case: dict[str, Any]) -> str:
    return (
        f"{case['pattern']} H{case['H']}/G{case['G']} Lq{case['Lq']} Lk{case['Lk']} "
        f"D{case['D']}"
        + (f" sel{case['n_sel']}x{case['bs']}" if case["pattern"] == "selection" else "")
    )


def x_label(case: dict[str, Any]) -> str:
    keys = f"{case['Lk'] // 1024}k" if case["Lk"] >= 1024 else str(case["Lk"])
    return f"Lk{keys}\nG{case['G']}"


def baseline(mode: str, cfg: RunConfig) -> str:
    return "reference" if cfg.device.type == "cpu" else "flex"


# ---------------------------------------------------------------------------------------
# correctness reference: the query heads of kv head 0 in fp64


def _visible(case: dict[str, Any], inputs: Inputs, rows: torch.Tensor) -> torch.Tensor | None:
    """[rows, Lk] bool of the keys each row sees under kv head 0 (None: all)."""
    if case["pattern"] == "dense":
        return None
    bi = inputs.extra["block_indices"][rows, 0]  # [rows, n_sel]
    blocks = torch.arange(case["Lk"], device=bi.device) // case["bs"]
    return (blocks[None, None, :] == bi[:, :, None]).any(1)


def reference(case: dict[str, Any], inputs: Inputs, mode: str, cfg: RunConfig) -> dict[str, Check]:
    g, scale = case["G"], inputs.extra["scale"]
    q = inputs.leaves["q"].detach()[:, :g].to(torch.float64)  # [Lq, G, D]
    k, v = (inputs.leaves[n].detach()[:, 0].to(torch.float64) for n in ("k", "v"))
    do = inputs.grad_out[:, :g].to(torch.float64)

    def attend(rows: torch.Tensor):
        s = torch.einsum("rgd,kd->rgk", q[rows], k) * scale
        vis = _visible(case, inputs, rows)
        if vis is not None:
            s = s.masked_fill(~vis[:, None, :], float("-inf"))
        lse = torch.logsumexp(s, -1)
        p = torch.exp(s - lse[..., None])
        out = p @ v
        ds = p * (do[rows] @ v.T - (do[rows] * out).sum(-1, keepdim=True))
        return out, lse, p, ds

    rows = harness.check_rows(case["Lq"], cfg.seed).to(q.device)
    out, lse, _, ds = attend(rows)
    checks = {
        "out": Check(out, lambda t: t[rows.to(t.device), :g]),
        "lse": Check(lse.T, lambda t: t[:g, rows.to(t.device)]),
    }
    if mode == "fwd":
        return checks
    checks["dq"] = Check((ds @ k) * scale, lambda t: t[rows.to(t.device), :g])
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    chunk = max(1, CHECK_CHUNK_ELEMENTS // (g * case["Lk"]))
    for start in range(0, case["Lq"], chunk):
        part = torch.arange(start, min(start + chunk, case["Lq"]), device=q.device)
        _, _, p, ds = attend(part)
        dv += torch.einsum("rgk,rgd->kd", p, do[part])
        dk += torch.einsum("rgk,rgd->kd", ds, q[part]) * scale
    checks["dk"] = Check(dk, lambda t: t[:, 0])
    checks["dv"] = Check(dv, lambda t: t[:, 0])
    return checks


# ---------------------------------------------------------------------------------------
# providers


def _qkv(inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return inputs.leaves["q"], inputs.leaves["k"], inputs.leaves["v"]


def _only(case: dict[str, Any], pattern: str, what: str) -> None:
    if case["pattern"] != pattern:
        raise Unavailable(f"{what} runs the {pattern} cases")


def heads_first(t: torch.Tensor) -> torch.Tensor:
    """[L, H, D] -> a [1, H, L, D] view."""
    return t.permute(1, 0, 2).unsqueeze(0)


def _make_sparse(case: dict[str, Any], inputs: Inputs):
    _only(case, "selection", "tabattn-sparse")
    q, k, v = _qkv(inputs)
    harness.need_gpu_or_interpreter(q, "tabattn (Triton)")
    from tabattn_triton.ops.selection import selection_attention

    kw = {
        "cu_seqlens_q": inputs.extra["cu_q"],
        "cu_seqlens_k": inputs.extra["cu_k"],
        "block_indices": inputs.extra["block_indices"],
        "block_size": case["bs"],
        "scale": inputs.extra["scale"],
    }
    return lambda: selection_attention(q, k, v, **kw)


def _make_reference(case: dict[str, Any], inputs: Inputs):
    from tabattn_core import reference as core_reference

    q, k, v = _qkv(inputs)
    if case["H"] * case["Lq"] * case["Lk"] > REFERENCE_MAX_SCORES:
        raise Unavailable(f"reference skipped: H*Lq*Lk > {REFERENCE_MAX_SCORES:.3g} dense scores")
    kw = {"cu_seqlens_q": inputs.extra["cu_q"], "cu_seqlens_k": inputs.extra["cu_k"]}
    scale = inputs.extra["scale"]
    if case["pattern"] == "dense":
        return lambda: core_reference.varlen_attention(q, k, v, scale=scale, **kw)
    bi, bs = inputs.extra["block_indices"], case["bs"]
    return lambda: core_reference.selection_attention(
        q, k, v, block_indices=bi, block_size=bs, scale=scale, **kw
    )


def _make_dense(case: dict[str, Any], inputs: Inputs):
    _only(case, "dense", "tabattn-dense")
    q, k, v = _qkv(inputs)
    harness.need_gpu_or_interpreter(q, "tabattn (Triton)")
    from tabattn_triton.ops.attention import flash_attention

    scale = inputs.extra["scale"]

    def fn():
        out, lse = flash_attention(
            heads_first(q), heads_first(k), heads_first(v), scale=scale, return_lse=True
        )
        return out[0].transpose(0, 1), lse[0]

    return fn


def _make_sdpa_cudnn(case: dict[str, Any], inputs: Inputs):
    _only(case, "dense", "sdpa-cudnn")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    q, k, v = _qkv(inputs)
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        raise Unavailable("SDPA cuDNN needs a CUDA GPU and fp16/bf16")
    g, scale = case["G"], inputs.extra["scale"]

    def fn():
        kh, vh = heads_first(k), heads_first(v)
        if g > 1:
            kh, vh = kh.repeat_interleave(g, 1), vh.repeat_interleave(g, 1)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            out = scaled_dot_product_attention(heads_first(q), kh, vh, scale=scale)
        return out[0].transpose(0, 1), None

    return fn


def _make_flex(case: dict[str, Any], inputs: Inputs):
    _only(case, "selection", "flex")
    q, k, v = _qkv(inputs)
    need_cuda(q, "flex")
    block_mask = selection_block_mask(inputs.extra["block_indices"], case)
    compiled, scale, gqa = compiled_flex_lse(), inputs.extra["scale"], case["G"] > 1

    def fn():
        out, lse = compiled(heads_first(q), heads_first(k), heads_first(v), scale, block_mask, gqa)
        return out[0].transpose(0, 1), lse[0]

    return fn


def annotate(case, mode, rows, calibration, cfg) -> None:
    """Dense rows are remembered; selection rows get dense ms / their ms per dense provider."""
    key = (tuple(case[n] for n in ("H", "G", "Lq", "Lk", "D")), mode)
    for row in rows:
        if row["ms"] is None:
            continue
        if case["pattern"] == "dense":
            _DENSE_MS[(*key, row["provider"])] = row["ms"]
        else:
            row["speedup_vs_dense"] = {
                p: ms / row["ms"] for (*k, p), ms in _DENSE_MS.items() if tuple(k) == key
            }


def _vs_dense(title: str, provider: str) -> dict[str, str]:
    return {"title": title, "key": f"speedup_vs_dense.{provider}", "format": ".3g", "suffix": "x"}


SUITE = harness.register_suite(
    Suite.from_module(
        __name__,
        name="selection",
        description=(
            f"selection attention: Lq={GRID['Lq']} rows over Lk in {list(GRID['contexts'])} "
            f"keys, {GRID['sel']} selected blocks of {GRID['bs']} per row and kv head, "
            f"H={GRID['H']}, GQA {list(GRID['groups'])}, D in {list(GRID['dims'])}, bf16; "
            "dense full-context attention alongside"
        ),
        providers=by_name(
            Provider(
                "tabattn-sparse", _make_sparse, "tabattn_triton.ops.selection.selection_attention"
            ),
            Provider(
                "flex",
                _make_flex,
                f"torch.compile(flex_attention) with LSE, BlockMask.from_kv_blocks at "
                f"{FLEX_BLOCK}x{FLEX_BLOCK} (union of the rows' blocks) + per-key mask_mod",
            ),
            Provider(
                "tabattn-dense",
                _make_dense,
                "tabattn_triton.ops.attention.flash_attention over the full context (dense)",
            ),
            Provider(
                "sdpa-cudnn",
                _make_sdpa_cudnn,
                "SDPA cuDNN over the full context (dense; K/V repeated per head under GQA)",
            ),
            Provider(
                "reference",
                _make_reference,
                "tabattn_core.reference selection_attention / varlen_attention (dense masked)",
            ),
        ),
        panel_keys=("pattern", "D"),
        reference_method=(
            "fp64 recomputation in plain torch of the query heads of kv head 0: out, lse and "
            "dq on up to 256 seeded random rows (first and last included); dk and dv of kv "
            "head 0 on all keys (fwd+bwd). Error = ||x - ref|| / ||ref||, bound REL_TOL[dtype]."
        ),
        header_extra={
            "table_columns": [
                _vs_dense("vs dense (ours)", "tabattn-dense"),
                _vs_dense("vs dense (cuDNN)", "sdpa-cudnn"),
            ],
        },
    )
)
