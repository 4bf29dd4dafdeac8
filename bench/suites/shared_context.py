"""Suite `shared_context`: joint-sampling decode and teacher forcing over a shared context.

G datasets, S sample paths each, H heads (H_kv key/value heads), head dim D, bf16, forward
only. The context K/V of each dataset `[G, H_kv, Nc, D]` is shared by its S paths; each
path has its own buffer K/V `[G, S, H_kv, T_cap, D]`.

- mode `decode` (one step of joint sampling): q `[G, S, H, Lq=1, D]`, the first T of the
  T_cap = T + 8 buffer slots valid; with the "causal" row rule the new row sees all Nc
  context keys and all T buffer keys (it occupies the last valid slot), so no key is
  masked and unmasked SDPA / FlexAttention on per-path materialised K/V compute the same
  function.
- mode `teacher_forcing` (joint density in one pass): q `[G, S, H, 2*Nt, D]` = rows
  `[buf_0..buf_{Nt-1}, tgt_0..tgt_{Nt-1}]` over keys `[ctx | buf]` (`TeacherForcingMask`).

Providers: `bench.suites.shared_context_providers`. Correctness: every provider is compared
with an fp64 run of `tabattn_core.reference` on the first dataset's first 8 sample paths
(all heads, all query rows): out and, where the provider returns one, LSE.

Each row also carries a floor (`bench.suites.floor`): `floor_us = max(bytes / copy
bandwidth, FLOPs / GEMM rate)` with the device copy bandwidth and the GEMM rate measured in
the same run, `ratio_to_floor` = time / floor, and `floor_plus_launch_us` = floor + the
measured cost of launching an empty Triton kernel from Python.
"""

from __future__ import annotations

from typing import Any

import torch

from bench import harness
from bench.harness import Check, Inputs, Provider, RunConfig, Suite, by_name
from bench.suites import floor
from bench.suites import shared_context_providers as p
from bench.suites.shared_context_providers import DECODE, TEACHER_FORCING, buffer_rows, query_rows

MODES = (DECODE, TEACHER_FORCING)

# decode: (G, S, Nc, T) at H=8, D=64, plus the prototype model's H=4, D=32.
DECODE_SIZES = ((1, 512, 1024, 16), (1, 1024, 4096, 64), (1, 64, 16384, 32), (4, 128, 1024, 16))
DECODE_PROTOTYPE = ((1, 512, 1024, 16),)
H, D = 8, 64
PROTOTYPE_H, PROTOTYPE_D = 4, 32
LQ = 1
SPARE_SLOTS = 8  # T_cap = T + SPARE_SLOTS (slots past T hold data that must not be read)
# teacher forcing: (S, Nc, Nt) at G=1, H=8, D=64.
TF_SIZES = ((256, 1024, 64), (64, 4096, 256))

SMOKE_H, SMOKE_D = 2, 32
SMOKE_DECODE_SIZES = ((1, 3, 17, 5), (2, 2, 9, 3))
SMOKE_TF_SIZES = ((2, 9, 4),)

CHECK_PATHS = 8  # the fp64 check covers the first dataset's first CHECK_PATHS sample paths

SDPA_OF_MODE = {DECODE: "sdpa-materialised", TEACHER_FORCING: "sdpa-mask"}
FLEX_OF_MODE = {DECODE: ("flex-materialised", "flex-split"), TEACHER_FORCING: ("flex-tf",)}


def cases(cfg: RunConfig) -> list[dict[str, Any]]:
    if cfg.smoke:
        decode = [(g, s, nc, t, SMOKE_H, SMOKE_D) for g, s, nc, t in SMOKE_DECODE_SIZES]
        tf = [(s, nc, nt, SMOKE_H, SMOKE_D) for s, nc, nt in SMOKE_TF_SIZES]
    else:
        decode = [(g, s, nc, t, H, D) for g, s, nc, t in DECODE_SIZES]
        decode += [(g, s, nc, t, PROTOTYPE_H, PROTOTYPE_D) for g, s, nc, t in DECODE_PROTOTYPE]
        tf = [(s, nc, nt, H, D) for s, nc, nt in TF_SIZES]
    out: list[dict[str, Any]] = [
        {"mode": DECODE, "G": g, "S": s, "H": h, "H_kv": h, "Lq": LQ, "Nc": nc, "T": t,
         "T_cap": t + SPARE_SLOTS, "D": d}
        for g, s, nc, t, h, d in decode
    ]  # fmt: skip
    out += [
        {"mode": TEACHER_FORCING, "G": 1, "S": s, "H": h, "H_kv": h, "Nc": nc, "Nt": nt, "D": d}
        for s, nc, nt, h, d in tf
    ]
    return out


def case_modes(case: dict[str, Any]) -> tuple[str, ...]:
    return (case["mode"],)


def make_inputs(case: dict[str, Any], cfg: RunConfig, seed: int) -> Inputs:
    g, s, h, h_kv, nc, d = (case[k] for k in ("G", "S", "H", "H_kv", "Nc", "D"))
    cap = case["T_cap"] if case["mode"] == DECODE else case["Nt"]
    randn = harness.normal(cfg, seed, harness.smoke_dtype(cfg))
    leaves = {
        "q": randn(g, s, h, query_rows(case), d),
        "k_ctx": randn(g, h_kv, nc, d),
        "v_ctx": randn(g, h_kv, nc, d),
        "k_buf": randn(g, s, h_kv, cap, d),
        "v_buf": randn(g, s, h_kv, cap, d),
    }
    # Forward only: no upstream gradient; grad_out only tells the harness the device.
    grad_out = torch.empty(0, device=cfg.device)
    return Inputs(leaves=leaves, grad_out=grad_out, extra={"scale": d**-0.5})


def forward_flops(case: dict[str, Any]) -> float:
    # 4 * rows * visible keys * D. Decode: every new row sees Nc + T keys. Teacher forcing:
    # 2*Nt rows see the context; buffer keys visible: Nt(Nt+1)/2 + Nt(Nt-1)/2 = Nt^2.
    paths = case["G"] * case["S"] * case["H"] * case["D"]
    if case["mode"] == DECODE:
        return 4.0 * paths * case["Lq"] * (case["Nc"] + case["T"])
    nt = case["Nt"]
    return 4.0 * paths * (2 * nt * case["Nc"] + nt * nt)


def _floor_bytes(case: dict[str, Any], element_size: int) -> int:
    """Bytes that must move: context K/V once, the valid buffer K/V, q and out."""
    g, s, h, h_kv, nc, d = (case[k] for k in ("G", "S", "H", "H_kv", "Nc", "D"))
    elements = 2 * g * h_kv * nc * d
    elements += 2 * g * s * h_kv * buffer_rows(case) * d
    elements += 2 * g * s * h * query_rows(case) * d
    return elements * element_size


def shape_label(case: dict[str, Any]) -> str:
    head = f"G{case['G']} S{case['S']} H{case['H']} D{case['D']} Nc{case['Nc']}"
    return head + (f" T{case['T']}" if case["mode"] == DECODE else f" Nt{case['Nt']}")


def x_label(case: dict[str, Any]) -> str:
    tail = f"T{case['T']}" if case["mode"] == DECODE else f"Nt{case['Nt']}"
    return f"G{case['G']} S{case['S']}\nNc{case['Nc']} {tail}\nH{case['H']} D{case['D']}"


def baseline(mode: str, cfg: RunConfig) -> str:
    if mode == DECODE:
        return "sdpa-materialised"
    return "reference" if cfg.device.type == "cpu" else "flex-tf"


# ---------------------------------------------------------------------------------------
# correctness reference: fp64 on the first dataset's first CHECK_PATHS sample paths


def reference(case: dict[str, Any], inputs: Inputs, mode: str, cfg: RunConfig) -> dict[str, Check]:
    from tabattn_core import reference as core_reference

    q, k_ctx, v_ctx, k_buf, v_buf = p.tensors(inputs)
    paths, scale = min(CHECK_PATHS, case["S"]), inputs.extra["scale"]
    kc, vc = (t[:1].to(torch.float64) for t in (k_ctx, v_ctx))
    outs, lses = [], []
    # One path at a time: teacher-forcing scores of one path are [H, 2*Nt, Nc + Nt].
    for s in range(paths):
        qs, kb, vb = (t[:1, s : s + 1].to(torch.float64) for t in (q, k_buf, v_buf))
        if mode == DECODE:
            out, lse = core_reference.shared_context_attention(
                qs, kc, vc, kb, vb, buffer_len=case["T"], scale=scale
            )
        else:
            out, lse = core_reference.teacher_forcing_attention(qs, kc, vc, kb, vb, scale=scale)
        outs.append(out)
        lses.append(lse)

    def subset(t: torch.Tensor) -> torch.Tensor:
        return t[:1, :paths]

    return {
        "out": Check(torch.cat(outs, dim=1), subset),
        "lse": Check(torch.cat(lses, dim=1), subset),
    }


# ---------------------------------------------------------------------------------------
# the floor: copy bandwidth, GEMM rate and launch cost measured once per run


def calibrate(cfg: RunConfig) -> dict[str, Any]:
    return floor.calibrate(cfg, harness.smoke_dtype(cfg))


def annotate(case, mode, rows, calibration, cfg) -> None:
    """Per row: floor, time / floor, ratios to SDPA and to the fastest flex variant."""
    nbytes = _floor_bytes(case, harness.smoke_dtype(cfg).itemsize)
    flops = forward_flops(case)
    least, bound = floor.floor_us(nbytes, flops, calibration)
    launch, graph_launch = calibration.get("launch_us"), calibration.get("graph_launch_us")
    ms = {r["provider"]: r["ms"] for r in rows if r["ms"]}
    flex = [name for name in FLEX_OF_MODE[mode] if name in ms]
    best_flex = min(flex, key=ms.__getitem__) if flex else None
    sdpa = SDPA_OF_MODE[mode]
    for r in rows:
        us = r["ms"] * 1e3 if r["ms"] else None
        plus_launch = least + launch if least is not None and launch is not None else None
        plus_graph = least + graph_launch if least is not None and graph_launch else None
        r.update(
            us=us,
            floor_bytes=nbytes,
            floor_flops=flops,
            floor_bound=bound,
            floor_us=least,
            floor_plus_launch_us=plus_launch,
            floor_plus_graph_launch_us=plus_graph,
            ratio_to_floor=us / least if us and least else None,
            ratio_to_floor_plus_launch=us / plus_launch if us and plus_launch else None,
            sdpa_provider=sdpa,
            speedup_vs_sdpa=ms[sdpa] / r["ms"] if us and sdpa in ms else None,
            best_flex=best_flex,
            speedup_vs_best_flex=ms[best_flex] / r["ms"] if us and best_flex else None,
        )


TABLE_COLUMNS = [
    {"title": "µs", "key": "us", "format": ".4g"},
    {"title": "vs SDPA", "key": "speedup_vs_sdpa", "format": ".3g", "suffix": "x"},
    {"title": "vs best flex", "key": "speedup_vs_best_flex", "format": ".3g", "suffix": "x"},
    {"title": "floor µs", "key": "floor_us", "format": ".3g"},
    {"title": "/ floor", "key": "ratio_to_floor", "format": ".3g"},
    {"title": "floor+launch µs", "key": "floor_plus_launch_us", "format": ".3g"},
]
TABLE_NOTES = [
    "vs SDPA = sdpa-materialised (decode) or sdpa-mask (teacher_forcing) µs / provider µs; "
    "vs best flex = the fastest of flex-materialised, flex-split (decode) or flex-tf "
    "(teacher_forcing) / provider; floor = max(bytes / copy bandwidth, FLOPs / GEMM rate) "
    "measured in this run (header.calibration); / floor = provider µs / floor; "
    "floor+launch = floor + one empty Triton launch from Python.",
]
DECODE_ONLY, TF_ONLY = (DECODE,), (TEACHER_FORCING,)

SUITE = harness.register_suite(
    Suite.from_module(
        __name__,
        name="shared_context",
        description=(
            "shared-context joint sampling: decode (q [G, S, H, 1, D] over the shared context "
            "[G, H_kv, Nc, D] and per-path buffers [G, S, H_kv, T_cap, D], T valid) and "
            "teacher forcing (q [G, S, H, 2*Nt, D], TeacherForcingMask), forward, bf16"
        ),
        providers=by_name(
            Provider(
                "tabattn",
                p.make_tabattn,
                "tabattn_triton.ops.shared_context.shared_context_attention / "
                "teacher_forcing_attention (num_splits automatic)",
            ),
            Provider(
                "tabattn-graph",
                p.make_tabattn_graph,
                "tabattn decode, one call captured in a CUDA graph (after warm-up on a "
                "side stream); graph.replay() timed",
                modes=DECODE_ONLY,
            ),
            Provider(
                "sdpa-materialised",
                p.make_sdpa_materialised,
                "SDPA (default backend) on per-path K/V [G*S, H_kv, Nc+T, D] built once "
                "outside timing, q [G*S, H, 1, D], no mask",
                modes=DECODE_ONLY,
            ),
            Provider(
                "sdpa-concat",
                p.make_sdpa_concat,
                "the naive loop's step: torch.cat(context expanded to every path, "
                "buffer) then SDPA, both timed",
                modes=DECODE_ONLY,
            ),
            Provider(
                "flex-materialised",
                p.make_flex_materialised,
                "torch.compile(flex_attention) with LSE on the per-path materialised "
                "K/V, no block mask",
                modes=DECODE_ONLY,
            ),
            Provider(
                "flex-split",
                p.make_flex_split,
                "split-merge: one flex_attention over the context with all S paths "
                "folded into query rows [G, H, S*Lq, D], one per-path flex over the T "
                "buffer rows, merged by tabattn_core.reference.merge_states; the whole "
                "step in one torch.compile(dynamic=False)",
                modes=DECODE_ONLY,
            ),
            Provider(
                "flex-tf",
                p.make_flex_tf,
                "torch.compile(flex_attention) with LSE and a BlockMask from "
                "TeacherForcingMask(Nt, Nc).mask_mod() (built once), per-path K/V "
                "[S, H_kv, Nc+Nt, D], q [S, H, 2Nt, D]",
                modes=TF_ONLY,
            ),
            Provider(
                "sdpa-mask",
                p.make_sdpa_mask,
                "SDPA (default backend) with the dense boolean TeacherForcingMask on "
                "the per-path K/V",
                modes=TF_ONLY,
            ),
            Provider(
                "reference",
                p.make_reference,
                "tabattn_core.reference.shared_context_attention / "
                "teacher_forcing_attention (dense, fp32 softmax)",
            ),
        ),
        modes=MODES,
        header_extra={
            "plot": {"metric": "us", "yscale": "log", "floor": "floor_us"},
            "table_columns": TABLE_COLUMNS,
            "table_notes": TABLE_NOTES,
            "floor_method": (
                "floor_us = max(floor_bytes / copy bandwidth, floor_flops / GEMM rate); "
                "floor_bytes = element size x (context K/V once + the valid buffer K/V + q "
                "+ out); floor_flops = forward FLOPs; " + floor.METHOD
            ),
        },
        reference_method=(
            "fp64 run of tabattn_core.reference.shared_context_attention / "
            f"teacher_forcing_attention on the first dataset's first {CHECK_PATHS} sample "
            "paths, all heads and query rows, from the same inputs: out and lse. Error = "
            "||x - ref|| / ||ref|| (tabattn_core.testing.rel_error), bound REL_TOL[dtype]."
        ),
    )
)
