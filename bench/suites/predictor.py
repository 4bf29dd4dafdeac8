"""Suite `predictor`: `ARTabPFNPredictor` end to end, joint sampling and joint density.

Model: `ARTabPFN()` with its default config (d_model 128, 4 heads, 6 layers, d_ff 256, K 5,
buffer_size 8) and random weights from a fixed seed (timing needs no trained weights), in
float32 or bfloat16. Per case (B, Nc, Nt): one context of Nc rows shared by all B rows
(`x_context`/`y_context` are one context expanded B times, as the peer was measured; the
predictor runs it as one dataset with B sample paths), B x Nt targets of their own, C = 5
feature columns (the model sees only a row's mean feature, so C only sets the embedding
cost; the peer's figures do not say which C it used), inputs float32 standard normal.

- mode `sample`: `sample_sequence(x_context, y_context, x_target, generator=...)` -> [B, Nt]
  (a fresh generator with the same seed every call, so every call does the same work);
- mode `density`: `evaluate_joint_density(x_context, y_context, x_target, y_target)`.

Providers: `torch` (backend "torch": the PyTorch references, split by the predictor so its
scores stay under `SCORE_BUDGET`), `triton` (backend "triton", cuda_graph=False: every
kernel launched from Python), `triton-graph` (backend "triton", cuda_graph=True, CUDA only:
the first call with these shapes warms up and captures the call's CUDA graphs, later calls
copy their inputs in and replay them; decode steps 1.. are one graph replayed per step),
`triton-graph-tf32x3` (the same with fp32_precision="tf32x3": fp32-level products instead
of the predictor's default bf16x3; float32 cases only). The PyTorch parts and the torch
provider follow torch's default float32 matmul precision ("highest").

Timing: end to end. Every call of a provider is wrapped in the host clock (`wall_ms`:
the device synchronised before and after); `e2e_ms` is the median over every call after
the first (the correctness call, which is the warm-up: autotuning, compilation, and for
`triton-graph` the capture), `first_call_ms` that first call's time; these are the
harness's own timed calls (do_bench's on CUDA, a couple on CPU) and its peak-memory call.
`ms` stays the harness's figure (do_bench median; each call ends with a synchronize, so it
spans the whole call as well). Sample rows add `e2e_step_ms` = e2e_ms / Nt.

Peer: each float32 row carries `peer_ms`, the peer implementation's (AR-nanoTabPFN, triton
backend, float32, default config, shared context) figure for that case and mode, measured
in another run on an H200, not in this run, and `vs_peer` = peer_ms / e2e_ms (above 1:
faster than the peer). None where the peer failed or was not measured (`peer_note`).

Correctness before timing (a provider over its bound is `failed` and not timed):
`bench.suites.predictor_check` (density against the float64 torch backend, samples
finite and, for `triton-graph` in float32, equal to the eager ones).

The `torch` provider is skipped where one of its attention calls would need more than
TORCH_MAX_BYTES (dense fp32 scores, their softmax, and the context K/V its broadcast matmul
copies for every sample path in a slice): the sample case (4096, 4096, 128) would take
~19 GB per call, repeated Nt x n_layers times per sample.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

from bench import harness
from bench.harness import Inputs, Provider, RunConfig, Suite, Unavailable
from bench.suites.predictor_check import (
    DENSITY,
    SAMPLE,
    SMOKE_MODEL,
    Run,
    call,
    dtype_of,
    master,
    model,
    reference,
)

MODES = (SAMPLE, DENSITY)
SIZES = ((64, 256, 16), (256, 1024, 32), (1024, 1024, 64), (512, 4096, 64), (4096, 4096, 128))
SMOKE_SIZES = ((3, 9, 4),)  # Nt > the smoke model's buffer_size: the AR tokens wrap
DTYPES = ("float32", "bfloat16")
NUM_COLUMNS = 5
TORCH_MAX_BYTES = 8 * 2**30  # torch provider: working set of one attention call
PROVIDERS = (  # name, predictor backend, cuda_graph, fp32_precision, modes
    ("torch", "torch", False, "bf16x3", MODES),
    ("triton", "triton", False, "bf16x3", MODES),
    ("triton-graph", "triton", True, "bf16x3", MODES),
    ("triton-graph-tf32x3", "triton", True, "tf32x3", MODES),
)

# The peer's triton backend, float32, H200, another run: (mode, B, Nc, Nt) -> ms or why not.
PEER_MS: dict[tuple[str, int, int, int], float | str] = {
    (SAMPLE, 64, 256, 16): 175.0,
    (SAMPLE, 256, 1024, 32): 307.0,
    (SAMPLE, 1024, 1024, 64): 650.0,
    (SAMPLE, 512, 4096, 64): 673.0,
    (DENSITY, 64, 256, 16): 17.9,
    (DENSITY, 256, 1024, 32): 23.5,
    (DENSITY, 1024, 1024, 64): "peer failed here",
    (DENSITY, 512, 4096, 64): "peer failed here",
}
PEER_NOTE = (
    "peer figure measured in another run on an H200, not in this run (AR-nanoTabPFN, "
    "backend triton_shared_context, float32, default config, context shared by all rows; "
    "its flex_attention backend failed at every size)"
)


def cases(cfg: RunConfig) -> list[dict[str, Any]]:
    sizes = SMOKE_SIZES if cfg.smoke else SIZES
    return [
        {"mode": mode, "dtype": dtype, "B": b, "Nc": nc, "Nt": nt, "C": NUM_COLUMNS,
         "tiny": cfg.smoke}
        for dtype in DTYPES
        for mode in MODES
        for b, nc, nt in sizes
    ]  # fmt: skip


def case_modes(case: dict[str, Any]) -> tuple[str, ...]:
    return (case["mode"],)


def dtype(cfg: RunConfig) -> torch.dtype:
    return torch.float32  # the header's; each case names its own


def make_inputs(case: dict[str, Any], cfg: RunConfig, seed: int) -> Inputs:
    b, nc, nt, c = (case[k] for k in ("B", "Nc", "Nt", "C"))
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(cfg.device)

    data = {
        "x_context": randn(1, nc, c).expand(b, nc, c),  # one context for all rows
        "y_context": randn(1, nc).expand(b, nc),
        "x_target": randn(b, nt, c),
        "y_target": randn(b, nt),
    }
    anchor = torch.zeros((), device=cfg.device)  # the harness syncs on grad_out's device
    return Inputs(leaves={}, grad_out=anchor, extra={"data": data, "cfg": cfg})


def forward_flops(case: dict[str, Any]) -> float:
    """Model FLOPs of one call: 2 per multiply-add of the projections, feed-forward and head,
    and 4 * d_model per (row, visible key) pair and layer for attention. sample: the Nc
    context rows see Nc keys; step 0 one row, steps t >= 1 two rows, each seeing Nc + t keys.
    density: context, then 2 Nt rows per path seeing Nc keys and Nt^2 buffer keys in all."""
    m = master(case["tiny"])
    d, layers = m.d_model, len(m.backbone.layers)
    d_ff, k = m.head.head[0].out_features, m.head.mean_bias.numel()
    b, nc, nt = case["B"], case["Nc"], case["Nt"]
    per_row = 2 * (6 * d * d + 2 * d * d_ff)  # feature v/out, q/k/v, out proj, feed-forward
    head = 2 * (d * d_ff + d_ff * 3 * k)
    if case["mode"] == SAMPLE:
        rows = nc + b * (2 * nt - 1)
        pairs = nc * nc + b * (nc * (2 * nt - 1) + nt * (nt - 1))
    else:
        rows = nc + 2 * b * nt
        pairs = nc * nc + b * (2 * nt * nc + nt * nt)
    return float(layers * (rows * per_row + 4 * d * pairs) + b * nt * head)


def shape_label(case: dict[str, Any]) -> str:
    return f"B{case['B']} Nc{case['Nc']} Nt{case['Nt']} {case['dtype']}"


def x_label(case: dict[str, Any]) -> str:
    return f"B{case['B']}\nNc{case['Nc']}\nNt{case['Nt']}"


# ---------------------------------------------------------------------------------------
# providers: each call timed on the host clock; the correctness check reads which ran


def _torch_attention_bytes(case: dict[str, Any]) -> int:
    """Working set of the torch backend's largest attention call: for the sample paths of
    one slice (`tabpfn_infer.predictor.routing.split_call` keeps their scores under SCORE_BUDGET)
    the fp32 scores, their exponentials and probabilities, and the context K/V that the
    broadcast matmul copies for every path."""
    from tabpfn_infer.predictor import SCORE_BUDGET

    m = master(case["tiny"])
    h, dh = m.n_heads, m.d_model // m.n_heads
    rows = 2 if case["mode"] == SAMPLE else 2 * case["Nt"]
    keys = case["Nc"] + case["Nt"]
    scores = 4 * h * rows * keys
    paths = min(case["B"], max(1, SCORE_BUDGET // scores))
    return paths * (3 * scores + 2 * 4 * h * keys * dh)


_RUNS: dict[tuple[str, str, str], Run] = {}  # (shape label, mode, provider); read by annotate


def _check_available(case: dict[str, Any], backend: str, graph: bool, cfg: RunConfig) -> None:
    """Raise Unavailable (with the reason) where the provider cannot run the case here."""
    from tabattn_core.checks import InputError
    from tabattn_core.registry import registry

    if graph and cfg.device.type != "cuda":
        raise Unavailable("CUDA graphs need a CUDA GPU")
    if backend == "torch":
        need = _torch_attention_bytes(case)
        if need > TORCH_MAX_BYTES:
            raise Unavailable(
                f"torch backend skipped: one attention call needs ~{need / 2**30:.1f} GiB "
                f"(dense fp32 scores and per-path context K/V; limit "
                f"{TORCH_MAX_BYTES / 2**30:.0f} GiB)"
            )
        return
    probe = torch.empty(0, device=cfg.device, dtype=dtype_of(case))
    harness.need_gpu_or_interpreter(probe, backend)
    for op in ("attention", "shared_context_attention", "teacher_forcing_attention"):
        try:
            registry.choose(backend, device=cfg.device, op=op)
        except InputError as exc:
            raise Unavailable(str(exc)) from None


def _make(name: str, backend: str, graph: bool, precision: str):
    def make(case: dict[str, Any], inputs: Inputs):
        from tabpfn_infer.predictor import ARTabPFNPredictor

        cfg: RunConfig = inputs.extra["cfg"]
        _check_available(case, backend, graph, cfg)
        if precision != "bf16x3" and case["dtype"] != "float32":
            raise Unavailable("fp32_precision applies to float32 models only")
        predictor = ARTabPFNPredictor(
            model(case["tiny"], dtype_of(case), cfg.device),
            backend=backend,
            cuda_graph=graph,
            fp32_precision=precision,
        )
        timed = call(case, inputs, predictor)
        method = "sample_sequence" if case["mode"] == SAMPLE else "evaluate_joint_density"
        run = _RUNS[(shape_label(case), case["mode"], name)] = Run(name)

        def fn():
            inputs.extra["last_run"] = run  # the check (Check.select) reads who ran
            out, ms = harness.wall_ms(timed, cfg.device)
            run.ms.append(ms)
            if graph and method not in predictor.captured_methods:
                raise RuntimeError("the CUDA-graph capture was refused: the call ran eagerly")
            return out, None

        return fn

    return make


# ---------------------------------------------------------------------------------------
# rows: end-to-end time, per step, the peer's figure


def annotate(case, mode, rows, calibration, cfg) -> None:
    peer = PEER_MS.get((mode, case["B"], case["Nc"], case["Nt"]), "not measured")
    if case["dtype"] != "float32":
        peer = "peer measured in float32 only"
    for row in rows:
        run = _RUNS.pop((shape_label(case), mode, row["provider"]), None)
        timed = run.ms[1:] if run and row["ms"] is not None else []
        e2e = statistics.median(timed) if timed else None
        row["e2e_ms"] = e2e
        row["e2e_calls"] = len(timed)
        row["first_call_ms"] = run.ms[0] if run and run.ms else None
        row["e2e_step_ms"] = e2e / case["Nt"] if e2e is not None and mode == SAMPLE else None
        row["check"] = run.check if run else {}
        row["peer_ms"] = peer if isinstance(peer, float) else None
        row["peer_note"] = PEER_NOTE if isinstance(peer, float) else peer
        row["vs_peer"] = row["peer_ms"] / e2e if row["peer_ms"] and e2e else None


TABLE_COLUMNS = [
    {"title": "e2e ms", "key": "e2e_ms", "format": ".4g"},
    {"title": "e2e ms/step", "key": "e2e_step_ms", "format": ".3g"},
    {"title": "first call ms", "key": "first_call_ms", "format": ".4g"},
    {"title": "peer ms", "key": "peer_ms", "format": ".4g"},
    {"title": "vs peer", "key": "vs_peer", "format": ".3g", "suffix": "x"},
    {"title": "check", "key": "check.measured", "format": ".2e"},
    {"title": "bound", "key": "check.bound", "format": ".2e"},
]
TABLE_NOTES = [
    "e2e ms: host clock around each call (synchronized), median of the calls after the "
    "first; ms: the harness median of the same calls (do_bench on CUDA); ms/step = e2e ms / Nt",
    "max rel err = check / bound (density: max |log p - fp64| nats; sample: triton-graph "
    "vs triton eager samples, float32)",
    "peer ms: " + PEER_NOTE + "; vs peer = peer ms / e2e ms",
]

SUITE = harness.register_suite(
    Suite.from_module(
        __name__,
        name="predictor",
        description=(
            "ARTabPFNPredictor end to end: sample_sequence and evaluate_joint_density, "
            "ARTabPFN() default config (random weights, seed 0), one context shared by B "
            "rows, C=5, float32 and bfloat16"
        ),
        providers={
            name: Provider(
                name,
                _make(name, backend, graph, precision),
                f'backend="{backend}", cuda_graph={graph}, fp32_precision="{precision}"',
                modes=modes,
                rel_tol=1.0,  # the check's error is measured / bound
            )
            for name, backend, graph, precision, modes in PROVIDERS
        },
        reference=reference,  # the check of whichever provider ran last
        baseline="torch",
        panel_keys=("dtype",),
        modes=MODES,
        reference_method=(
            "density: max |log p - fp64| (nats) on the first 4 rows against the torch backend "
            "in float64, bound 5e-3 (float32) or 2x the torch backend's own error at bfloat16 "
            "+ 1e-2 (FA3's rule); sample: shape and finite, and triton-graph within 1e-3 of "
            "the triton eager samples with the same seed (float32). Error = measured / bound, "
            "bound 1."
        ),
        header_extra={
            "dtype": "float32 and bfloat16 (per case)",
            "rel_tol": "per row: error = measured / bound, bound 1 (see reference_method)",
            "timing_e2e": (
                "host clock (time.perf_counter) around each call with torch.cuda.synchronize "
                "before and after; median of every call after the first (the check, which "
                "warms up; first_call_ms); triton-graph captures its CUDA graphs in that first "
                "call and replays them in the later calls"
            ),
            "peer": PEER_NOTE,
            "peer_ms": {f"{m} B{b} Nc{nc} Nt{nt}": v for (m, b, nc, nt), v in PEER_MS.items()},
            "model": "ARTabPFN() default config, random weights (seed 0); smoke: "
            + str(SMOKE_MODEL),
            "flops": "model FLOPs of one call (see bench/suites/predictor.py, forward_flops)",
            "plot": {"metric": "us", "yscale": "log"},
            "table_columns": TABLE_COLUMNS,
            "table_notes": TABLE_NOTES,
        },
    )
)
