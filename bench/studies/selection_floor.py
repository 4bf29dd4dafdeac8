"""Study: the gather floor of the selection forward, what gathering the selected K/V alone
costs (the bound on the forward's speedup over dense attention).

`python -m bench.studies.selection_floor [--out DIR] [--smoke] [--device cpu]` (CUDA, or
the CPU under TRITON_INTERPRET=1) writes selection_floor.json; METHOD says what it times.

Conclusion (H200, `bench/results/selection_floor.json`, D=64: the run stopped at its limit
before D=128): at 64k keys the floor moves ~9-9.7 TB/s (served mostly from L2) and takes
1.54 / 0.465 / 0.123 ms at GQA 1 / 4 / 16, so no forward of this design beats dense
attention by more than 1.77x / 5.75x / 21.5x there; the selection forward reached 1.17x /
4.61x / 16.9x (kernel) in that run.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import torch
import triton
import triton.language as tl

from bench.harness import RunConfig, study_header, timing_description, write_json
from bench.studies import study_main
from bench.studies.selection_crossover import budgeted_ms
from bench.suites import selection
from tabattn_triton.ops.common import load_rows
from tabattn_triton.ops.selection.kernel import row_tile, tile_entry

METHOD = """`gather_floor_kernel` has the selection forward's grid, block walk and masks (the
building blocks `row_tile` and `tile_entry` of `tabattn_triton.ops.selection.kernel`) and
loads every K/V tile the forward loads, but only sums them: no dots, no softmax. Its time is
what gathering the selected K/V alone costs on this GPU, so dense ms / floor ms bounds the
speedup over dense attention that a selection forward of this design (each tile of rows and
kv head reads the union of its rows' blocks once) can reach. Timed at the suite's shapes
next to the selection forward (`selection_attention`) and our dense kernel; the floor's
sums are checked against torch first (relative error at most 1e-4, fp32 sums of the same
values)."""
# (num_warps, num_stages) tried for the floor; its time is the fastest of them.
FLOOR_CONFIGS = ((2, 3), (2, 4), (4, 2), (4, 3), (4, 4), (8, 2))
FLOOR_RTOL = 1e-4
CONTEXTS = (65536,)
SMOKE = {"H": 2, "Lq": 4, "contexts": (80,), "groups": (1, 2), "dims": (16,), "bs": 16, "sel": 3}


@triton.jit
def gather_floor_kernel(
    K, V, OUT, BI, ROW_KEY_START, ROW_LIMITS, TILE_KEYS, TILE_ROWS, TILE_COUNTS,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_bt, stride_bh, stride_bs, stride_tk,
    Tq, Tk, n_tiles, GROUP, n_sel, D,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_SLOTS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Grid: (H_kv * n_tiles,) as the selection forward. OUT [H_kv * n_tiles, BLOCK_D] fp32:
    the sum of k + v over the keys the tile loads."""
    h_kv, _rows, _heads, _ok, end_key, n_entries, bi_row, first, end, own = row_tile(
        BI, ROW_KEY_START, ROW_LIMITS, TILE_COUNTS, stride_bt, stride_bh, stride_bs, Tq,
        n_tiles, GROUP, n_sel, BLOCK_H, HEAD_SLOTS, BLOCK_S,
    )  # fmt: skip
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for j in range(0, n_entries):
        key, _kv_end, load_end = tile_entry(
            j, bi_row, first, end, own, end_key, TILE_KEYS, TILE_ROWS, stride_bs, stride_tk, Tk,
            BLOCK_SIZE, BLOCK_H, HEAD_SLOTS, BLOCK_S,
        )  # fmt: skip
        for sub in tl.static_range(0, BLOCK_SIZE, BLOCK_N):
            cols = key + sub + offs_n
            k = load_rows(
                K + h_kv * stride_kh, cols, stride_kt, stride_kd, offs_d, cols < load_end, d_ok
            )
            v = load_rows(
                V + h_kv * stride_vh, cols, stride_vt, stride_vd, offs_d, cols < load_end, d_ok
            )
            acc += k.to(tl.float32) + v.to(tl.float32)
    tl.store(OUT + tl.program_id(0).to(tl.int64) * BLOCK_D + offs_d, tl.sum(acc, 0))


def gather_floor(k, v, bi, sel, tiles, q, warps: int, stages: int) -> torch.Tensor:
    """Launch the floor kernel; returns [H_kv * n_tiles, D] fp32."""
    from tabattn_triton.ops.selection.interface import _flags, _walk_args

    tq, h_kv, n_sel = bi.shape
    flags = _flags(q, sel)
    out = torch.empty(
        (h_kv * tiles.n_tiles, flags["BLOCK_D"]), device=k.device, dtype=torch.float32
    )
    tables, stride_tk, walk = _walk_args(bi, sel, tiles)
    gather_floor_kernel[(h_kv * tiles.n_tiles,)](
        k, v, out, bi, *tables, *k.stride(), *v.stride(), *bi.stride(), stride_tk,
        tq, sel.num_keys, tiles.n_tiles, sel.group, n_sel, k.shape[2], **walk,
        BLOCK_SIZE=sel.block_size, BLOCK_N=flags["BLOCK_N"], BLOCK_H=flags["BLOCK_H"],
        BLOCK_D=flags["BLOCK_D"], num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out[:, : k.shape[2]]


def floor_reference(k: torch.Tensor, v: torch.Tensor, bi: torch.Tensor, bs: int, rows: int):
    """([H_kv * n_tiles, D] fp32, blocks): per kv head and tile of `rows` consecutive rows,
    the sum of k + v over the distinct blocks the tile's rows selected (one sequence, no
    causal clamp; -1 = unused), and how many (tile, kv head, block) loads that is."""
    lk, h_kv, d = k.shape
    n_blocks = -(-lk // bs)
    kv = torch.zeros(n_blocks * bs, h_kv, d, device=k.device, dtype=torch.float32)
    kv[:lk] = k.float() + v.float()
    block_sums = kv.view(n_blocks, bs, h_kv, d).sum(1)  # [blocks, H_kv, D]
    n_tiles = -(-bi.shape[0] // rows)
    chosen = torch.zeros(n_tiles * rows, h_kv, n_blocks + 1, device=k.device)
    index = torch.where(bi >= 0, bi, n_blocks)
    chosen[: bi.shape[0]].scatter_(2, index, torch.ones_like(index, dtype=chosen.dtype))
    chosen = chosen.view(n_tiles, rows, h_kv, -1).amax(1)[:, :, :n_blocks]
    sums = torch.einsum("thb,bhd->htd", chosen, block_sums).reshape(h_kv * n_tiles, d)
    return sums, int(chosen.sum())


def _floor_row(case: dict[str, Any], cfg: RunConfig) -> dict[str, Any]:
    """One shape: the floor checked under every config and timed (the fastest config
    counts), then the selection forward and the dense kernel timed on the same inputs."""
    from tabattn_triton.ops.attention import flash_attention
    from tabattn_triton.ops.selection import selection_attention
    from tabattn_triton.ops.selection.interface import _selection, row_tiles

    inputs = selection.make_inputs(case, cfg, cfg.seed)
    q, k, v = (inputs.leaves[n].detach() for n in ("q", "k", "v"))
    bi, scale, bs = inputs.extra["block_indices"], inputs.extra["scale"], case["bs"]
    sel = _selection((0, case["Lq"]), (0, case["Lk"]), case["Lq"], bs, False, case["G"], q.device)
    tiles = row_tiles(bi, sel)
    ref, loaded_blocks = floor_reference(k, v, bi, bs, tiles.rows)
    floors = {}
    for warps, stages in FLOOR_CONFIGS:
        err = (
            (gather_floor(k, v, bi, sel, tiles, q, warps, stages) - ref).norm() / ref.norm()
        ).item()
        if not err <= FLOOR_RTOL:
            raise SystemExit(f"floor: {case} w{warps}s{stages}: relative error {err:.3g}")
        floors[f"w{warps}s{stages}"] = budgeted_ms(
            lambda w=warps, s=stages: gather_floor(k, v, bi, sel, tiles, q, w, s), cfg
        )["ms"]
    kw = {"cu_seqlens_q": inputs.extra["cu_q"], "cu_seqlens_k": inputs.extra["cu_k"],
          "block_indices": bi, "block_size": bs, "scale": scale}  # fmt: skip
    qh, kh, vh = (selection.heads_first(t) for t in (q, k, v))
    with torch.no_grad():
        selection_ms = budgeted_ms(lambda: selection_attention(q, k, v, **kw), cfg)["ms"]
        dense_ms = budgeted_ms(lambda: flash_attention(qh, kh, vh, scale=scale), cfg)["ms"]
    best = min(floors, key=floors.get)
    gathered = loaded_blocks * bs * case["D"] * 2 * 2  # K and V, 2 bytes each
    return {**case, "dense_ms": dense_ms, "selection_ms": selection_ms,
            "floor_ms": floors[best], "floor_config": best, "floor_ms_by_config": floors,
            "rows_per_tile": tiles.rows, "gathered_bytes": gathered,
            "floor_tb_per_s": gathered / floors[best] / 1e9,
            "selection_tb_per_s": gathered / selection_ms / 1e9,
            "dense_over_selection": dense_ms / selection_ms,
            "dense_over_floor": dense_ms / floors[best],
            "selection_over_floor": selection_ms / floors[best]}  # fmt: skip


def run(cfg: RunConfig, *, out: Path) -> dict[str, Any]:
    """Time dense, selection forward and floor at the suite's shapes (Lk in CONTEXTS);
    write selection_floor.json under `out` after each shape."""
    grid = SMOKE if cfg.smoke else {**selection.GRID, "contexts": CONTEXTS}
    header = study_header(
        "selection_floor",
        cfg,
        dtype=str(selection.SUITE.dtype(cfg)).removeprefix("torch."),
        timing=timing_description(cfg),
        floor_configs=[list(c) for c in FLOOR_CONFIGS],
        floor_rtol=FLOOR_RTOL,
        method=METHOD,
    )
    result: dict[str, Any] = {"header": header, "rows": []}
    for d, lk, g in itertools.product(grid["dims"], grid["contexts"], grid["groups"]):
        case = {"pattern": "selection", "H": grid["H"], "G": g, "Lq": grid["Lq"], "Lk": lk,
                "D": d, "bs": grid["bs"], "n_sel": grid["sel"]}  # fmt: skip
        row = _floor_row(case, cfg)
        result["rows"].append(row)
        write_json(out / "selection_floor.json", result)
        print(f"floor G{g} D{d} Lk{lk}: dense {row['dense_ms']:.4g} ms, selection "
              f"{row['selection_ms']:.4g} ms ({row['dense_over_selection']:.3g}x), floor "
              f"{row['floor_ms']:.4g} ms ({row['floor_config']}, {row['floor_tb_per_s']:.3g} "
              f"TB/s): bound {row['dense_over_floor']:.3g}x", flush=True)  # fmt: skip
    return result


def _measure(args, cfg: RunConfig) -> list[Path]:
    run(cfg, out=args.out)
    return [args.out / "selection_floor.json"]


def main(argv: list[str] | None = None) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return study_main(
        "bench.studies.selection_floor", argv, _measure, doc=__doc__, device=device, smoke_reps=1
    )


if __name__ == "__main__":
    raise SystemExit(main())
