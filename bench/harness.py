"""The benchmark machinery: suites, providers, the correctness check, the timer and output.

A suite module (`bench/suites/<name>.py`) defines, as functions of these names,
`cases(cfg)` (shape dicts), `make_inputs(case, cfg, seed)`, `forward_flops(case)`,
`reference(case, inputs, mode, cfg)` (what a correct provider returns, in fp64),
`baseline(mode, cfg)` (the provider that speedups are taken against; a suite with one
for every mode and device passes its name as `baseline=`), `shape_label(case)` and
`x_label(case)`; optionally `dtype(cfg)` (default `smoke_dtype`), `case_modes(case)`
(a case runs in a subset of the suite's modes), `calibrate(cfg)` (measured once per run
before the cases, e.g. bandwidth; stored in the header as `calibration`) and
`annotate(case, mode, rows, calibration, cfg)` (adds fields to the rows of one case and
mode, e.g. a roofline floor). It registers `Suite.from_module(__name__, name=...,
providers=by_name(...), ...)`; `header_extra` adds header keys (`table_columns` that
`markdown_table` appends, `plot` settings that `bench.plot` reads).

`run_suite` does, for every case and mode:

1. make the inputs (standard normal, seeded per case: `normal`);
2. compute the suite's reference;
3. for every provider: build its callable (`Provider.make(case, inputs)`; raising
   `Unavailable(reason)` skips it with that reason), run it once, compare every quantity it
   returns (out, LSE when it has one, dq/dk/dv in fwd+bwd mode) with the reference by
   `tabattn_core.testing.rel_error` under `REL_TOL[dtype]`; a provider over the bound is
   reported "failed" and is not timed;
4. time the providers that passed with `median_ms`, measure peak memory, and compute the
   speedup against the suite's baseline provider timed in the same run (`speedup`) and
   against every other provider timed on the same case (`speedup_vs`).

The timer, used by every suite and study: `median_ms` (CUDA: `triton.testing.do_bench`,
return_mode="median"; CPU: the host-clock median of a few calls after a warm-up call),
`host_median_ms` for what only the host clock sees (e.g. launch cost), `wall_ms` for one
call. Studies (`bench/studies/`) share the header (`study_header`), the JSON writer
(`write_json`) and `--device` (`resolve_device`) with the suites.

triton is imported only when timing on CUDA, never when this module is imported.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "MODES",
    "Check",
    "Inputs",
    "Provider",
    "RunConfig",
    "Suite",
    "Unavailable",
    "by_name",
    "get_suite",
    "register_suite",
    "suites",
    # inputs and checks
    "check_rows",
    "compile_static",
    "need_gpu_or_interpreter",
    "normal",
    "smoke_dtype",
    # the timer
    "host_median_ms",
    "median_ms",
    "sync_device",
    "wall_ms",
    # running and reporting
    "collect_header",
    "environment",
    "free_memory",
    "markdown_table",
    "run_suite",
    "write_json",
    # studies
    "resolve_device",
    "study_header",
    "timing_description",
]

MODES = ("fwd", "fwd+bwd")
BACKWARD_MODES = ("fwd+bwd",)  # every other mode name is timed forward only
BWD_FLOP_FACTOR = 2.5  # backward counted as 2.5x the forward (DESIGN.md, performance protocol)
DEFAULT_WARMUP_MS = 25
DEFAULT_REP_MS = 100
DEFAULT_CPU_REPS = 5
SMOKE_CPU_REPS = 3
CHECK_ROWS = 256  # query rows a one-head fp64 check covers (`check_rows`)
RECOMPILE_LIMIT = 256  # dynamo graphs per compiled function (`compile_static`)


class Unavailable(Exception):
    """Raised by `Provider.make` when a provider cannot run a case; the message says why."""


def need_gpu_or_interpreter(q: torch.Tensor, what: str) -> None:
    """Raise Unavailable unless a Triton provider can run on q's device: CUDA, or CPU under
    TRITON_INTERPRET=1 (which has no bfloat16)."""
    if q.is_cuda:
        return
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise Unavailable(f"{what} needs a CUDA GPU, or TRITON_INTERPRET=1 on CPU")
    if q.dtype == torch.bfloat16:
        raise Unavailable(f"{what}: the Triton interpreter has no bfloat16")


# A provider's callable: no arguments, returns (out, lse or None) computed from the inputs
# it closed over. In fwd+bwd mode the harness calls `out.backward(inputs.grad_out)`.
ProviderFn = Callable[[], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass(frozen=True)
class Provider:
    """One implementation to measure. `make(case, inputs)` returns its callable or raises
    `Unavailable(reason)`."""

    name: str
    make: Callable[[dict[str, Any], Inputs], ProviderFn]
    description: str = ""
    modes: tuple[str, ...] = ()  # the modes it takes part in (empty: all of the suite's)
    rel_tol: float | None = None  # its correctness bound (None: REL_TOL of the suite's dtype)

    def runs_in(self, mode: str) -> bool:
        return not self.modes or mode in self.modes


def by_name(*providers: Provider) -> dict[str, Provider]:
    """A suite's providers keyed by their names, in the order given."""
    return {p.name: p for p in providers}


@dataclass
class Inputs:
    """One case's inputs: `leaves` are the differentiable tensors (their gradients are
    checked in fwd+bwd mode, named "d" + key), `grad_out` the upstream gradient of `out`."""

    leaves: dict[str, torch.Tensor]
    grad_out: torch.Tensor
    extra: dict[str, Any] = field(default_factory=dict)

    def clear_grads(self) -> None:
        for t in self.leaves.values():
            t.grad = None


@dataclass(frozen=True)
class Check:
    """One quantity of the reference: `select(provider_tensor)` picks the part of a
    provider's full tensor that `expected` (fp64) holds."""

    expected: torch.Tensor
    select: Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class RunConfig:
    device: torch.device
    smoke: bool = False
    providers: Sequence[str] | None = None  # None: all of the suite's providers
    reps: int | None = None  # CUDA: do_bench rep budget in ms; CPU: timed calls
    seed: int = 0
    command: str = ""
    only: Sequence[str] | None = None  # keep cases whose shape label contains one of these
    graph: bool = False  # CUDA: time replays of each call captured in a CUDA graph

    @property
    def interpret(self) -> bool:
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

    @property
    def rep_ms(self) -> int:
        return self.reps if self.reps is not None else DEFAULT_REP_MS

    @property
    def warmup_ms(self) -> int:
        return max(DEFAULT_WARMUP_MS, self.rep_ms // 4)

    @property
    def cpu_reps(self) -> int:
        if self.reps is not None:
            return self.reps
        return SMOKE_CPU_REPS if self.smoke else DEFAULT_CPU_REPS


def smoke_dtype(cfg: RunConfig) -> torch.dtype:
    """bf16; fp32 for a smoke run on the CPU (the Triton interpreter has no bf16)."""
    return torch.float32 if cfg.smoke and cfg.device.type == "cpu" else torch.bfloat16


# The functions a suite module defines (`Suite.from_module`); the last four are optional.
SUITE_FUNCTIONS = (
    "cases",
    "make_inputs",
    "forward_flops",
    "reference",
    "baseline",
    "shape_label",
    "x_label",
    "dtype",
    "case_modes",
    "calibrate",
    "annotate",
)


@dataclass(frozen=True)
class Suite:
    """What a benchmark measures. All callables receive the `RunConfig` or a case dict."""

    name: str
    description: str
    cases: Callable[[RunConfig], list[dict[str, Any]]]
    providers: dict[str, Provider]
    make_inputs: Callable[[dict[str, Any], RunConfig, int], Inputs]  # (case, cfg, seed)
    forward_flops: Callable[[dict[str, Any]], float]
    reference: Callable[[dict[str, Any], Inputs, str, RunConfig], dict[str, Check]]
    baseline: Callable[[str, RunConfig], str] | str  # (mode, cfg) -> provider, or one name
    shape_label: Callable[[dict[str, Any]], str]  # row label in the table
    x_label: Callable[[dict[str, Any]], str]  # x tick of the plot
    dtype: Callable[[RunConfig], torch.dtype] = smoke_dtype
    panel_keys: tuple[str, ...] = ()  # case keys that, with the mode, make one plot panel
    modes: tuple[str, ...] = MODES
    reference_method: str = ""
    # Optional hooks (see the module docstring).
    case_modes: Callable[[dict[str, Any]], tuple[str, ...]] | None = None  # default: modes
    calibrate: Callable[[RunConfig], dict[str, Any]] | None = None
    # (case, mode, rows of that case and mode, calibration, cfg) -> None; edits the rows
    annotate: (
        Callable[[dict[str, Any], str, list[dict[str, Any]], dict[str, Any], RunConfig], None]
        | None
    ) = None
    header_extra: dict[str, Any] = field(default_factory=dict)

    def modes_of(self, case: dict[str, Any]) -> tuple[str, ...]:
        return self.modes if self.case_modes is None else self.case_modes(case)

    def baseline_of(self, mode: str, cfg: RunConfig) -> str:
        return self.baseline if isinstance(self.baseline, str) else self.baseline(mode, cfg)

    @classmethod
    def from_module(cls, module: str, **fields: Any) -> Suite:
        """The suite whose callables are the `SUITE_FUNCTIONS` that the module named
        `module` (a suite module's `__name__`) defines; `fields` give the rest (name,
        description, providers, modes, panel_keys, reference_method, header_extra) and
        win over the module's functions."""
        namespace = vars(sys.modules[module])
        found = {name: namespace[name] for name in SUITE_FUNCTIONS if name in namespace}
        return cls(**{**found, **fields})


_SUITES: dict[str, Suite] = {}


def register_suite(suite: Suite) -> Suite:
    _SUITES[suite.name] = suite
    return suite


def suites() -> dict[str, Suite]:
    import bench.suites  # noqa: F401  (registers the suites)

    return dict(_SUITES)


def get_suite(name: str) -> Suite:
    known = suites()
    if name not in known:
        raise KeyError(f"suite: expected one of {sorted(known)}, got {name!r}")
    return known[name]


# ---------------------------------------------------------------------------------------
# inputs, checks and compiled baselines shared by suites


def normal(cfg: RunConfig, seed: int, dtype: torch.dtype) -> Callable[..., torch.Tensor]:
    """`randn(*shape, scale=1.0)`: standard normal draws in fp32 from one generator seeded
    with `seed` on cfg's device, times `scale`, cast to `dtype`."""
    gen = torch.Generator(device=cfg.device).manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        t = torch.randn(*shape, generator=gen, device=cfg.device, dtype=torch.float32)
        return (t if scale == 1.0 else t * scale).to(dtype)

    return randn


def check_rows(n: int, seed: int) -> torch.Tensor:
    """The rows an fp64 check covers: all of `n` up to CHECK_ROWS, else CHECK_ROWS seeded
    random ones with the first and the last, sorted."""
    if n <= CHECK_ROWS:
        return torch.arange(n)
    gen = torch.Generator().manual_seed(seed)
    picked = torch.randperm(n - 2, generator=gen)[: CHECK_ROWS - 2] + 1
    return torch.cat([torch.tensor([0, n - 1]), picked]).sort().values


def compile_static(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`torch.compile(fn, dynamic=False)`, dynamo's recompile limit lifted to
    RECOMPILE_LIMIT: one graph per shape and mode, so that no case falls back to the eager
    (for flex_attention: dense, memory-hungry) path."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(RECOMPILE_LIMIT, getattr(dynamo_config, name)))
    return torch.compile(fn, dynamic=False)


# ---------------------------------------------------------------------------------------
# header


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


COMMIT_ENV = "BENCH_GIT_COMMIT"  # used where the tree has no .git (e.g. the device machine)


def _git_commit() -> str:
    """BENCH_GIT_COMMIT when set (a machine whose checkout lacks the history, or a stale
    one), else `git rev-parse HEAD` with "-dirty" for uncommitted changes."""
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
            check=True,
        )
        commit = out.stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(cfg: RunConfig) -> dict[str, Any]:
    """Where and how figures were taken: the device, versions, commit, date and command."""
    if cfg.device.type == "cuda":
        props = torch.cuda.get_device_properties(cfg.device)
        gpu, capability = props.name, f"{props.major}.{props.minor}"
    else:
        gpu, capability = "cpu", "cpu"
    return {
        "gpu": gpu,
        "compute_capability": capability,
        "device": str(cfg.device),
        "torch": torch.__version__,
        "triton": _dist_version("triton", "pytorch-triton") or "unavailable",
        "cuda": torch.version.cuda or "none",
        "python": platform.python_version(),
        "host": platform.node(),
        "git_commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": cfg.command or shlex.join([sys.executable, *sys.argv]),
        "smoke": cfg.smoke,
        "triton_interpret": cfg.interpret,
    }


def collect_header(suite: Suite, cfg: RunConfig) -> dict[str, Any]:
    """A suite result's header: the environment, then how the suite checks and times."""
    return {
        "suite": suite.name,
        "description": suite.description,
        **environment(cfg),
        "dtype": str(suite.dtype(cfg)).removeprefix("torch."),
        "rel_tol": _tolerance(suite.dtype(cfg)),
        "seed": cfg.seed,
        "timing": timing_description(cfg),
        "flops": f"forward as declared by the suite; fwd+bwd = forward * {1 + BWD_FLOP_FACTOR}",
        "baselines": {mode: suite.baseline_of(mode, cfg) for mode in suite.modes},
        "providers": {name: p.description for name, p in suite.providers.items()},
        "reference_method": suite.reference_method,
        "panel_keys": list(suite.panel_keys),
        **suite.header_extra,
    }


def study_header(name: str, cfg: RunConfig, **fields: Any) -> dict[str, Any]:
    """A study's result header: its name (key `suite`), the environment, the seed, then
    the study's `fields`."""
    return {"suite": name, **environment(cfg), "seed": cfg.seed, **fields}


def timing_description(cfg: RunConfig) -> dict[str, Any]:
    """How `median_ms` times under cfg (a header's `timing`)."""
    if cfg.device.type == "cuda":
        return {
            "method": "triton.testing.do_bench",
            "return_mode": "median",
            "warmup_ms": cfg.warmup_ms,
            "rep_ms": cfg.rep_ms,
            "cuda_graph": cfg.graph,
            **(
                {
                    "graph_note": "each provider's call (forward, or forward and backward) "
                    "captured once in a CUDA graph after one warm-up call on a side stream; "
                    "its replays are timed: GPU time without the Python launch cost, as in a "
                    "CUDA-graph training step. Correctness and peak memory: eager calls."
                }
                if cfg.graph
                else {}
            ),
        }
    return {"method": "time.perf_counter median", "reps": cfg.cpu_reps, "warmup_calls": 1}


def _tolerance(dtype: torch.dtype) -> float:
    from tabattn_core.testing import REL_TOL

    return REL_TOL[dtype]


# ---------------------------------------------------------------------------------------
# running one provider


def _step(fn: ProviderFn, inputs: Inputs, mode: str) -> Callable[[], Any]:
    """The timed call: forward then backward in a backward mode ("fwd+bwd"), else forward
    only (no autograd graph)."""
    if mode in BACKWARD_MODES:

        def forward_backward() -> Any:
            out, _ = fn()
            out.backward(inputs.grad_out)

        return forward_backward

    def forward() -> Any:
        with torch.no_grad():
            return fn()

    return forward


def _run_for_check(fn: ProviderFn, inputs: Inputs, mode: str) -> dict[str, torch.Tensor]:
    inputs.clear_grads()
    if mode not in BACKWARD_MODES:
        with torch.no_grad():
            out, lse = fn()
        got = {"out": out}
    else:
        out, lse = fn()
        out.backward(inputs.grad_out)
        got = {"out": out.detach()}
        for name, t in inputs.leaves.items():
            if t.grad is None:
                raise RuntimeError(f"no gradient reached input {name!r}")
            got["d" + name] = t.grad.detach().clone()
        inputs.clear_grads()
    if lse is not None:
        got["lse"] = lse.detach()
    _sync(inputs)
    return got


def _compare(got: dict[str, torch.Tensor], ref: dict[str, Check]) -> dict[str, float]:
    """Relative error of every reference quantity the provider returned. `lse` is compared
    only when the provider has one; every other reference quantity is required."""
    from tabattn_core.testing import rel_error

    errors = {}
    for name, check in ref.items():
        if name not in got:
            if name == "lse":
                continue
            raise RuntimeError(f"provider returned no {name!r}")
        errors[name] = rel_error(check.select(got[name]), check.expected)
    return errors


def sync_device(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA; nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sync(inputs: Inputs) -> None:
    sync_device(inputs.grad_out.device)


def wall_ms(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """(fn(), milliseconds) of one call on the host clock, the device synchronised before
    and after it."""
    sync_device(device)
    start = time.perf_counter()
    result = fn()
    sync_device(device)
    return result, (time.perf_counter() - start) * 1e3


def host_median_ms(
    fn: Callable[[], Any],
    device: torch.device,
    reps: int,
    *,
    warmup_calls: int = 1,
    before_each: Callable[[], None] | None = None,
) -> float:
    """Median milliseconds per call on the host clock: `warmup_calls` calls, then `reps`
    timed calls, each followed by a device synchronise; `before_each()` runs untimed
    before every call (warm-up calls included)."""
    for _ in range(warmup_calls):
        if before_each is not None:
            before_each()
        fn()
    sync_device(device)
    times = []
    for _ in range(max(1, reps)):
        if before_each is not None:
            before_each()
        start = time.perf_counter()
        fn()
        sync_device(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def median_ms(
    fn: Callable[[], Any],
    cfg: RunConfig,
    *,
    grad_to_none: Sequence[torch.Tensor] | None = None,
    warmup_ms: float | None = None,
    rep_ms: float | None = None,
    cpu_reps: int | None = None,
    cpu_warmup_calls: int = 1,
) -> float:
    """The timer: median milliseconds per call of `fn`, whose result the caller checked
    first. CUDA: `triton.testing.do_bench(fn, warmup, rep, grad_to_none,
    return_mode="median")` (L2 flushed before each call) with cfg's budgets unless
    `warmup_ms` / `rep_ms` are given. CPU: `host_median_ms` over cfg.cpu_reps calls after
    `cpu_warmup_calls` (unless `cpu_reps` is given). The gradients of `grad_to_none` are
    reset before every call."""
    if cfg.device.type == "cuda":
        from triton.testing import do_bench

        return float(
            do_bench(
                fn,
                warmup=cfg.warmup_ms if warmup_ms is None else warmup_ms,
                rep=cfg.rep_ms if rep_ms is None else rep_ms,
                grad_to_none=grad_to_none,
                return_mode="median",
            )
        )

    def reset() -> None:
        for t in grad_to_none or ():
            t.grad = None

    reps = cfg.cpu_reps if cpu_reps is None else cpu_reps
    return host_median_ms(fn, cfg.device, reps, warmup_calls=cpu_warmup_calls, before_each=reset)


def _time(step: Callable[[], Any], inputs: Inputs, mode: str, cfg: RunConfig) -> float:
    """Median milliseconds per call of a provider's step (`median_ms`)."""
    leaves = list(inputs.leaves.values()) if mode in BACKWARD_MODES else None
    if cfg.graph and cfg.device.type == "cuda":
        # replays write the gradients the capture allocated: none to reset
        step, leaves = _graph_replay(step, inputs), None
    ms = median_ms(step, cfg, grad_to_none=leaves)
    inputs.clear_grads()
    return ms


def _graph_replay(step: Callable[[], Any], inputs: Inputs) -> Callable[[], Any]:
    """`step` captured in a CUDA graph after one warm-up call on a side stream (gradients
    cleared before each, so the capture allocates its own); returns the graph's replay."""
    from tabattn_core.graphs import capture

    inputs.clear_grads()
    return capture(step, device=inputs.grad_out.device, after_warmup=inputs.clear_grads).replay


def _peak_mb(step: Callable[[], Any], inputs: Inputs, cfg: RunConfig) -> float | None:
    """Peak memory allocated by one call above what was allocated before it (CUDA only)."""
    if cfg.device.type != "cuda":
        return None
    inputs.clear_grads()
    torch.cuda.synchronize(cfg.device)
    torch.cuda.reset_peak_memory_stats(cfg.device)
    before = torch.cuda.memory_allocated(cfg.device)
    step()
    torch.cuda.synchronize(cfg.device)
    peak = torch.cuda.max_memory_allocated(cfg.device) - before
    inputs.clear_grads()
    return peak / 2**20


def free_memory(device: torch.device) -> None:
    """Return the caching allocator's free blocks (CUDA) after the queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _error_text(exc: BaseException, limit: int = 500) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class _NotRun:
    """A provider that will not be checked or timed on a case: `status` and why."""

    status: str  # "skipped" (Unavailable) or "error" (make raised)
    reason: str


# ---------------------------------------------------------------------------------------
# running a suite


def _selected_providers(suite: Suite, cfg: RunConfig) -> list[Provider]:
    if cfg.providers is None:
        return list(suite.providers.values())
    unknown = sorted(set(cfg.providers) - set(suite.providers))
    if unknown:
        raise KeyError(f"providers: expected names among {list(suite.providers)}, got {unknown}")
    return [p for name, p in suite.providers.items() if name in cfg.providers]


def _progress(items: list, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a requirement, but a missing progress bar is no failure
        return items
    return tqdm(items, desc=desc, unit="case", file=sys.stderr, dynamic_ncols=True)


def run_suite(
    suite: Suite,
    cfg: RunConfig,
    on_case: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run every case, mode and provider; returns {"header": ..., "rows": [...]}.

    `on_case(partial_result)` is called after each case (e.g. to save partial results
    before a wall-clock limit cuts the run short)."""
    providers = _selected_providers(suite, cfg)
    dtype = suite.dtype(cfg)
    tol = _tolerance(dtype)
    header = collect_header(suite, cfg)
    calibration: dict[str, Any] = {}
    if suite.calibrate is not None:
        calibration = suite.calibrate(cfg)
        header["calibration"] = calibration
    rows: list[dict[str, Any]] = []
    cases = suite.cases(cfg)
    if cfg.only:
        cases = [c for c in cases if any(part in suite.shape_label(c) for part in cfg.only)]
    for index, case in enumerate(_progress(cases, suite.name)):
        modes = suite.modes_of(case)
        inputs = suite.make_inputs(case, cfg, cfg.seed + index)
        fns: dict[str, ProviderFn | _NotRun] = {}
        for provider in providers:
            if not any(provider.runs_in(mode) for mode in modes):
                continue
            try:
                fns[provider.name] = provider.make(case, inputs)
            except Unavailable as exc:
                fns[provider.name] = _NotRun("skipped", str(exc))
            except Exception as exc:  # one provider's failure must not stop the others
                fns[provider.name] = _NotRun("error", "while preparing: " + _error_text(exc))
                free_memory(cfg.device)
        for mode in modes:
            ref = suite.reference(case, inputs, mode, cfg)
            mode_rows = [
                _measure(
                    suite,
                    case,
                    mode,
                    provider.name,
                    fns[provider.name],
                    inputs,
                    ref,
                    tol if provider.rel_tol is None else provider.rel_tol,
                    cfg,
                )
                for provider in providers
                if provider.runs_in(mode)
            ]
            baseline = suite.baseline_of(mode, cfg)
            base_ms = next(
                (r["ms"] for r in mode_rows if r["provider"] == baseline and r["ms"] is not None),
                None,
            )
            timed = {r["provider"]: r["ms"] for r in mode_rows if r["ms"]}
            for row in mode_rows:
                row["baseline"] = baseline
                if base_ms is not None and row["ms"] is not None:
                    row["speedup"] = base_ms / row["ms"]
                if row["ms"]:
                    row["speedup_vs"] = {
                        name: ms / row["ms"]
                        for name, ms in timed.items()
                        if name != row["provider"]
                    }
            if suite.annotate is not None:
                suite.annotate(case, mode, mode_rows, calibration, cfg)
            rows.extend(mode_rows)
            del ref
            free_memory(cfg.device)
        del inputs, fns
        free_memory(cfg.device)
        if on_case is not None:
            on_case({"header": header, "rows": rows, "complete": index + 1 == len(cases)})
    return {"header": header, "rows": rows, "complete": True}


def _measure(
    suite: Suite,
    case: dict[str, Any],
    mode: str,
    name: str,
    fn: ProviderFn | _NotRun,
    inputs: Inputs,
    ref: dict[str, Check],
    tol: float,
    cfg: RunConfig,
) -> dict[str, Any]:
    flops = suite.forward_flops(case) * (1 + BWD_FLOP_FACTOR if mode in BACKWARD_MODES else 1)
    row: dict[str, Any] = {
        "case": dict(case),
        "shape": suite.shape_label(case),
        "x": suite.x_label(case),
        "panel": {key: case[key] for key in suite.panel_keys},
        "provider": name,
        "mode": mode,
        "status": "skipped",
        "reason": None,
        "errors": {},
        "max_error": None,
        "rel_tol": tol,
        "ms": None,
        "tflops": None,
        "flops": flops,
        "peak_mb": None,
        "baseline": None,
        "speedup": None,
        "speedup_vs": {},
    }
    if isinstance(fn, _NotRun):
        row.update(status=fn.status, reason=fn.reason)
        return row
    step = _step(fn, inputs, mode)
    try:
        got = _run_for_check(fn, inputs, mode)
        errors = _compare(got, ref)
        del got
    except Exception as exc:  # one provider's failure must not stop the others
        row.update(status="error", reason=_error_text(exc))
        inputs.clear_grads()
        free_memory(cfg.device)
        return row
    row["errors"] = errors
    row["max_error"] = max(errors.values()) if errors else None
    bad = {k: e for k, e in errors.items() if not e <= tol}
    if bad:
        worst = ", ".join(f"{k} {e:.3e}" for k, e in bad.items())
        row.update(status="failed", reason=f"relative error over {tol:.0e}: {worst}; not timed")
        return row
    try:
        ms = _time(step, inputs, mode, cfg)
        peak = _peak_mb(step, inputs, cfg)
    except Exception as exc:
        row.update(status="error", reason="while timing: " + _error_text(exc))
        inputs.clear_grads()
        free_memory(cfg.device)
        return row
    row.update(
        status="ok",
        ms=ms,
        tflops=flops / (ms * 1e-3) / 1e12 if ms > 0 else math.inf,
        peak_mb=peak,
    )
    return row


# ---------------------------------------------------------------------------------------
# reporting


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _lookup(row: dict[str, Any], key: str) -> Any:
    """`row[a][b]` for key "a.b" (None where a part is missing)."""
    value: Any = row
    for part in key.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _extra_cell(row: dict[str, Any], column: dict[str, Any]) -> str:
    """One cell of a `table_columns` entry {title, key, format, scale?, suffix?}."""
    value = _lookup(row, column["key"])
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "–" if value is None else str(value)
    text = format(value * column.get("scale", 1), column.get("format", ".4g"))
    return text + column.get("suffix", "")


def markdown_table(result: dict[str, Any]) -> str:
    """The rows as a markdown table, then the reasons for rows that were not timed.

    A header's `table_columns` (list of {title, key, format, scale, suffix}; key a row
    field, "a.b" for a nested one) are appended as columns, its `table_notes` printed above
    the table."""
    h = result["header"]
    extra = list(h.get("table_columns", []))
    titles = "".join(f" {c['title']} |" for c in extra)
    lines = [
        "| shape | mode | provider | status | ms | TFLOP/s | speedup | peak MB | max rel err |"
        + titles,
        "|---|---|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(extra),
    ]
    notes: dict[tuple[str, str, str], list[str]] = {}
    for r in result["rows"]:
        speedup = _fmt(r["speedup"], ".3g") + ("x" if r["speedup"] is not None else "")
        cells = "".join(f" {_extra_cell(r, c)} |" for c in extra)
        lines.append(
            f"| {r['shape']} | {r['mode']} | {r['provider']} | {r['status']} | "
            f"{_fmt(r['ms'], '.4g')} | {_fmt(r['tflops'], '.4g')} | {speedup} | "
            f"{_fmt(r['peak_mb'], '.1f')} | {_fmt(r['max_error'], '.2e')} |" + cells
        )
        if r["status"] != "ok":
            key = (r["provider"], r["status"], str(r["reason"]))
            notes.setdefault(key, []).append(f"{r['shape']} {r['mode']}")
    out = [
        f"## {h['suite']} — {h['gpu']} ({h['compute_capability']}), {h['dtype']}, "
        f"torch {h['torch']}, triton {h['triton']}, commit {h['git_commit'][:12]}",
        "",
        f"speedup = baseline ms / provider ms; baselines: {h['baselines']}",
        *(f"{note}" for note in h.get("table_notes", [])),
        "",
        *lines,
    ]
    if notes:
        out += ["", "Not timed:"]
        per_provider = Counter(r["provider"] for r in result["rows"])
        for (provider, status, reason), where in notes.items():
            at = "all rows" if len(where) == per_provider[provider] else ", ".join(where)
            out.append(f"- {provider} ({status}; {at}): {reason}")
    return "\n".join(out)


def _json_safe(value: Any) -> Any:
    """inf/nan as strings: strict JSON has neither."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: Path, result: dict[str, Any]) -> None:
    """A result as strict JSON (inf/nan as strings, other objects by str), one space per
    indent level; the folder is created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(result), indent=1, default=str) + "\n")


# ---------------------------------------------------------------------------------------
# the command line


def resolve_device(name: str, smoke: bool) -> torch.device:
    """`--device`: auto is CUDA when available, except the CPU for a smoke run; cuda
    raises ValueError where CUDA is unavailable."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch.cuda.is_available() is False")
    return torch.device(name)
