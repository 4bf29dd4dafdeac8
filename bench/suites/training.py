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

Studies of training: `bench.studies.training_loss_curve` (loss curves of the baseline,
all-Triton and FP8-attention models from the same seed) and `bench.studies.training_ddp`
(data-parallel scaling under torchrun).
"""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from bench import harness
from bench.harness import Check, Inputs, Provider, RunConfig, Suite, Unavailable

NUM_FEATURES = 4
LR = 3e-4
CASES = (("small", 32, 64, 500), ("mid", 4, 10_000, 1_000), ("large", 1, 200_000, 5_000))
SMOKE_CASES = (("tiny", 2, 19, 7),)
CHECKPOINTED_ONLY = ("large",)  # cases whose activations call for checkpoint_blocks
KERNEL_OPS = {"attention": "context_target_attention", "head": "grouped_mlp", "mlp": "mlp",
              "loss": "gmm_nll"}  # fmt: skip
STAGES = ("forward", "backward", "optimizer")


def model_config(tiny: bool):
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


def case_of(name: str, b: int, m: int, n: int, tiny: bool) -> dict[str, Any]:
    return {"name": name, "B": b, "M": m, "N": n, "tiny": tiny}


def cases(cfg: RunConfig) -> list[dict[str, Any]]:
    return [case_of(*c, tiny=cfg.smoke) for c in (SMOKE_CASES if cfg.smoke else CASES)]


def dtype(cfg: RunConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.device.type == "cuda" else torch.float32


def make_inputs(case: dict[str, Any], cfg: RunConfig, seed: int) -> Inputs:
    from tabpfn_infer.training.prior import sample_tasks

    gen = torch.Generator().manual_seed(seed)
    tasks = sample_tasks(case["B"], num_context=case["M"], num_buffer=0, num_target=case["N"],
                         num_features=NUM_FEATURES, generator=gen).to(cfg.device)  # fmt: skip
    anchor = torch.zeros((), device=cfg.device)  # the harness syncs on grad_out's device
    return Inputs(leaves={}, grad_out=anchor, extra={"tasks": tasks, "seed": seed, "cfg": cfg})


def _build(config, seed: int, device: torch.device):
    from tabpfn_infer.training.tnp import TransformerNP

    torch.manual_seed(seed)
    return TransformerNP(config).to(device)


def forward_flops(case: dict[str, Any]) -> float:
    """Model FLOPs of one step: matmuls 2*MACs forward, x3 with backward; attention
    4*B*H*(M+N)*M*D forward, x3.5 with backward."""
    c = model_config(case["tiny"])
    b, m, n = case["B"], case["M"], case["N"]
    rows, d = b * (m + n), c.d_model
    per_layer = rows * (2 * d * d + 2 * d * c.d_ff) + b * m * 2 * d * d  # q, o, mlp | k, v
    head = b * n * c.num_components * (d * c.d_ff + 3 * c.d_ff)
    matmul = 2 * (c.n_layers * per_layer + head)
    attention = 4 * b * c.n_heads * (m + n) * m * (d // c.n_heads) * c.n_layers
    return 3 * matmul + 3.5 * attention


def shape_label(case: dict[str, Any]) -> str:
    return f"{case['name']} B{case['B']} M{case['M']} N{case['N']}"


def x_label(case: dict[str, Any]) -> str:
    return f"{case['name']}\nB{case['B']} M{case['M']}\nN{case['N']}"


def reference(case: dict[str, Any], inputs: Inputs, mode: str, cfg: RunConfig) -> dict[str, Check]:
    """The loss at the initial weights in fp32 (sdpa attention, torch head/MLP/loss)."""
    config = replace(model_config(case["tiny"]), **Variant(()).backends())
    model = _build(config, inputs.extra["seed"], cfg.device)
    t = inputs.extra["tasks"]
    with torch.no_grad():
        loss = model(t.x_context, t.y_context, t.x_target, t.y_target)
    del model
    return {"out": Check(loss.to(torch.float64).reshape(1), lambda got: got)}


# ---------------------------------------------------------------------------------------
# providers: one trainer alive at a time (the harness checks and times them one by one)


class _Clock:
    """Stage marks inside eager steps (the harness times whole steps): CUDA events, or
    perf_counter on CPU."""

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
            model_config(case["tiny"]), **variant.backends(), checkpoint_blocks=variant.checkpoint
        )
        model = _build(config, inputs.extra["seed"], cfg.device).train()
        trainer = TNPTrainer(model, batch=case["B"], num_context=case["M"],
                             num_target=case["N"], lr=LR, cuda_graph=variant.graph)  # fmt: skip
        trainer.load(inputs.extra["tasks"])
        _ACTIVE.update(key=key, trainer=trainer)
        _CLOCKS[key] = _Clock(cfg.device)
    return _ACTIVE["trainer"], _CLOCKS[key]


def check_available(variant: Variant, case: dict[str, Any], cfg: RunConfig) -> None:
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
        probe = torch.empty(0, device=cfg.device, dtype=dtype(cfg))
        harness.need_gpu_or_interpreter(probe, variant.name)
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
        check_available(variant, case, inputs.extra["cfg"])

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


def annotate(case, mode, rows, calibration, cfg) -> None:
    tokens = case["B"] * (case["M"] + case["N"])
    for row in rows:
        clock = _CLOCKS.pop((case["name"], row["provider"]), None)
        row["tokens"] = tokens
        row["tokens_per_s"] = tokens / (row["ms"] * 1e-3) if row["ms"] else None
        row["stage_ms"] = clock.stage_ms() if clock and row["ms"] else None
        row["peak_total_mb"] = clock.peak_bytes / 2**20 if clock and clock.peak_bytes else None
    _ACTIVE.clear()


SUITE = harness.register_suite(
    Suite.from_module(
        __name__,
        name="training",
        description=(
            "one TransformerNP training step (forward, backward, AdamW; bf16 autocast): 12 "
            "layers, d_model 512, 8 heads, d_ff 1365, K=10; B tasks of M context + N targets"
        ),
        providers={
            v.name: Provider(
                v.name,
                _make(v),
                f"{v.backends()}, checkpoint_blocks={v.checkpoint}, cuda_graph={v.graph}",
            )
            for v in VARIANTS
        },
        baseline="sdpa",
        modes=("step",),
        reference_method=(
            "loss of the first step (initial weights, same seed and batch) against the same "
            "model in fp32 without autocast (sdpa attention, torch head/MLP/loss); error = "
            "relative difference, bound REL_TOL[dtype]"
        ),
        header_extra={
            "flops": "model FLOPs of a step: matmuls 3x forward, attention 3.5x forward; "
            "recomputation (checkpoint_blocks) not counted",
            "table_columns": [
                {"title": "tokens/s", "key": "tokens_per_s", "format": ".4g"},
                {"title": "fwd ms", "key": "stage_ms.forward", "format": ".4g"},
                {"title": "bwd ms", "key": "stage_ms.backward", "format": ".4g"},
                {"title": "opt ms", "key": "stage_ms.optimizer", "format": ".4g"},
                {"title": "peak total MB", "key": "peak_total_mb", "format": ".0f"},
            ],
            "table_notes": [
                "tokens/s = B*(M+N) / step time; stage columns: medians of CUDA-event "
                "spans in eager steps; peak total = max allocated during a step"
            ],
        },
    )
)
