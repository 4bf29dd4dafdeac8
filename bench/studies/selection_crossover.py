"""Study: where dense attention is faster than the selection (the path rules).

`python -m bench.studies.selection_crossover [--out DIR] [--part op|predictor|all]
[--smoke] [--device cpu]` writes selection_crossover.json: per cell both paths checked
against each other first, then timed (the harness's do_bench median with a budget of at
least TIMING["min_runs"] calls); per series the crossover; and the fitted rules: at the op
(DENSE_MAX_SCORES, SPARSE_MAX_FRACTION: "rules" -> "op") and the constants of
`tabpfn_infer.predictor` (DENSE_CONTEXT_BELOW, DENSE_CONTEXT_FRACTION: "rules" ->
"predictor"). CUDA, or the CPU under TRITON_INTERPRET=1 (--smoke).

Conclusion (H200, commit f1e78e4, `bench/results/selection_crossover.json`):
- op level: the sparse kernels against the exact dense masked path over Lk 256-16k,
  2/16/64 blocks of 64, GQA 1 and 16, bf16 and fp32, fwd and fwd+bwd. The dense path won
  7 of 120 cells (fp32 only: GQA 1 with 16-64 blocks over 1-4k keys, two GQA-16 fwd+bwd
  cells) and no size or fraction threshold lost less time than running the kernels
  everywhere (summed relative time lost 5.46, always dense 262): `selection_attention`
  always runs the kernels (the dense masked path is `tabattn_core.reference`).
- predictor level: the run reached its time limit in this part; the cells it printed
  (`bench/results/selection_crossover_predictor.log`) all favour exact dense attention
  (density 1.05-2.5x at B=64, Nt=16 and 1.5-26x at B=512, Nt=64 over Nc 1024-65536;
  sampling 2.0x at Nc=1024), so the predictor reads contexts up to 2^16 rows densely.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import time
from pathlib import Path
from typing import Any

import torch

from bench.harness import (
    RunConfig,
    free_memory,
    median_ms,
    study_header,
    wall_ms,
    write_json,
)
from bench.studies import study_main
from bench.suites.selection import REFERENCE_MAX_SCORES

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
OP_MODES = ("fwd", "fwd+bwd")
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


def forced_selection():
    """The predictor's top-k path without its dense fallback (`_dense_context` never dense
    for a non-empty context)."""
    import tabpfn_infer.predictor as predictor_module

    return _patched(predictor_module, DENSE_CONTEXT_BELOW=0, DENSE_CONTEXT_FRACTION=math.inf)


def budgeted_ms(fn, cfg: RunConfig, grad_to_none=None, checked_ms=None) -> dict[str, Any]:
    """Median ms of many calls of `fn` (warm and checked by one call before) by the
    harness's `median_ms`. CUDA: one call timed on the host clock as the estimate, then
    do_bench with a repetition budget of at least TIMING["min_runs"] calls; CPU: cfg.cpu_reps
    calls (the checked call was the warm-up; --smoke: the checked call's `checked_ms` where
    given)."""
    if cfg.device.type != "cuda" and cfg.smoke and checked_ms is not None:
        return {"ms": checked_ms, "runs": 1}
    if cfg.device.type != "cuda":
        ms = median_ms(fn, cfg, grad_to_none=grad_to_none, cpu_warmup_calls=0)
        return {"ms": ms, "runs": max(1, cfg.cpu_reps)}
    est = wall_ms(fn, cfg.device)[1]
    rep = min(TIMING["max_rep_ms"], max(TIMING["rep_ms"], TIMING["min_runs"] * est))
    warmup = max(TIMING["warmup_ms"], est)
    ms = median_ms(fn, cfg, grad_to_none=grad_to_none, warmup_ms=warmup, rep_ms=rep)
    return {"ms": ms, "runs": max(1, int(rep / max(est, 1e-3)))}


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


# ---------------------------------------------------------------------------------------
# op level


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
                timed = budgeted_ms(fn, cfg, grad_to_none=leaves if mode != "fwd" else None)
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
        free_memory(cfg.device)
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


# ---------------------------------------------------------------------------------------
# predictor level


def _predictor_rows(cfg: RunConfig) -> list[dict[str, Any]]:
    """Predictor cells: per (method, B, Nt, Nc) the dense predictor and the forced top-k
    ones, each checked first, then timed end to end. Checks: finite results; the dense
    densities within FLOAT32_DENSITY_NATS of the float64 torch backend on 4 rows (Nc up to
    PREDICTOR_CHECK_MAX_NC); top-k densities with k blocks covering the whole context
    within FLOAT32_DENSITY_NATS of the dense ones (the selection pipeline end to end)."""
    from bench.suites.predictor import NUM_COLUMNS
    from bench.suites.predictor_check import FLOAT32_DENSITY_NATS, MODEL_SEED, SAMPLE_SEED
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
            dense_out, checked_ms = wall_ms(dense_fn, cfg.device)
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
                dense.update(budgeted_ms(dense_fn, cfg, checked_ms=checked_ms))
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
                with forced_selection():
                    out, checked_ms = wall_ms(fn, cfg.device)
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
                    timed = budgeted_ms(fn, cfg, checked_ms=checked_ms)
                row.update(sparse_ms=timed["ms"], sparse_runs=timed["runs"], status="ok")
                row["dense_over_sparse"] = row["dense_ms"] / row["sparse_ms"]
                row["winner"] = "dense" if row["dense_over_sparse"] < 1 else "sparse"
                rows.append(row)
                print(f"predictor {label}: top-k {row['sparse_ms']:.4g} ms, dense "
                      f"{row['dense_ms']:.4g} ms", flush=True)  # fmt: skip
            del args, dense_out
            free_memory(cfg.device)
    return rows


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
    cuda = cfg.device.type == "cuda"
    header = study_header(
        "selection_crossover", cfg,
        timing={"method": "triton.testing.do_bench, return_mode=median" if cuda
                else "host clock, median", **TIMING, "not_competitive": NOT_COMPETITIVE},
        parts=list(parts),
        op_grid=OP_SMOKE if cfg.smoke else OP_GRID,
        predictor_grid=PREDICTOR_SMOKE if cfg.smoke else PREDICTOR_GRID,
        rule=("dense iff size < T or fraction >= F, (T, F) of least summed relative time "
              "lost, sum(ms chosen / ms faster - 1), over the cells; op: size = H x keys "
              "dense attention visits, fraction = selected / dense keys; predictor: size = Nc, "
              "fraction = top_k * block / Nc"),
    )  # fmt: skip
    result: dict[str, Any] = {"header": header, "rules": {}, "seconds": {}}
    path = out / "selection_crossover.json"
    if "op" in parts:
        start = time.perf_counter()
        op_rows = _op_rows(cfg)
        result["rules"]["op"] = _op_rule(op_rows)
        result["op"] = {"rows": op_rows, "crossovers": _crossovers(
            op_rows, ("dtype", "G", "Lq", "top_k", "mode"), "Lk")}  # fmt: skip
        result["seconds"]["op"] = time.perf_counter() - start
        write_json(path, result)
    if "predictor" in parts:
        start = time.perf_counter()
        pred_rows = _predictor_rows(cfg)
        result["predictor"] = {"rows": pred_rows,
                               "crossovers": _crossovers(
                                   pred_rows, ("method", "B", "Nt", "top_k"), "Nc")}  # fmt: skip
        result["rules"]["predictor"] = _predictor_rule(pred_rows)
        result["seconds"]["predictor"] = time.perf_counter() - start
        write_json(path, result)
    return result


def _measure(args, cfg: RunConfig) -> list[Path]:
    parts = ("op", "predictor") if args.part == "all" else (args.part,)
    result = crossover(cfg, out=args.out, parts=parts)
    for level, rule in result["rules"].items():
        print(f"rule {level}: " + ", ".join(f"{k}={v}" for k, v in rule.items()
                                            if k != "misclassified"))  # fmt: skip
    for level in parts:
        for c in result[level]["crossovers"]:
            print(f"crossover {level}: {c}")
    print(f"measured in {sum(result['seconds'].values()):.0f} s")
    return [args.out / "selection_crossover.json"]


def main(argv: list[str] | None = None) -> int:
    def options(p) -> None:
        p.add_argument("--part", choices=["all", "op", "predictor"], default="all",
                       help="which level to measure")  # fmt: skip

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return study_main("bench.studies.selection_crossover", argv, _measure, doc=__doc__,
                      device=device, smoke_reps=1, options=options)  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
