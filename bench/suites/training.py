"""Suite `training`: one full TransformerNP training step (forward, backward, AdamW) per call.

The model is the reference TNP (12 layers, d_model 512, 8 heads of 64, d_ff 1365, K=10
mixture components; `tabpfn_infer.training.tnp`), bf16 autocast, trained on prior tasks of B
datasets with M context and N target rows:

    small  B=32  M=64       N=500
    mid    B=4   M=10_000   N=1_000
    large  B=1   M=200_000  N=5_000   (checkpointed providers only)

Providers differ only in the backend of each kernel, block checkpointing and CUDA graphs:
`sdpa` is the all-PyTorch baseline (torch's scaled_dot_product_attention, eager PyTorch
in the compute dtype for the head and the FFN (cuBLAS), tabattn-core's fp32 loss); `attention-triton`, `head-triton`,
`mlp-triton` and `loss-triton` switch one kernel to the Triton backend; `all-triton`
switches all four; `+ckpt` recomputes each block in the backward pass; `+graph` replays the
whole step as one CUDA graph (`tabpfn_infer.training.train_tnp.TNPTrainer`).

Per call the harness times one step (mode `step`; `do_bench`, synchronised) on one fixed
batch; the rows add tokens/s = B*(M+N) / step time, the median time of each stage
(forward, backward, optimizer; CUDA events around each, eager providers only) and the
peak memory allocated during a step in total (weights, AdamW state, gradients and
activations). FLOPs are model FLOPs of a step (forward + backward, recomputation not
counted): matmuls 3x their forward, attention 3.5x (DESIGN.md).

Correctness: every provider builds the model from the same seed; the loss of its first
step (at the initial weights) is compared with the loss of the same model in fp32 without
autocast (sdpa attention, torch head/MLP/loss), under the bf16 bound. Backward and
optimizer are checked by packages/tabpfn-infer/tests/test_tnp.py's GPU tests.

Loss curves: `python -m bench.suites.training loss-curve [--steps 300] [--out DIR]`
trains `sdpa`, `all-triton` and (sm90 only) `fp8-attention+triton` from the same seed on
the same prior tasks (small shape) and writes training_loss_curve.json and .png.

Data-parallel scaling: `python -m bench.suites.training ddp-scaling [--worlds 1,2]
[--steps 40] [--out DIR]` trains `sdpa` and `all-triton` at the mid shape under torchrun
(DDP) on each number of GPUs and writes training_ddp.json and .png (`ddp_scaling`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
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
)

NUM_FEATURES = 4
LR = 3e-4
CASES = (("small", 32, 64, 500), ("mid", 4, 10_000, 1_000), ("large", 1, 200_000, 5_000))
SMOKE_CASES = (("tiny", 2, 19, 7),)
CHECKPOINTED_ONLY = ("large",)  # cases whose activations call for checkpoint_blocks
KERNEL_OPS = {"attention": "context_target_attention", "head": "grouped_mlp", "mlp": "mlp",
              "loss": "gmm_nll"}  # fmt: skip
STAGES = ("forward", "backward", "optimizer")


def _model_config(tiny: bool):
    """The reference TNP, or (smoke runs) a tiny one."""
    from tabpfn_infer.training.tnp import TNPConfig

    if tiny:
        return TNPConfig(dim_x=NUM_FEATURES, d_model=32, n_heads=2, n_layers=2, d_ff=40,
                         num_components=3)  # fmt: skip
    return TNPConfig(dim_x=NUM_FEATURES)


@dataclass(frozen=True)
class Variant:
    """Which kernels run on Triton (the rest on the all-PyTorch baseline's backends)."""

    triton: tuple[str, ...]
    checkpoint: bool = False
    graph: bool = False
    fp8_attention: bool = False  # attention through tabattn-fp8 (FP8 forward, bf16 backward)

    @property
    def name(self) -> str:
        if not self.triton:
            base = "sdpa"
        elif len(self.triton) == len(KERNEL_OPS):
            base = "all-triton"
        else:
            base = "+".join(f"{k}-triton" for k in self.triton)
        base = base.replace("all-triton", "fp8-attention+triton") if self.fp8_attention else base
        return base + ("+ckpt" if self.checkpoint else "") + ("+graph" if self.graph else "")

    def backends(self) -> dict[str, str]:
        baseline = {"attention_backend": "sdpa", "head_backend": "torch",
                    "mlp_backend": "torch", "loss_backend": "torch"}  # fmt: skip
        chosen = {**baseline, **{f"{k}_backend": "triton" for k in self.triton}}
        return {**chosen, "attention_backend": "fp8"} if self.fp8_attention else chosen


ALL = tuple(KERNEL_OPS)
VARIANTS = (
    Variant(()),
    *(Variant((kernel,)) for kernel in KERNEL_OPS),
    Variant(ALL),
    Variant(("head", "mlp", "loss")),  # every kernel but attention (SDPA picks cuDNN there)
    Variant((), checkpoint=True),
    Variant(("attention",), checkpoint=True),
    Variant(ALL, checkpoint=True),
    Variant((), graph=True),
    Variant(ALL, graph=True),
    Variant((), checkpoint=True, graph=True),
    Variant(ALL, checkpoint=True, graph=True),
)


def _cases(cfg: RunConfig) -> list[dict[str, Any]]:
    cases = SMOKE_CASES if cfg.smoke else CASES
    return [{"name": name, "B": b, "M": m, "N": n, "tiny": cfg.smoke} for name, b, m, n in cases]


def _dtype(cfg: RunConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.device.type == "cuda" else torch.float32


def _tasks(case: dict[str, Any], seed: int, device: torch.device):
    from tabpfn_infer.training.prior import sample_tasks

    gen = torch.Generator().manual_seed(seed)
    return sample_tasks(case["B"], num_context=case["M"], num_buffer=0, num_target=case["N"],
                        num_features=NUM_FEATURES, generator=gen).to(device)  # fmt: skip


def _make_inputs(case: dict[str, Any], cfg: RunConfig, seed: int) -> Inputs:
    tasks = _tasks(case, seed, cfg.device)
    anchor = torch.zeros((), device=cfg.device)  # the harness syncs on grad_out's device
    return Inputs(leaves={}, grad_out=anchor, extra={"tasks": tasks, "seed": seed, "cfg": cfg})


def _build(config, seed: int, device: torch.device):
    from tabpfn_infer.training.tnp import TransformerNP

    torch.manual_seed(seed)
    return TransformerNP(config).to(device)


def _forward_flops(case: dict[str, Any]) -> float:
    """Model FLOPs of one step: matmuls 2*MACs forward, x3 with backward; attention
    4*B*H*(M+N)*M*D forward, x3.5 with backward."""
    c = _model_config(case["tiny"])
    b, m, n = case["B"], case["M"], case["N"]
    rows, d = b * (m + n), c.d_model
    per_layer = rows * (2 * d * d + 2 * d * c.d_ff) + b * m * 2 * d * d  # q, o, mlp | k, v
    head = b * n * c.num_components * (d * c.d_ff + 3 * c.d_ff)
    matmul = 2 * (c.n_layers * per_layer + head)
    attention = 4 * b * c.n_heads * (m + n) * m * (d // c.n_heads) * c.n_layers
    return 3 * matmul + 3.5 * attention


def _reference(case: dict[str, Any], inputs: Inputs, mode: str, cfg: RunConfig) -> dict[str, Check]:
    """The loss at the initial weights in fp32 (sdpa attention, torch head/MLP/loss)."""
    config = replace(_model_config(case["tiny"]), **Variant(()).backends())
    model = _build(config, inputs.extra["seed"], cfg.device)
    t = inputs.extra["tasks"]
    with torch.no_grad():
        loss = model(t.x_context, t.y_context, t.x_target, t.y_target)
    del model
    return {"out": Check(loss.to(torch.float64).reshape(1), lambda got: got)}


# ---------------------------------------------------------------------------------------
# providers: one trainer alive at a time (the harness checks and times them one by one)


class _Clock:
    """Stage marks of eager steps: CUDA events, or perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.steps: list[list[Any]] = []
        self.peak_bytes: int | None = None

    def mark(self, marks: list[Any]) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            marks.append(event)
        else:
            marks.append(time.perf_counter())

    def stage_ms(self) -> dict[str, float] | None:
        """Median ms of each stage over the timed steps (the first, checked step left out)."""
        steps = self.steps[1:]
        if not steps:
            return None
        if self.cuda:
            torch.cuda.synchronize()
            spans = [[a.elapsed_time(b) for a, b in itertools.pairwise(s)] for s in steps]
        else:
            spans = [[(b - a) * 1e3 for a, b in itertools.pairwise(s)] for s in steps]
        return {stage: statistics.median(s[i] for s in spans) for i, stage in enumerate(STAGES)}


_ACTIVE: dict[str, Any] = {}  # {"key": (case name, provider), "trainer": TNPTrainer}
_CLOCKS: dict[tuple[str, str], _Clock] = {}  # kept after the trainer is freed, for annotate


def _trainer(case: dict[str, Any], variant: Variant, inputs: Inputs):
    from tabpfn_infer.training.train_tnp import TNPTrainer

    key = (case["name"], variant.name)
    if _ACTIVE.get("key") != key:
        _ACTIVE.clear()
        cfg: RunConfig = inputs.extra["cfg"]
        if cfg.device.type == "cuda":
            torch.cuda.empty_cache()
        config = replace(
            _model_config(case["tiny"]), **variant.backends(), checkpoint_blocks=variant.checkpoint
        )
        model = _build(config, inputs.extra["seed"], cfg.device).train()
        trainer = TNPTrainer(model, batch=case["B"], num_context=case["M"],
                             num_target=case["N"], lr=LR, cuda_graph=variant.graph)  # fmt: skip
        trainer.load(inputs.extra["tasks"])
        _ACTIVE.update(key=key, trainer=trainer)
        _CLOCKS[key] = _Clock(cfg.device)
    return _ACTIVE["trainer"], _CLOCKS[key]


def _check_available(variant: Variant, case: dict[str, Any], cfg: RunConfig) -> None:
    """Raise Unavailable (with the reason) where the variant cannot run the case here."""
    from tabattn_core.checks import InputError
    from tabattn_core.registry import OPS, registry

    if case["name"] in CHECKPOINTED_ONLY and not variant.checkpoint:
        raise Unavailable(f"{case['name']}: run with checkpoint_blocks only")
    if variant.graph and cfg.device.type != "cuda":
        raise Unavailable("CUDA graphs need a CUDA GPU")
    if cfg.smoke and cfg.interpret and variant.triton and variant != Variant(ALL):
        raise Unavailable("smoke run in the Triton interpreter: all-triton covers the kernels")
    if variant.triton:
        need_gpu_or_interpreter(torch.empty(0, device=cfg.device, dtype=_dtype(cfg)), variant.name)
    chosen = [("triton", kernel) for kernel in variant.triton]
    for backend, kernel in chosen + ([("fp8", "attention")] if variant.fp8_attention else []):
        op = KERNEL_OPS[kernel]
        if op not in OPS:
            raise Unavailable(f"tabattn-core's registry has no op {op!r} yet")
        try:
            registry.choose(backend, device=cfg.device, op=op)
        except InputError as exc:
            raise Unavailable(str(exc)) from None


def _make(variant: Variant):
    def make(case: dict[str, Any], inputs: Inputs):
        _check_available(variant, case, inputs.extra["cfg"])

        def step():
            trainer, clock = _trainer(case, variant, inputs)
            with torch.enable_grad():  # the harness calls non-backward modes under no_grad
                if variant.graph:
                    loss = trainer.step()
                else:
                    marks: list[Any] = []
                    trainer.optimizer.zero_grad(set_to_none=True)
                    clock.mark(marks)
                    loss = trainer.forward()
                    clock.mark(marks)
                    trainer.backward(loss)
                    clock.mark(marks)
                    trainer.optimizer_step()
                    clock.mark(marks)
                    clock.steps.append(marks)
            if clock.cuda:
                clock.peak_bytes = torch.cuda.max_memory_allocated()
            return loss.detach().float().reshape(1).clone(), None

        return step

    return make


def _annotate(case, mode, rows, calibration, cfg) -> None:
    tokens = case["B"] * (case["M"] + case["N"])
    for row in rows:
        clock = _CLOCKS.pop((case["name"], row["provider"]), None)
        row["tokens"] = tokens
        row["tokens_per_s"] = tokens / (row["ms"] * 1e-3) if row["ms"] else None
        row["stage_ms"] = clock.stage_ms() if clock and row["ms"] else None
        row["peak_total_mb"] = clock.peak_bytes / 2**20 if clock and clock.peak_bytes else None
    _ACTIVE.clear()


TABLE_COLUMNS = [
    {"title": "tokens/s", "key": "tokens_per_s", "format": ".4g"},
    {"title": "fwd ms", "key": "stage_ms.forward", "format": ".4g"},
    {"title": "bwd ms", "key": "stage_ms.backward", "format": ".4g"},
    {"title": "opt ms", "key": "stage_ms.optimizer", "format": ".4g"},
    {"title": "peak total MB", "key": "peak_total_mb", "format": ".0f"},
]

SUITE = register_suite(
    Suite(
        name="training",
        description=(
            "one TransformerNP training step (forward, backward, AdamW; bf16 autocast): 12 "
            "layers, d_model 512, 8 heads, d_ff 1365, K=10; B tasks of M context + N targets"
        ),
        cases=_cases,
        providers={
            v.name: Provider(
                v.name,
                _make(v),
                f"{v.backends()}, checkpoint_blocks={v.checkpoint}, cuda_graph={v.graph}",
            )
            for v in VARIANTS
        },
        make_inputs=_make_inputs,
        forward_flops=_forward_flops,
        reference=_reference,
        baseline=lambda mode, cfg: "sdpa",
        dtype=_dtype,
        shape_label=lambda c: f"{c['name']} B{c['B']} M{c['M']} N{c['N']}",
        x_label=lambda c: f"{c['name']}\nB{c['B']} M{c['M']}\nN{c['N']}",
        modes=("step",),
        reference_method=(
            "loss of the first step (initial weights, same seed and batch) against the same "
            "model in fp32 without autocast (sdpa attention, torch head/MLP/loss); error = "
            "relative difference, bound REL_TOL[dtype]"
        ),
        annotate=_annotate,
        header_extra={
            "flops": "model FLOPs of a step: matmuls 3x forward, attention 3.5x forward; "
            "recomputation (checkpoint_blocks) not counted",
            "table_columns": TABLE_COLUMNS,
            "table_notes": [
                "tokens/s = B*(M+N) / step time; stage columns: medians of CUDA-event "
                "spans in eager steps; peak total = max allocated during a step"
            ],
        },
    )
)


# ---------------------------------------------------------------------------------------
# loss curves


def loss_curves(cfg: RunConfig, *, steps: int, out: Path) -> dict[str, Any]:
    """Train `sdpa`, `all-triton` and, on sm90, `fp8-attention+triton` (same seed, same
    tasks) for `steps` steps at the small shape (smoke: the tiny model and shape); write
    JSON and PNG under `out`. The loss differences compare the first two."""
    from tabpfn_infer.training.train_tnp import TNPTrainConfig, train_tnp

    name, b, m, n = SMOKE_CASES[0] if cfg.smoke else CASES[0]
    case = {"name": name, "B": b, "M": m, "N": n, "tiny": cfg.smoke}
    runs: dict[str, Any] = {}
    for variant in (Variant(()), Variant(ALL), Variant(ALL, fp8_attention=True)):
        train = TNPTrainConfig(
            model=replace(_model_config(cfg.smoke), **variant.backends()), batch=b, num_context=m,
            num_target=n, steps=steps, lr=LR, warmup=max(1, steps // 10), log_every=1,
            seed=cfg.seed, device=str(cfg.device),
        )  # fmt: skip
        try:
            _check_available(variant, case, cfg)
            start = time.perf_counter()
            _, log = train_tnp(train, progress=True)
            runs[variant.name] = {"status": "ok", "seconds": time.perf_counter() - start,
                                  "config": train.to_dict(), "log": log}  # fmt: skip
        except Unavailable as exc:
            runs[variant.name] = {"status": "skipped", "reason": str(exc)}
    header = collect_header(SUITE, cfg)
    for key in ("table_columns", "table_notes", "baselines", "flops", "reference_method"):
        header.pop(key, None)
    header.update(suite="training_loss_curve", case=case, steps=steps)
    result = {"header": header, "runs": runs}
    logs = [r["log"] for r in list(runs.values())[:2] if r["status"] == "ok"]
    if len(logs) == 2:
        diffs = [abs(a["loss"] - c["loss"]) for a, c in zip(*logs, strict=True)]
        result["max_abs_loss_difference"] = max(diffs)
        tail = max(1, len(diffs) // 10)
        result["final_mean_losses"] = [
            statistics.mean(r["loss"] for r in lg[-tail:]) for lg in logs
        ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "training_loss_curve.json").write_text(json.dumps(result, indent=1) + "\n")
    _plot_curves(result, out / "training_loss_curve.png")
    return result


def _plot_curves(result: dict[str, Any], path: Path) -> None:
    h, c = result["header"], result["header"]["case"]

    def draw(ax) -> None:
        for name, run in result["runs"].items():
            if run["status"] == "ok":
                ax.plot([r["step"] for r in run["log"]], [r["loss"] for r in run["log"]],
                        label=name, lw=1)  # fmt: skip

    _save_figure(
        path, draw, size=(7, 4), xlabel="step", ylabel="loss (NLL, nats per target)",
        title=f"TNP loss curves, B{c['B']} M{c['M']} N{c['N']}, seed {h['seed']} — "
        f"{h['gpu']}, torch {h['torch']}, {h['git_commit'][:12]}",
    )  # fmt: skip


def _save_figure(path: Path, draw, *, size, xlabel: str, ylabel: str, title: str) -> None:
    """One axes drawn by `draw(ax)`, with labels, grid, legend and a small title, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    draw(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# data-parallel scaling


DDP_VARIANTS = (Variant(()), Variant(ALL))
DDP_LOG_EVERY = 10
DDP_TIMEOUT_S = 1800  # per torchrun run (a hung process group fails the run, not the bench)


def ddp_scaling(
    cfg: RunConfig,
    *,
    worlds: tuple[int, ...],
    steps: int,
    out: Path,
    variants: tuple[str, ...] = tuple(v.name for v in DDP_VARIANTS),
) -> dict[str, Any]:
    """Tokens/s of eager training (`tabpfn_infer.training.train_tnp`) of `variants` (of `sdpa`, `all-triton`) at
    the mid shape (smoke: the tiny model and shape on CPU, gloo) on each number of ranks in
    `worlds`, each a `torchrun --standalone` run (DDP, NCCL on GPUs). Every rank trains B
    tasks per step (weak scaling), so tokens/s = world * B * (M + N) / step time. Per run:
    the log rows every DDP_LOG_EVERY steps (tokens/s over the window since the previous
    row, data sampling included); `tokens_per_s` is the median of the rows after the first
    (which holds warm-up and autotuning), `efficiency` tokens/s / (world * one rank's).
    Writes training_ddp.json and .png under `out`."""
    name, b, m, n = SMOKE_CASES[0] if cfg.smoke else CASES[1]
    case = {"name": name, "B": b, "M": m, "N": n, "tiny": cfg.smoke}
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, Any] = {}
    for variant in (v for v in DDP_VARIANTS if v.name in variants):
        for world in worlds:
            log_path = out / f"ddp_log_{variant.name}_{world}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={world}", "-m", "bench.suites.training", "ddp-worker",
                   "--variant", variant.name, "--steps", str(steps), "--rows-out", str(log_path)]  # fmt: skip
            if cfg.smoke:
                cmd.append("--smoke")
            start = time.perf_counter()
            key = f"{variant.name} x{world}"
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=DDP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                runs[key] = {"status": "error", "reason": f"no result in {DDP_TIMEOUT_S} s"}
                continue
            if done.returncode != 0:
                runs[key] = {"status": "error", "reason": done.stderr[-2000:]}
                continue
            log = json.loads(log_path.read_text())
            log_path.unlink()
            runs[key] = {"status": "ok", "variant": variant.name, "world": world,
                         "seconds": time.perf_counter() - start, "log": log,
                         "tokens_per_s": statistics.median(r["tokens_per_s"] for r in log[1:])}  # fmt: skip
        one = runs.get(f"{variant.name} x{worlds[0]}", {})
        for world in worlds:
            run = runs[f"{variant.name} x{world}"]
            if run["status"] == "ok" and one.get("status") == "ok":
                run["efficiency"] = run["tokens_per_s"] / (world / worlds[0] * one["tokens_per_s"])
    header = collect_header(SUITE, cfg)
    for key in ("table_columns", "table_notes", "baselines", "flops", "reference_method"):
        header.pop(key, None)
    header.update(suite="training_ddp", case=case, steps=steps, worlds=list(worlds),
                  log_every=DDP_LOG_EVERY, gpus_visible=torch.cuda.device_count())  # fmt: skip
    result = {"header": header, "runs": runs}
    (out / "training_ddp.json").write_text(json.dumps(result, indent=1) + "\n")
    _plot_ddp(result, out / "training_ddp.png")
    return result


def ddp_worker(variant_name: str, *, steps: int, log: Path, smoke: bool) -> None:
    """One torchrun rank of `ddp_scaling`: train `variant_name` at its case; rank 0 writes
    its log rows to `log`."""
    from tabpfn_infer.training.train_tnp import TNPTrainConfig, train_tnp

    variant = {v.name: v for v in DDP_VARIANTS}[variant_name]
    _, b, m, n = SMOKE_CASES[0] if smoke else CASES[1]
    train = TNPTrainConfig(
        model=replace(_model_config(smoke), **variant.backends()), batch=b, num_context=m,
        num_target=n, steps=steps, lr=LR, warmup=1, log_every=DDP_LOG_EVERY,
        device="cpu" if smoke else "cuda",
    )  # fmt: skip
    _, rows = train_tnp(train, progress=False)
    if rows:  # rank 0
        log.write_text(json.dumps(rows))


def _plot_ddp(result: dict[str, Any], path: Path) -> None:
    h, c = result["header"], result["header"]["case"]
    ok = [r for r in result["runs"].values() if r["status"] == "ok"]

    def draw(ax) -> None:
        for variant in dict.fromkeys(r["variant"] for r in ok):
            mine = [r for r in ok if r["variant"] == variant]
            ax.plot([r["world"] for r in mine], [r["tokens_per_s"] for r in mine], "o-",
                    label=variant)  # fmt: skip
        ax.set_xticks(h["worlds"])

    _save_figure(
        path, draw, size=(6, 4), xlabel="GPUs (DDP ranks)", ylabel="tokens/s (all ranks)",
        title=f"TNP training, DDP, B{c['B']} M{c['M']} N{c['N']} per rank — {h['gpu']}, "
        f"{h['git_commit'][:12]}",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.suites.training")
    p.add_argument("command", choices=["loss-curve", "ddp-scaling", "ddp-worker"])
    p.add_argument("--steps", type=int, help="training steps (loss-curve 300, ddp-scaling 40)")
    p.add_argument("--out", type=Path, default=Path("bench/out"))
    p.add_argument("--smoke", action="store_true", help="tiny model and shape (CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worlds", default="1,2", help="ddp-scaling: numbers of ranks")
    p.add_argument("--variant", help="ddp-worker: the variant to train")
    p.add_argument("--variants", default="sdpa,all-triton", help="ddp-scaling: variants to train")
    p.add_argument("--rows-out", type=Path, help="ddp-worker: where rank 0 writes its log rows")
    args = p.parse_args(argv)
    if args.command == "ddp-worker":
        ddp_worker(args.variant, steps=args.steps, log=args.rows_out, smoke=args.smoke)
        return 0
    cuda = torch.cuda.is_available() and not args.smoke
    cfg = RunConfig(device=torch.device("cuda" if cuda else "cpu"), smoke=args.smoke,
                    seed=args.seed, command=" ".join(["python -m bench.suites.training", *(argv or sys.argv[1:])]))  # fmt: skip
    if args.command == "ddp-scaling":
        worlds = tuple(int(w) for w in args.worlds.split(","))
        result = ddp_scaling(cfg, worlds=worlds, steps=args.steps or 40, out=args.out,
                             variants=tuple(args.variants.split(",")))  # fmt: skip
        for key, run in result["runs"].items():
            if run["status"] == "ok":
                print(f"{key}: {run['tokens_per_s']:.4g} tokens/s, efficiency "
                      f"{run.get('efficiency', float('nan')):.3f}")  # fmt: skip
            else:
                print(f"{key}: {run['status']}\n{run['reason']}")
        print(f"wrote {args.out / 'training_ddp.json'} and .png")
        return 0
    result = loss_curves(cfg, steps=args.steps or 300, out=args.out)
    for name, run in result["runs"].items():
        if run["status"] == "ok":
            print(f"{name}: loss {run['log'][0]['loss']:.4f} -> {run['log'][-1]['loss']:.4f} "
                  f"in {run['seconds']:.1f} s")  # fmt: skip
        else:
            print(f"{name}: {run['status']} ({run['reason']})")
    if "max_abs_loss_difference" in result:
        print(f"max |loss difference| {result['max_abs_loss_difference']:.4g}; final mean "
              f"losses {result['final_mean_losses']}")  # fmt: skip
    print(f"wrote {args.out / 'training_loss_curve.json'} and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
