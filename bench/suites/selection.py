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

Accuracy of the predictor's top-k context (`ARTabPFNPredictor(context_top_k=k)`) against
dense attention: `python -m bench.suites.selection predictor-accuracy [--out DIR]`
(`predictor_accuracy` below) writes selection_predictor_accuracy.json (the selection
forced: the predictor's dense fallback off).

Where dense attention is faster than the selection (the path rules):
`python -m bench.suites.selection crossover [--out DIR] [--part op|predictor] [--smoke]`
(`crossover` below) writes selection_crossover.json: per cell both paths checked against
each other first, then timed (do_bench medians); per series the crossover; and the fitted
rules: at the op (DENSE_MAX_SCORES, SPARSE_MAX_FRACTION: "rules" -> "op"; a measurement
only, the op always runs the kernels) and the constants of `tabpfn_infer.predictor`
(DENSE_CONTEXT_BELOW, DENSE_CONTEXT_FRACTION: "rules" -> "predictor").

What gathering the selected K/V alone costs (the bound on the forward's speedup over dense):
`python -m bench.suites.selection floor [--out DIR] [--smoke]` (`bench.suites.selection_floor`)
writes selection_floor.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.harness import (
    Check,
    Inputs,
    Provider,
    RunConfig,
    Suite,
    Unavailable,
    collect_header,
    need_gpu_or_interpreter,
    register_suite,
    sync_device,
)
from bench.suites.context_target import _check_rows
from bench.suites.shared_context import _compiled_flex

H = 16
LQ = 4096
CONTEXTS = (8192, 32768, 65536, 131072)
GROUPS = (1, 4, 16)
HEAD_DIMS = (64, 128)
BLOCK_SIZE = 64
N_SEL = 16
FLEX_BLOCK = 128
# smoke: one shape (GQA 2, a short last block) under the interpreter
SMOKE = {"H": 2, "Lq": 8, "contexts": (72,), "groups": (2,), "dims": (16,), "bs": 16, "sel": 2}
REFERENCE_MAX_SCORES = 2**28  # the dense masked reference provider: H * Lq * Lk at most
CHECK_CHUNK_ELEMENTS = 2**26  # fp64 score elements per row chunk of the check
PATTERNS = ("dense", "selection")
_DENSE_MS: dict[tuple, float] = {}  # (shape without pattern, mode, provider) -> ms


def _cases(cfg: RunConfig) -> list[dict[str, Any]]:
    if cfg.smoke:
        h, lq, contexts, groups, dims = (
            SMOKE[n] for n in ("H", "Lq", "contexts", "groups", "dims")
        )
        bs, n_sel = SMOKE["bs"], SMOKE["sel"]
    else:
        h, lq, contexts, groups, dims, bs, n_sel = (
            H,
            LQ,
            CONTEXTS,
            GROUPS,
            HEAD_DIMS,
            BLOCK_SIZE,
            N_SEL,
        )
    return [
        {"pattern": p, "H": h, "G": g, "Lq": lq, "Lk": lk, "D": d, "bs": bs, "n_sel": n_sel}
        for d in dims
        for g in groups
        for lk in contexts
        for p in PATTERNS  # dense first: the selection rows look its timings up
    ]


def _dtype(cfg: RunConfig) -> torch.dtype:
    return torch.float32 if cfg.smoke and cfg.device.type == "cpu" else torch.bfloat16


def _make_inputs(case: dict[str, Any], cfg: RunConfig, seed: int) -> Inputs:
    from tabattn_core.selection import select_blocks

    h, g, lq, lk, d = case["H"], case["G"], case["Lq"], case["Lk"], case["D"]
    gen = torch.Generator(device=cfg.device).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        t = torch.randn(*shape, generator=gen, device=cfg.device, dtype=torch.float32)
        return t.to(_dtype(cfg))

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


def _forward_flops(case: dict[str, Any]) -> float:
    return 4.0 * case["H"] * case["Lq"] * _visible_keys(case) * case["D"]


def _shape(case: dict[str, Any]) -> tuple:
    return tuple(case[n] for n in ("H", "G", "Lq", "Lk", "D"))


def _shape_label(case: dict[str, Any]) -> str:
    return (
        f"{case['pattern']} H{case['H']}/G{case['G']} Lq{case['Lq']} Lk{case['Lk']} "
        f"D{case['D']}"
        + (f" sel{case['n_sel']}x{case['bs']}" if case["pattern"] == "selection" else "")
    )


def _x_label(case: dict[str, Any]) -> str:
    return (
        f"Lk{case['Lk'] // 1024}k\nG{case['G']}"
        if case["Lk"] >= 1024
        else f"Lk{case['Lk']}\nG{case['G']}"
    )


def _baseline(mode: str, cfg: RunConfig) -> str:
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


def _reference(case: dict[str, Any], inputs: Inputs, mode: str, cfg: RunConfig) -> dict[str, Check]:
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

    rows = _check_rows(case["Lq"], cfg.seed).to(q.device)
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


def _heads_first(t: torch.Tensor) -> torch.Tensor:
    """[L, H, D] -> a [1, H, L, D] view."""
    return t.permute(1, 0, 2).unsqueeze(0)


def _make_sparse(case: dict[str, Any], inputs: Inputs):
    _only(case, "selection", "tabattn-sparse")
    q, k, v = _qkv(inputs)
    need_gpu_or_interpreter(q, "tabattn (Triton)")
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
    from tabattn_core import reference

    q, k, v = _qkv(inputs)
    if case["H"] * case["Lq"] * case["Lk"] > REFERENCE_MAX_SCORES:
        raise Unavailable(f"reference skipped: H*Lq*Lk > {REFERENCE_MAX_SCORES:.3g} dense scores")
    kw = {"cu_seqlens_q": inputs.extra["cu_q"], "cu_seqlens_k": inputs.extra["cu_k"]}
    scale = inputs.extra["scale"]
    if case["pattern"] == "dense":
        return lambda: reference.varlen_attention(q, k, v, scale=scale, **kw)
    bi, bs = inputs.extra["block_indices"], case["bs"]
    return lambda: reference.selection_attention(
        q, k, v, block_indices=bi, block_size=bs, scale=scale, **kw
    )


def _make_dense(case: dict[str, Any], inputs: Inputs):
    _only(case, "dense", "tabattn-dense")
    q, k, v = _qkv(inputs)
    need_gpu_or_interpreter(q, "tabattn (Triton)")
    from tabattn_triton.ops.attention import flash_attention

    scale = inputs.extra["scale"]

    def fn():
        out, lse = flash_attention(
            _heads_first(q), _heads_first(k), _heads_first(v), scale=scale, return_lse=True
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
        kh, vh = _heads_first(k), _heads_first(v)
        if g > 1:
            kh, vh = kh.repeat_interleave(g, 1), vh.repeat_interleave(g, 1)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            out = scaled_dot_product_attention(_heads_first(q), kh, vh, scale=scale)
        return out[0].transpose(0, 1), None

    return fn


def _flex_block_mask(case: dict[str, Any], bi: torch.Tensor):
    """BlockMask of the selection: kv block (FLEX_BLOCK keys) active for a query block where
    any of its rows selected a key block inside it; mask_mod exact per key."""
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


def _make_flex(case: dict[str, Any], inputs: Inputs):
    _only(case, "selection", "flex")
    q, k, v = _qkv(inputs)
    if not q.is_cuda:
        raise Unavailable("flex: measured on CUDA only")
    block_mask = _flex_block_mask(case, inputs.extra["block_indices"])
    compiled, scale, gqa = _compiled_flex()[0], inputs.extra["scale"], case["G"] > 1

    def fn():
        out, lse = compiled(
            _heads_first(q), _heads_first(k), _heads_first(v), scale, block_mask, gqa
        )
        return out[0].transpose(0, 1), lse[0]

    return fn


def _annotate(case, mode, rows, calibration, cfg) -> None:
    """Dense rows are remembered; selection rows get dense ms / their ms per dense provider."""
    key = (_shape(case), mode)
    for row in rows:
        if row["ms"] is None:
            continue
        if case["pattern"] == "dense":
            _DENSE_MS[(*key, row["provider"])] = row["ms"]
        else:
            row["speedup_vs_dense"] = {
                p: ms / row["ms"] for (*k, p), ms in _DENSE_MS.items() if tuple(k) == key
            }


SUITE = register_suite(
    Suite(
        name="selection",
        description=(
            f"selection attention: Lq={LQ} rows over Lk in {list(CONTEXTS)} keys, {N_SEL} "
            f"selected blocks of {BLOCK_SIZE} per row and kv head, H={H}, GQA {list(GROUPS)}, "
            f"D in {list(HEAD_DIMS)}, bf16; dense full-context attention alongside"
        ),
        cases=_cases,
        providers={
            "tabattn-sparse": Provider(
                "tabattn-sparse",
                _make_sparse,
                "tabattn_triton.ops.selection.selection_attention",
            ),
            "flex": Provider(
                "flex",
                _make_flex,
                f"torch.compile(flex_attention) with LSE, BlockMask.from_kv_blocks at "
                f"{FLEX_BLOCK}x{FLEX_BLOCK} (union of the rows' blocks) + per-key mask_mod",
            ),
            "tabattn-dense": Provider(
                "tabattn-dense",
                _make_dense,
                "tabattn_triton.ops.attention.flash_attention over the full context (dense)",
            ),
            "sdpa-cudnn": Provider(
                "sdpa-cudnn",
                _make_sdpa_cudnn,
                "SDPA cuDNN over the full context (dense; K/V repeated per head under GQA)",
            ),
            "reference": Provider(
                "reference",
                _make_reference,
                "tabattn_core.reference selection_attention / varlen_attention (dense masked)",
            ),
        },
        make_inputs=_make_inputs,
        forward_flops=_forward_flops,
        reference=_reference,
        baseline=_baseline,
        dtype=_dtype,
        shape_label=_shape_label,
        x_label=_x_label,
        panel_keys=("pattern", "D"),
        reference_method=(
            "fp64 recomputation in plain torch of the query heads of kv head 0: out, lse and "
            "dq on up to 256 seeded random rows (first and last included); dk and dv of kv "
            "head 0 on all keys (fwd+bwd). Error = ||x - ref|| / ||ref||, bound REL_TOL[dtype]."
        ),
        annotate=_annotate,
        header_extra={
            "table_columns": [
                {
                    "title": "vs dense (ours)",
                    "key": "speedup_vs_dense.tabattn-dense",
                    "format": ".3g",
                    "suffix": "x",
                },
                {
                    "title": "vs dense (cuDNN)",
                    "key": "speedup_vs_dense.sdpa-cudnn",
                    "format": ".3g",
                    "suffix": "x",
                },
            ],
        },
    )
)


# ---------------------------------------------------------------------------------------
# the predictor's top-k context: accuracy against dense attention

GOLDEN = Path("packages/tabpfn-infer/tests/data/peer_default.pt")
ACCURACY_TASKS = {  # name -> (tasks B, context rows Nc, targets Nt, block size, k values)
    "golden": (4, 128, 16, 16, (1, 2, 4, 8)),
    "synthetic": (4, 8192, 32, 64, (1, 4, 16, 64, 128)),
}
SMOKE_TASKS = {"golden": (2, 128, 4, 16, (1, 8)), "synthetic": (2, 96, 4, 16, (1, 6))}


def _accuracy_models() -> dict[str, Any]:
    """name -> (model, inputs): the peer's golden model on its golden inputs (the per-row
    contexts), and the shipped demo checkpoint (trained on the synthetic prior)."""
    from tabpfn_infer.demo import CHECKPOINT
    from tabpfn_infer.model import ARTabPFN, load_peer_state_dict
    from tabpfn_infer.training.train import load_checkpoint

    golden = torch.load(GOLDEN, weights_only=True)
    peer = load_peer_state_dict(ARTabPFN(**golden["config"]), golden["state_dict"]).eval()
    return {
        "golden": (peer, golden["inputs_distinct"]),
        "synthetic": (load_checkpoint(CHECKPOINT), None),
    }


def predictor_accuracy(cfg: RunConfig, *, out: Path) -> dict[str, Any]:
    """Per-target log densities (`evaluate_joint_density`, one dataset per row) with the
    context read through the top-k blocks of each row against the dense result, float64:
    the golden peer model on its inputs (Nc = 128, blocks of 16) and the demo checkpoint on
    synthetic prior tasks (Nc = 8192, blocks of 64; smoke: small). Writes
    selection_predictor_accuracy.json under `out`."""
    from tabpfn_infer.predictor import ARTabPFNPredictor
    from tabpfn_infer.training.prior import sample_tasks

    backend = "torch" if cfg.device.type == "cpu" else "triton"
    dtype = torch.float64 if backend == "torch" else torch.float32
    models = _accuracy_models()
    rows = []
    for name, (b, nc, nt, block, ks) in (SMOKE_TASKS if cfg.smoke else ACCURACY_TASKS).items():
        model, data = models[name]
        model = model.to(cfg.device, dtype)
        if data is None or cfg.smoke:
            gen = torch.Generator().manual_seed(cfg.seed)
            task = sample_tasks(b, num_context=nc, num_buffer=0, num_target=nt,
                                num_features=2, generator=gen, dtype=dtype)  # fmt: skip
            data = {"x_context": task.x_context, "y_context": task.y_context,
                    "x_target": task.x_target, "y_target": task.y_target}  # fmt: skip
        args = [data[k][:b].to(cfg.device, dtype)
                for k in ("x_context", "y_context", "x_target", "y_target")]  # fmt: skip
        args[2], args[3] = args[2][:, :nt], args[3][:, :nt]
        dense = ARTabPFNPredictor(model, backend=backend).evaluate_joint_density(*args)
        for k in ks:
            start = time.perf_counter()
            with _forced_selection():  # the selection's accuracy, not the dense fallback's
                top = ARTabPFNPredictor(
                    model, backend=backend, context_top_k=k, context_block_size=block
                ).evaluate_joint_density(*args)
            diff = (top - dense).abs()
            rows.append({
                "task": name, "B": b, "Nc": args[0].shape[1], "Nt": nt, "block": block, "k": k,
                "context_fraction": min(1.0, k * block / args[0].shape[1]),
                "max_abs_target_nats": diff.max().item(),
                "mean_abs_target_nats": diff.mean().item(),
                "mean_abs_joint_nats": (top.sum(1) - dense.sum(1)).abs().mean().item(),
                "dense_mean_joint_nats": dense.sum(1).mean().item(),
                "seconds": time.perf_counter() - start,
            })  # fmt: skip
    header = collect_header(SUITE, cfg)
    for key in ("table_columns", "table_notes", "baselines", "flops", "reference_method",
                "providers", "rel_tol", "timing"):  # fmt: skip
        header.pop(key, None)
    header.update(suite="selection_predictor_accuracy", backend=backend,
                  dtype=str(dtype).removeprefix("torch."))  # fmt: skip
    result = {"header": header, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "selection_predictor_accuracy.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


# ---------------------------------------------------------------------------------------
# path decisions: where dense attention is faster than the selection (issue 8)

# op level: selection_attention (the sparse kernels) vs the dense masked reference.
# One sequence of Lq rows over Lk keys; each row and kv head selects top_k blocks of bs keys
# (select_blocks); cells with top_k > blocks are left out. Along Lk a series stops once the
# dense path is NOT_COMPETITIVE times slower than the sparse one (fwd+bwd), or past
# REFERENCE_MAX_SCORES.
OP_GRID = {
    "H": 16,
    "D": 64,
    "groups": (1, 16),
    "dtypes": ("bfloat16", "float32"),
    "Lq": (256, 2048),
    "Lk": (256, 1024, 4096, 16384),
    "top_k": (2, 16, 64),
    "bs": 64,
}
OP_SMOKE = {"H": 2, "D": 16, "groups": (2,), "dtypes": ("float32",), "Lq": (2,),
            "Lk": (40, 72), "top_k": (2,), "bs": 16}  # fmt: skip
NOT_COMPETITIVE = 8.0
# predictor level: ARTabPFNPredictor(backend="triton", cuda_graph=False) with context_top_k=k
# (the selection forced) vs without top-k (exact dense), default ARTabPFN() with random
# weights, float32, one context shared by the B rows: (method, B, Nt, Nc values) x k.
PREDICTOR_GRID = {
    "calls": (
        ("density", 64, 16, (1024, 4096, 16384, 65536)),
        ("density", 512, 64, (1024, 4096, 16384)),
        ("sample", 64, 16, (1024, 4096, 16384, 65536)),
    ),
    "top_k": (4, 16, 64),
    "bs": 64,
}
PREDICTOR_SMOKE = {"calls": (("density", 2, 2, (16, 40)), ("sample", 1, 2, (16, 40))),
                   "top_k": (2,), "bs": 8}  # fmt: skip
PREDICTOR_SMOKE_MODEL = {"d_model": 32, "n_heads": 2, "n_layers": 1, "d_ff": 32,
                         "buffer_size": 2, "num_components": 2}  # fmt: skip
PREDICTOR_CHECK_MAX_NC = 4096  # dense density checked against the float64 torch backend
TIMING = {"warmup_ms": 5, "rep_ms": 25, "min_runs": 5, "max_rep_ms": 5000}


@contextlib.contextmanager
def _patched(module, **values):
    """Module constants set for the duration of the block (the path rules under test)."""
    old = {name: getattr(module, name) for name in values}
    for name, value in values.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(module, name, value)


def _forced_selection():
    """The predictor's top-k path without its dense fallback (`_dense_context` never dense
    for a non-empty context)."""
    import tabpfn_infer.predictor as predictor_module

    return _patched(predictor_module, DENSE_CONTEXT_BELOW=0, DENSE_CONTEXT_FRACTION=math.inf)


def _wall_ms(fn, device: torch.device):
    """(result, milliseconds) of one call, synchronised on both sides."""
    sync_device(device)
    start = time.perf_counter()
    result = fn()
    sync_device(device)
    return result, (time.perf_counter() - start) * 1e3


def _median_ms(fn, cfg: RunConfig, grad_to_none=None, checked_ms=None) -> dict[str, Any]:
    """Median ms of many calls (after a warm, correctness-checked one). CUDA: one call timed
    on the host clock as the estimate, then `do_bench` (return_mode="median") with a
    repetition budget of at least TIMING["min_runs"] calls; CPU: the median of cfg.cpu_reps
    calls on the host clock (--smoke: the checked call's `checked_ms` where given)."""
    if cfg.device.type != "cuda" and cfg.smoke and checked_ms is not None:
        return {"ms": checked_ms, "runs": 1}
    if cfg.device.type == "cuda":
        from triton.testing import do_bench

        est = _wall_ms(fn, cfg.device)[1]
        rep = min(TIMING["max_rep_ms"], max(TIMING["rep_ms"], TIMING["min_runs"] * est))
        ms = do_bench(fn, warmup=max(TIMING["warmup_ms"], est), rep=rep,
                      grad_to_none=grad_to_none, return_mode="median")  # fmt: skip
        return {"ms": float(ms), "runs": max(1, int(rep / max(est, 1e-3)))}
    times = []
    for _ in range(max(1, cfg.cpu_reps)):
        for t in grad_to_none or ():
            t.grad = None
        times.append(_wall_ms(fn, cfg.device)[1])
    return {"ms": statistics.median(times), "runs": len(times)}


def _geomean(a: float, b: float) -> float:
    return math.sqrt(a * b) if a > 0 else b / 2


def _midpoints(values: list[float]) -> list[float]:
    v = sorted(set(values))
    return [_geomean(a, b) for a, b in itertools.pairwise(v)]


def fit_rule(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """The rule "dense iff size < T or fraction >= F" of least summed relative time lost,
    sum(ms of the chosen path / ms of the faster one - 1), over cells with keys size,
    fraction, sparse_ms, dense_ms (dense_ms None: not competitive, counted as
    NOT_COMPETITIVE x sparse_ms). T among 0 and the geometric midpoints of the measured sizes
    and twice the largest; F among inf, the midpoints of the measured fractions and half the
    smallest. Ties: the smallest T, then the largest F (the fewest dense choices)."""
    ms = [(c["sparse_ms"], c["dense_ms"] or NOT_COMPETITIVE * c["sparse_ms"]) for c in cells]
    sizes, fractions = [c["size"] for c in cells], [c["fraction"] for c in cells]
    if not cells:
        return {"size_below": 0, "fraction_from": "inf", "cells": 0}
    ts = [0, *_midpoints(sizes), 2 * max(sizes)]
    fs = [math.inf, *sorted(_midpoints(fractions), reverse=True), min(fractions) / 2]

    def loss(t: float, f: float) -> tuple[float, list[int]]:
        total, wrong = 0.0, []
        for i, (c, (sp, de)) in enumerate(zip(cells, ms, strict=True)):
            dense = c["size"] < t or c["fraction"] >= f
            total += (de if dense else sp) / min(sp, de) - 1
            if (de < sp) != dense:
                wrong.append(i)
        return total, wrong

    best = None
    for t in ts:
        for f in fs:
            value, wrong = loss(t, f)
            if best is None or value < best[0] - 1e-12:
                best = (value, t, f, wrong)
    value, t, f, wrong = best
    always_sparse, always_dense = loss(0, math.inf)[0], loss(math.inf, 0)[0]
    return {
        "size_below": round(t), "fraction_from": "inf" if f == math.inf else round(f, 4),
        "relative_time_lost": value, "relative_time_lost_always_sparse": always_sparse,
        "relative_time_lost_always_dense": always_dense, "cells": len(cells),
        "cells_dense_faster": sum(de < sp for sp, de in ms),
        "misclassified": [cells[i]["label"] for i in wrong],
    }  # fmt: skip


def _crossovers(rows: list[dict[str, Any]], series: tuple[str, ...], along: str) -> list:
    """Per series (rows sharing the `series` keys), the value of `along` where dense and
    sparse take equal time (log-log interpolation between the measured neighbours), or
    where the measured grid says it lies outside ("below min" / "above max")."""
    groups: dict[tuple, list] = {}
    for r in rows:
        if r.get("dense_over_sparse") is not None:
            groups.setdefault(tuple(r[k] for k in series), []).append(r)
    out = []
    for key, rs in groups.items():
        rs.sort(key=lambda r: r[along])
        found = None
        for a, b in itertools.pairwise(rs):
            ra, rb = math.log(a["dense_over_sparse"]), math.log(b["dense_over_sparse"])
            if ra <= 0 < rb or rb <= 0 < ra:
                w = ra / (ra - rb)
                found = math.exp(math.log(a[along]) + w * (math.log(b[along]) - math.log(a[along])))
                break
        item = dict(zip(series, key, strict=True))
        if found is None:
            first = rs[0]["dense_over_sparse"] > 1  # sparse faster at the smallest
            found = f"below {rs[0][along]}" if first else f"above {rs[-1][along]}"
        item[f"{along}_crossover"] = found if isinstance(found, str) else round(found, 1)
        item["dense_over_sparse"] = {r[along]: round(r["dense_over_sparse"], 3) for r in rs}
        out.append(item)
    return out


OP_MODES = ("fwd", "fwd+bwd")


def _op_series(grid: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """The op cells, in series of growing Lk (same dtype, GQA, Lq, top_k)."""
    h, bs = grid["H"], grid["bs"]
    series = []
    for dtype, g, lq, k_sel in itertools.product(
        grid["dtypes"], grid["groups"], grid["Lq"], grid["top_k"]
    ):
        cells = []
        for lk in grid["Lk"]:
            if k_sel > -(-lk // bs):
                continue
            selected, dense = lq * k_sel * bs, lq * lk
            cells.append({
                "dtype": dtype, "H": h, "G": g, "D": grid["D"], "Lq": lq, "Lk": lk, "bs": bs,
                "top_k": k_sel, "selected_keys": selected, "dense_keys": dense,
                "dense_scores": h * dense, "fraction": selected / dense,
                "label": f"{dtype} G{g} Lq{lq} Lk{lk} k{k_sel}x{bs}",
            })  # fmt: skip
        series.append(cells)
    return series


def _op_cell(cell: dict[str, Any], cfg: RunConfig) -> list[dict[str, Any]]:
    """One op cell, fwd and fwd+bwd: sparse vs dense path checked against each other (the
    dense path is the reference; bound REL_TOL of the dtype, tf32's for fp32 on CUDA, 2x for
    the gradients), then each timed."""
    from tabattn_core import reference
    from tabattn_core.selection import select_blocks
    from tabattn_core.testing import REL_TOL, rel_error
    from tabattn_triton.ops.selection import selection_attention

    paths = {"sparse": selection_attention, "dense": reference.selection_attention}
    dtype = getattr(torch, cell["dtype"])
    tol = REL_TOL[dtype if dtype != torch.float32 or cfg.device.type == "cpu" else "tf32"]
    h, g, d, lq, lk, bs = (cell[n] for n in ("H", "G", "D", "Lq", "Lk", "bs"))
    gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    q, k, v, do = (
        torch.randn(*shape, generator=gen, device=cfg.device).to(dtype)
        for shape in ((lq, h, d), (lk, h // g, d), (lk, h // g, d), (lq, h, d))
    )
    cu_q, cu_k = (torch.tensor([0, n], device=cfg.device) for n in (lq, lk))
    kw = {"cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k, "block_size": bs}
    kw["block_indices"] = select_blocks(q, k, top_k=cell["top_k"], **kw)
    leaves = [t.requires_grad_() for t in (q, k, v)]

    def call(path: str, mode: str):
        if mode == "fwd":
            return lambda: paths[path](*leaves, **kw)
        return lambda: paths[path](*leaves, **kw)[0].backward(do)

    rows = []
    for mode in OP_MODES:
        row = {**cell, "mode": mode, "label": f"{cell['label']} {mode}"}
        got = {}
        for path in ("sparse", "dense"):
            for t in leaves:
                t.grad = None
            if mode == "fwd":
                with torch.no_grad():
                    out, lse = call(path, mode)()
                got[path] = {"out": out, "lse": lse}
            else:
                call(path, mode)()
                got[path] = {
                    n: t.grad.clone() for n, t in zip(("dq", "dk", "dv"), leaves, strict=True)
                }
        bound = tol if mode == "fwd" else 2 * tol
        errors = {n: rel_error(got["sparse"][n], got["dense"][n]) for n in got["sparse"]}
        row["check"] = {"rel_err_sparse_vs_dense": errors, "bound": bound}
        if not all(e <= bound for e in errors.values()):
            rows.append({**row, "status": "failed", "reason": f"sparse vs dense over {bound:.1e}"})
            continue
        for path in ("sparse", "dense"):
            fn = call(path, mode)
            with torch.no_grad() if mode == "fwd" else contextlib.nullcontext():
                timed = _median_ms(fn, cfg, grad_to_none=leaves if mode != "fwd" else None)
            row[f"{path}_ms"], row[f"{path}_runs"] = timed["ms"], timed["runs"]
        row["dense_over_sparse"] = row["dense_ms"] / row["sparse_ms"]
        row["winner"] = "dense" if row["dense_over_sparse"] < 1 else "sparse"
        rows.append({**row, "status": "ok"})
    return rows


def _op_rows(cfg: RunConfig) -> list[dict[str, Any]]:
    """Every op cell; along a series, once the dense path is NOT_COMPETITIVE x slower than
    the sparse one (fwd+bwd), or past REFERENCE_MAX_SCORES, the larger Lk are skipped."""
    rows = []
    for series in _op_series(OP_SMOKE if cfg.smoke else OP_GRID):
        stopped = None
        for cell in series:
            if cell["H"] * cell["Lq"] * cell["Lk"] > REFERENCE_MAX_SCORES:
                stopped = stopped or f"H*Lq*Lk > REFERENCE_MAX_SCORES={REFERENCE_MAX_SCORES}"
            if stopped:
                rows += [{**cell, "mode": m, "label": f"{cell['label']} {m}", "status": "skipped",
                          "reason": stopped} for m in OP_MODES]  # fmt: skip
                continue
            done = _op_cell(cell, cfg)
            rows += done
            print(f"op {cell['label']}: " + ", ".join(
                f"{r['mode']} sparse {r['sparse_ms']:.3g} ms dense {r['dense_ms']:.3g} ms"
                if r["status"] == "ok" else f"{r['mode']} {r['status']}" for r in done),
                flush=True)  # fmt: skip
            last = done[-1]
            if last["status"] == "ok" and last["dense_over_sparse"] > NOT_COMPETITIVE:
                stopped = (f"dense not competitive from Lk={cell['Lk']} on (fwd+bwd "
                           f"{last['dense_over_sparse']:.1f}x the sparse time)")  # fmt: skip
        _free(cfg.device)
    return rows


def _op_rule(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """fit_rule over the op cells: size = dense scores (H x keys dense attention visits),
    fraction = selected keys / dense keys; skipped-as-not-competitive cells count as sparse
    wins (NOT_COMPETITIVE x), cells past REFERENCE_MAX_SCORES are left out."""
    cells = []
    for r in rows:
        competitive = r["status"] == "skipped" and "not competitive" in r["reason"]
        if r["status"] != "ok" and not competitive:
            continue
        cells.append({"size": r["dense_scores"], "fraction": r["fraction"], "label": r["label"],
                      "sparse_ms": r.get("sparse_ms", 1.0), "dense_ms": r.get("dense_ms")})  # fmt: skip
    fit = fit_rule(cells)
    return {"DENSE_MAX_SCORES": fit.pop("size_below"),
            "SPARSE_MAX_FRACTION": fit.pop("fraction_from"), **fit}  # fmt: skip


def _predictor_rows(cfg: RunConfig) -> list[dict[str, Any]]:
    """Predictor cells: per (method, B, Nt, Nc) the dense predictor and the forced top-k
    ones, each checked first, then timed end to end. Checks: finite results; the dense
    densities within FLOAT32_DENSITY_NATS of the float64 torch backend on 4 rows (Nc up to
    PREDICTOR_CHECK_MAX_NC); top-k densities with k blocks covering the whole context
    within FLOAT32_DENSITY_NATS of the dense ones (the selection pipeline end to end)."""
    from bench.suites.predictor import (
        FLOAT32_DENSITY_NATS,
        MODEL_SEED,
        NUM_COLUMNS,
        SAMPLE_SEED,
    )
    from tabpfn_infer.model import ARTabPFN
    from tabpfn_infer.predictor import ARTabPFNPredictor

    grid = PREDICTOR_SMOKE if cfg.smoke else PREDICTOR_GRID
    torch.manual_seed(MODEL_SEED)
    master = ARTabPFN(**(PREDICTOR_SMOKE_MODEL if cfg.smoke else {})).eval()
    model = copy.deepcopy(master).to(cfg.device, torch.float32)
    model64 = copy.deepcopy(master).to(cfg.device, torch.float64)
    bs, rows = grid["bs"], []
    dense_predictor = ARTabPFNPredictor(model, backend="triton", cuda_graph=False)
    for method, b, nt, contexts in grid["calls"]:
        for nc in contexts:
            gen = torch.Generator().manual_seed(cfg.seed)
            xc, yc = (
                torch.randn(1, nc, NUM_COLUMNS, generator=gen),
                torch.randn(1, nc, generator=gen),
            )
            xt, yt = (
                torch.randn(b, nt, NUM_COLUMNS, generator=gen),
                torch.randn(b, nt, generator=gen),
            )
            xc, yc, xt, yt = (t.to(cfg.device) for t in (xc, yc, xt, yt))
            args = (xc.expand(b, nc, NUM_COLUMNS), yc.expand(b, nc), xt, yt)

            def call(predictor, args=args, method=method):
                if method == "density":
                    return lambda: predictor.evaluate_joint_density(*args)
                gen = torch.Generator(device=cfg.device)
                return lambda: predictor.sample_sequence(
                    *args[:3], generator=gen.manual_seed(SAMPLE_SEED)
                )

            base = {"method": method, "B": b, "Nt": nt, "Nc": nc, "bs": bs}
            # the dense predictor: checked against the float64 torch backend (density)
            dense_fn = call(dense_predictor)
            dense_out, checked_ms = _wall_ms(dense_fn, cfg.device)
            check: dict[str, Any] = {"finite": bool(torch.isfinite(dense_out).all())}
            if method == "density" and nc <= PREDICTOR_CHECK_MAX_NC:
                n = min(b, 4)
                ref = ARTabPFNPredictor(model64, backend="torch").evaluate_joint_density(
                    *(t[:n].double() for t in args)
                )
                check["max_nats_vs_float64"] = (dense_out[:n].double() - ref).abs().max().item()
                check["bound_nats"] = FLOAT32_DENSITY_NATS
            ok = check["finite"] and check.get("max_nats_vs_float64", 0) <= FLOAT32_DENSITY_NATS
            dense = {"status": "ok" if ok else "failed", "check": check}
            if ok:
                dense.update(_median_ms(dense_fn, cfg, checked_ms=checked_ms))
            for k_sel in grid["top_k"]:
                if k_sel > -(-nc // bs):
                    continue
                label = f"{method} B{b} Nt{nt} Nc{nc} k{k_sel}x{bs}"
                row = {**base, "top_k": k_sel, "fraction": k_sel * bs / nc, "label": label,
                       "dense_ms": dense.get("ms"), "dense_runs": dense.get("runs"),
                       "dense_check": dense["check"]}  # fmt: skip
                if dense["status"] != "ok":
                    rows.append({**row, "status": "failed", "reason": "dense predictor check"})
                    continue
                top = ARTabPFNPredictor(model, backend="triton", cuda_graph=False,
                                        context_top_k=k_sel, context_block_size=bs)  # fmt: skip
                fn = call(top)
                with _forced_selection():
                    out, checked_ms = _wall_ms(fn, cfg.device)
                    check = {"finite": bool(torch.isfinite(out).all())}
                    if method == "density" and k_sel * bs >= nc:  # every block: the dense result
                        check["max_nats_vs_dense"] = (out - dense_out).abs().max().item()
                        check["bound_nats"] = FLOAT32_DENSITY_NATS
                    row["check"] = check
                    if (
                        not check["finite"]
                        or check.get("max_nats_vs_dense", 0) > FLOAT32_DENSITY_NATS
                    ):
                        rows.append({**row, "status": "failed", "reason": "top-k check"})
                        continue
                    timed = _median_ms(fn, cfg, checked_ms=checked_ms)
                row.update(sparse_ms=timed["ms"], sparse_runs=timed["runs"], status="ok")
                row["dense_over_sparse"] = row["dense_ms"] / row["sparse_ms"]
                row["winner"] = "dense" if row["dense_over_sparse"] < 1 else "sparse"
                rows.append(row)
                print(f"predictor {label}: top-k {row['sparse_ms']:.4g} ms, dense "
                      f"{row['dense_ms']:.4g} ms", flush=True)  # fmt: skip
            del args, dense_out
            _free(cfg.device)
    return rows


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _predictor_rule(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """fit_rule over the predictor cells: size = Nc, fraction = top_k * bs / Nc."""
    cells = [{"size": r["Nc"], "fraction": r["fraction"], "label": r["label"],
              "sparse_ms": r["sparse_ms"], "dense_ms": r["dense_ms"]}
             for r in rows if r["status"] == "ok"]  # fmt: skip
    fit = fit_rule(cells)
    return {"DENSE_CONTEXT_BELOW": fit.pop("size_below"),
            "DENSE_CONTEXT_FRACTION": fit.pop("fraction_from"), **fit}  # fmt: skip


def crossover(
    cfg: RunConfig, *, out: Path, parts: tuple[str, ...] = ("op", "predictor")
) -> dict[str, Any]:
    """Measure where dense attention beats the selection, at the op (the sparse kernels vs
    the dense masked reference) and in the predictor (`context_top_k`'s dense fallback); fit
    the two rules (`fit_rule`); write selection_crossover.json under `out` (after each
    part). The op has no dense path of its own (the fitted op rule is a measurement only),
    so the predictor's selection op runs the kernels."""
    if cfg.device.type != "cuda" and not cfg.interpret:
        raise SystemExit("crossover: needs a CUDA device, or TRITON_INTERPRET=1 on CPU")
    header = collect_header(SUITE, cfg)
    for key in ("table_columns", "table_notes", "baselines", "flops", "reference_method",
                "providers", "rel_tol", "dtype", "description", "panel_keys"):  # fmt: skip
        header.pop(key, None)
    header.update(
        suite="selection_crossover",
        parts=list(parts),
        timing={"method": "triton.testing.do_bench, return_mode=median" if cfg.device.type
                == "cuda" else "host clock, median", **TIMING,
                "not_competitive": NOT_COMPETITIVE},
        op_grid=OP_SMOKE if cfg.smoke else OP_GRID,
        predictor_grid=PREDICTOR_SMOKE if cfg.smoke else PREDICTOR_GRID,
        rule=("dense iff size < T or fraction >= F, (T, F) of least summed relative time "
              "lost, sum(ms chosen / ms faster - 1), over the cells; op: size = H x keys "
              "dense attention visits, fraction = selected / dense keys; predictor: size = Nc, "
              "fraction = top_k * block / Nc"),
    )  # fmt: skip
    result: dict[str, Any] = {"header": header, "rules": {}, "seconds": {}}
    out.mkdir(parents=True, exist_ok=True)
    path = out / "selection_crossover.json"

    def write() -> None:
        path.write_text(json.dumps(result, indent=1, default=str) + "\n")

    if "op" in parts:
        start = time.perf_counter()
        op_rows = _op_rows(cfg)
        result["rules"]["op"] = _op_rule(op_rows)
        result["op"] = {"rows": op_rows, "crossovers": _crossovers(
            op_rows, ("dtype", "G", "Lq", "top_k", "mode"), "Lk")}  # fmt: skip
        result["seconds"]["op"] = time.perf_counter() - start
        write()
    if "predictor" in parts:
        start = time.perf_counter()
        pred_rows = _predictor_rows(cfg)
        result["predictor"] = {"rows": pred_rows,
                               "crossovers": _crossovers(
                                   pred_rows, ("method", "B", "Nt", "top_k"), "Nc")}  # fmt: skip
        result["rules"]["predictor"] = _predictor_rule(pred_rows)
        result["seconds"]["predictor"] = time.perf_counter() - start
        write()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.suites.selection")
    p.add_argument("command", choices=["predictor-accuracy", "crossover", "floor"])
    p.add_argument("--out", type=Path, default=Path("bench/out"))
    p.add_argument("--smoke", action="store_true", help="small tasks / tiny grid")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--part",
        choices=["all", "op", "predictor"],
        default="all",
        help="crossover: which level to measure",
    )
    p.add_argument(
        "--device",
        default=None,
        help="predictor-accuracy: default cpu; crossover, floor: default cuda when available",
    )
    args = p.parse_args(argv)
    device = args.device or (
        "cuda" if args.command != "predictor-accuracy" and torch.cuda.is_available() else "cpu"
    )
    cfg = RunConfig(device=torch.device(device), smoke=args.smoke, seed=args.seed,
                    reps=1 if args.smoke and args.command != "predictor-accuracy" else None,
                    command=" ".join(["python -m bench.suites.selection", *(argv or sys.argv[1:])]))  # fmt: skip
    if args.command == "floor":
        from bench.suites import selection_floor

        selection_floor.run(cfg, out=args.out)
        print(f"wrote {args.out / 'selection_floor.json'}")
        return 0
    if args.command == "crossover":
        parts = ("op", "predictor") if args.part == "all" else (args.part,)
        result = crossover(cfg, out=args.out, parts=parts)
        for level, rule in result["rules"].items():
            print(f"rule {level}: " + ", ".join(f"{k}={v}" for k, v in rule.items()
                                                if k != "misclassified"))  # fmt: skip
        for level in parts:
            for c in result[level]["crossovers"]:
                print(f"crossover {level}: {c}")
        print(f"wrote {args.out / 'selection_crossover.json'} in "
              f"{sum(result['seconds'].values()):.0f} s")  # fmt: skip
        return 0
    result = predictor_accuracy(cfg, out=args.out)
    for r in result["rows"]:
        print(f"{r['task']:9s} Nc {r['Nc']:5d} block {r['block']:3d} k {r['k']:4d} "
              f"({100 * r['context_fraction']:5.1f}% of the context): target |d| max "
              f"{r['max_abs_target_nats']:.3g} mean {r['mean_abs_target_nats']:.3g} nats, joint "
              f"|d| {r['mean_abs_joint_nats']:.3g} (dense joint {r['dense_mean_joint_nats']:.4g})")  # fmt: skip
    print(f"wrote {args.out / 'selection_predictor_accuracy.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
