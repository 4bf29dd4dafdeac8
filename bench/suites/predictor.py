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

Timing: end to end. Every call of a provider is wrapped in the host clock, with
`torch.cuda.synchronize()` before and after; `e2e_ms` is the median over every call after
the first (the correctness call, which is the warm-up: autotuning, compilation, and for
`triton-graph` the capture), `first_call_ms` that first call's time; these are the
harness's own timed calls (do_bench's on CUDA, a couple on CPU) and its peak-memory call.
`ms` stays the harness's figure (do_bench median; each call ends with a synchronize, so it
spans the whole call as well). Sample rows add `e2e_step_ms` = e2e_ms / Nt.

Peer: each float32 row carries `peer_ms`, the peer implementation's (AR-nanoTabPFN, triton
backend, float32, default config, shared context) figure for that case and mode, measured
in another run on an H200, not in this run, and `vs_peer` = peer_ms / e2e_ms (above 1:
faster than the peer). None where the peer failed or was not measured (`peer_note`).

Correctness before timing (a provider over its bound is `failed` and not timed). The
harness compares one number per call: error / bound (expected 0, bound 1), so the `max rel
err` column reads as the fraction of the bound; `check` holds the measured value and bound.
- density: max |log p - fp64| in nats over the first CHECK_ROWS rows, where fp64 is the
  torch backend run in float64 (same weights, same inputs). float32: bound 5e-3 nats (dots
  may run in TF32). bfloat16: FA3's rule, the bound is 2x the error of the torch backend
  run in bfloat16 on the same rows, + 1e-2 (as test_gpu_golden_joint_density).
- sample: shape [B, Nt] and finite; `triton-graph` in float32 also within 1e-3 of the
  `triton` backend's eager samples with the same generator seed (computed when first
  needed). The torch backend's samples are not compared with the kernels' (its rounding
  differs, so a mixture component choice may flip).

The `torch` provider is skipped where one of its attention calls would need more than
TORCH_MAX_BYTES (dense fp32 scores, their softmax, and the context K/V its broadcast matmul
copies for every sample path in a slice): the sample case (4096, 4096, 128) would take
~19 GB per call, repeated Nt x n_layers times per sample.
"""

from __future__ import annotations

import copy
import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from bench.harness import (
    Check,
    Inputs,
    Provider,
    RunConfig,
    Suite,
    Unavailable,
    need_gpu_or_interpreter,
    register_suite,
    sync_device,
)

SAMPLE, DENSITY = "sample", "density"
MODES = (SAMPLE, DENSITY)
SIZES = ((64, 256, 16), (256, 1024, 32), (1024, 1024, 64), (512, 4096, 64), (4096, 4096, 128))
SMOKE_SIZES = ((3, 9, 4),)  # Nt > the smoke model's buffer_size: the AR tokens wrap
DTYPES = ("float32", "bfloat16")
NUM_COLUMNS = 5
SMOKE_MODEL = {
    "d_model": 32,
    "n_heads": 2,
    "n_layers": 2,
    "d_ff": 48,
    "buffer_size": 3,
    "num_components": 3,
}
MODEL_SEED, SAMPLE_SEED = 0, 1234
CHECK_ROWS = 4  # density: rows compared with the fp64 run
FLOAT32_DENSITY_NATS = 5e-3
BF16_SLACK_NATS = 1e-2
GRAPH_SAMPLE_TOL = 1e-3  # triton-graph vs triton eager samples, float32
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


def _cases(cfg: RunConfig) -> list[dict[str, Any]]:
    sizes = SMOKE_SIZES if cfg.smoke else SIZES
    return [
        {
            "mode": mode,
            "dtype": dtype,
            "B": b,
            "Nc": nc,
            "Nt": nt,
            "C": NUM_COLUMNS,
            "tiny": cfg.smoke,
        }
        for dtype in DTYPES
        for mode in MODES
        for b, nc, nt in sizes
    ]


def _dtype_of(case: dict[str, Any]) -> torch.dtype:
    return getattr(torch, case["dtype"])


@functools.cache
def _master(tiny: bool):
    """The float32 model on the CPU, built from MODEL_SEED (random weights)."""
    from tabpfn_infer.model import ARTabPFN

    torch.manual_seed(MODEL_SEED)
    return ARTabPFN(**(SMOKE_MODEL if tiny else {})).eval()


@functools.cache
def _model(tiny: bool, dtype: torch.dtype, device: torch.device):
    return copy.deepcopy(_master(tiny)).to(device=device, dtype=dtype)


def _make_inputs(case: dict[str, Any], cfg: RunConfig, seed: int) -> Inputs:
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


def _call(case: dict[str, Any], inputs: Inputs, predictor) -> Callable[[], torch.Tensor]:
    d = inputs.extra["data"]
    xc, yc, xt, yt = d["x_context"], d["y_context"], d["x_target"], d["y_target"]
    if case["mode"] == DENSITY:
        return lambda: predictor.evaluate_joint_density(xc, yc, xt, yt)
    device = xt.device

    def sample() -> torch.Tensor:
        gen = torch.Generator(device=device).manual_seed(SAMPLE_SEED)
        return predictor.sample_sequence(xc, yc, xt, generator=gen)

    return sample


def _forward_flops(case: dict[str, Any]) -> float:
    """Model FLOPs of one call: 2 per multiply-add of the projections, feed-forward and head,
    and 4 * d_model per (row, visible key) pair and layer for attention. sample: the Nc
    context rows see Nc keys; step 0 one row, steps t >= 1 two rows, each seeing Nc + t keys.
    density: context, then 2 Nt rows per path seeing Nc keys and Nt^2 buffer keys in all."""
    model = _master(case["tiny"])
    d, layers = model.d_model, len(model.backbone.layers)
    d_ff, k = model.head.head[0].out_features, model.head.mean_bias.numel()
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


def _torch_attention_bytes(case: dict[str, Any]) -> int:
    """Working set of the torch backend's largest attention call: for the sample paths of
    one slice (`tabpfn_infer.predictor.routing.split_call` keeps their scores under SCORE_BUDGET)
    the fp32 scores, their exponentials and probabilities, and the context K/V that the
    broadcast matmul copies for every path."""
    from tabpfn_infer.predictor import SCORE_BUDGET

    model = _master(case["tiny"])
    h, dh = model.n_heads, model.d_model // model.n_heads
    rows = 2 if case["mode"] == SAMPLE else 2 * case["Nt"]
    keys = case["Nc"] + case["Nt"]
    scores = 4 * h * rows * keys
    paths = min(case["B"], max(1, SCORE_BUDGET // scores))
    return paths * (3 * scores + 2 * 4 * h * keys * dh)


# ---------------------------------------------------------------------------------------
# providers: each call timed on the host clock; the correctness check reads which ran


@dataclass
class _Run:
    """One provider on one case: host-clock seconds per call, and its correctness check."""

    provider: str
    seconds: list[float] = field(default_factory=list)
    check: dict[str, Any] = field(default_factory=dict)


_RUNS: dict[tuple[str, str, str], _Run] = {}  # (shape label, mode, provider); read by annotate


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
    need_gpu_or_interpreter(torch.empty(0, device=cfg.device, dtype=_dtype_of(case)), backend)
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
        model = _model(case["tiny"], _dtype_of(case), cfg.device)
        predictor = ARTabPFNPredictor(
            model, backend=backend, cuda_graph=graph, fp32_precision=precision
        )
        call = _call(case, inputs, predictor)
        method = "sample_sequence" if case["mode"] == SAMPLE else "evaluate_joint_density"
        run = _RUNS[(_shape_label(case), case["mode"], name)] = _Run(name)

        def fn():
            inputs.extra["last_run"] = run  # the check (Check.select) reads who ran
            sync_device(cfg.device)
            start = time.perf_counter()
            out = call()
            sync_device(cfg.device)
            run.seconds.append(time.perf_counter() - start)
            if graph and method not in predictor.captured_methods:
                raise RuntimeError("the CUDA-graph capture was refused: the call ran eagerly")
            return out, None

        return fn

    return make


# ---------------------------------------------------------------------------------------
# correctness: error / bound of the provider that ran last


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _density_reference(case: dict[str, Any], inputs: Inputs, cfg: RunConfig):
    """(rows, their fp64 densities, the bound): the torch backend in float64 on the first
    CHECK_ROWS rows, and the bound in nats with its rule."""
    from tabpfn_infer.predictor import ARTabPFNPredictor

    rows = min(CHECK_ROWS, case["B"])
    first = {k: t[:rows] for k, t in inputs.extra["data"].items()}

    def densities(dtype: torch.dtype) -> torch.Tensor:
        model = _model(case["tiny"], dtype, cfg.device)
        return ARTabPFNPredictor(model, backend="torch").evaluate_joint_density(
            *(first[k].to(dtype) for k in ("x_context", "y_context", "x_target", "y_target"))
        )

    exact = densities(torch.float64)
    if _dtype_of(case) == torch.float32:
        bound = {"rule": "max |log p - fp64| <= 5e-3 nats", "bound": FLOAT32_DENSITY_NATS}
    else:
        torch_error = _max_abs(densities(_dtype_of(case)), exact)
        bound = {
            "rule": "max |log p - fp64| <= 2 x the torch backend's at this dtype + 1e-2 nats",
            "bound": 2 * torch_error + BF16_SLACK_NATS,
            "torch_error": torch_error,
        }
    return rows, exact, bound


def _eager_samples(case: dict[str, Any], inputs: Inputs, cfg: RunConfig) -> torch.Tensor:
    """The triton backend's eager samples (same seed), computed once per case."""
    if "eager_samples" not in inputs.extra:
        from tabpfn_infer.predictor import ARTabPFNPredictor

        model = _model(case["tiny"], _dtype_of(case), cfg.device)
        eager = ARTabPFNPredictor(model, backend="triton", cuda_graph=False)
        inputs.extra["eager_samples"] = _call(case, inputs, eager)()
    return inputs.extra["eager_samples"]


def _verdict(case: dict[str, Any], inputs: Inputs, density: tuple | None):
    """Check.select: the output of the provider that ran last -> [error / bound] (fp64; inf
    for a wrong shape or a non-finite value); records the measured value on its _Run."""
    cfg: RunConfig = inputs.extra["cfg"]

    def select(got: torch.Tensor) -> torch.Tensor:
        run: _Run = inputs.extra["last_run"]
        shape = (case["B"], case["Nt"])
        if tuple(got.shape) != shape or not bool(torch.isfinite(got).all()):
            run.check = {"rule": f"shape {list(shape)} and finite", "measured": float("inf")}
            return torch.full((1,), float("inf"), dtype=torch.float64)
        if density is not None:
            rows, exact, bound = density
            measured = _max_abs(got[:rows], exact)
        elif run.provider == "triton-graph" and _dtype_of(case) == torch.float32:
            measured = _max_abs(got, _eager_samples(case, inputs, cfg))
            bound = {
                "rule": "finite; max |sample - triton eager sample| <= 1e-3",
                "bound": GRAPH_SAMPLE_TOL,
            }
        else:
            run.check = {"rule": f"shape {list(shape)} and finite", "measured": 0.0}
            return torch.zeros(1, dtype=torch.float64)
        run.check = {**bound, "measured": measured}
        return torch.tensor([measured / bound["bound"]], dtype=torch.float64)

    return select


def _reference(case: dict[str, Any], inputs: Inputs, mode: str, cfg: RunConfig) -> dict[str, Check]:
    density = _density_reference(case, inputs, cfg) if mode == DENSITY else None
    return {"out": Check(torch.zeros(1, dtype=torch.float64), _verdict(case, inputs, density))}


# ---------------------------------------------------------------------------------------
# rows: end-to-end time, per step, the peer's figure


def _annotate(case, mode, rows, calibration, cfg) -> None:
    peer = PEER_MS.get((mode, case["B"], case["Nc"], case["Nt"]), "not measured")
    if case["dtype"] != "float32":
        peer = "peer measured in float32 only"
    for row in rows:
        run = _RUNS.pop((_shape_label(case), mode, row["provider"]), None)
        timed = run.seconds[1:] if run and row["ms"] is not None else []
        e2e = statistics.median(timed) * 1e3 if timed else None
        row["e2e_ms"] = e2e
        row["e2e_calls"] = len(timed)
        row["first_call_ms"] = run.seconds[0] * 1e3 if run and run.seconds else None
        row["e2e_step_ms"] = e2e / case["Nt"] if e2e is not None and mode == SAMPLE else None
        row["check"] = run.check if run else {}
        row["peer_ms"] = peer if isinstance(peer, float) else None
        row["peer_note"] = PEER_NOTE if isinstance(peer, float) else peer
        row["vs_peer"] = row["peer_ms"] / e2e if row["peer_ms"] and e2e else None


def _shape_label(case: dict[str, Any]) -> str:
    return f"B{case['B']} Nc{case['Nc']} Nt{case['Nt']} {case['dtype']}"


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

SUITE = register_suite(
    Suite(
        name="predictor",
        description=(
            "ARTabPFNPredictor end to end: sample_sequence and evaluate_joint_density, "
            "ARTabPFN() default config (random weights, seed 0), one context shared by B "
            "rows, C=5, float32 and bfloat16"
        ),
        cases=_cases,
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
        make_inputs=_make_inputs,
        forward_flops=_forward_flops,
        reference=_reference,
        baseline=lambda mode, cfg: "torch",
        dtype=lambda cfg: torch.float32,
        shape_label=_shape_label,
        x_label=lambda c: f"B{c['B']}\nNc{c['Nc']}\nNt{c['Nt']}",
        panel_keys=("dtype",),
        modes=MODES,
        reference_method=(
            "density: max |log p - fp64| (nats) on the first 4 rows against the torch backend "
            "in float64, bound 5e-3 (float32) or 2x the torch backend's own error at bfloat16 "
            "+ 1e-2 (FA3's rule); sample: shape and finite, and triton-graph within 1e-3 of "
            "the triton eager samples with the same seed (float32). Error = measured / bound, "
            "bound 1."
        ),
        case_modes=lambda c: (c["mode"],),
        annotate=_annotate,
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
            "flops": "model FLOPs of one call (see bench/suites/predictor.py, _forward_flops)",
            "plot": {"metric": "us", "yscale": "log"},
            "table_columns": TABLE_COLUMNS,
            "table_notes": TABLE_NOTES,
        },
    )
)
