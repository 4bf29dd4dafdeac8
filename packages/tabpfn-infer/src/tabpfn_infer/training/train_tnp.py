"""Training the TransformerNP on the synthetic prior: a fixed-shape step (eager or one CUDA
graph), the loop with logging and checkpoints, and data parallelism through torchrun.

`TNPTrainer` owns static input buffers of one shape (B tasks of M context and N target
rows) and runs forward (bf16 autocast on CUDA), backward, gradient-norm clipping and AdamW
(betas 0.9/0.95). With `cuda_graph=True` the whole step is captured once, the way torch's
CUDA-graph notes capture a full network: AdamW is `capturable` with the learning rate in a
device tensor, a few warm-up steps run on a side stream first, and the parameters and
optimizer state are put back as they were before warm-up, so the first replay is the first
step. Later steps copy a batch into the buffers and replay.

`train_tnp` runs the loop: a batch of prior tasks per step (`prior.sample_tasks`), linear
warm-up then cosine decay of the learning rate, a tqdm bar with loss and tokens/s
(B*(M+N)*world_size per step, over the steps since the previous log row; the first row
includes the graph capture) and a log row every `log_every` steps, checkpoints
`{"step", "model", "optimizer", "config"}`. Under torchrun (WORLD_SIZE > 1) it joins the
process group (NCCL on CUDA, gloo on CPU), wraps the model in DistributedDataParallel,
draws data from a generator seeded per rank, and only rank 0 logs and saves. DDP steps run
eagerly: `cuda_graph` with DDP is refused (its capture failed on two H200s, with the model
wrapped on the default stream or on a side stream; see the CHANGELOG).
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from tabattn_core.checks import InputError
from tabattn_core.graphs import CapturedGraph, capture
from tabpfn_infer.training.prior import TaskBatch, sample_tasks
from tabpfn_infer.training.tnp import TNPConfig, TransformerNP
from tabpfn_infer.training.train import lr_factor, resolve_device

__all__ = [
    "TNPTrainConfig",
    "TNPTrainer",
    "load_tnp_checkpoint",
    "save_tnp_checkpoint",
    "train_tnp",
]

BETAS = (0.9, 0.95)
WARMUP_STEPS = 3  # eager steps on a side stream before capturing the graph
NO_GRAPH_WITH_DDP = (
    "cuda_graph: expected False with DDP (WORLD_SIZE > 1): a captured DDP step is not "
    "supported (its capture failed on two GPUs); run DDP steps eagerly"
)


@dataclass
class TNPTrainConfig:
    """Model (`TNPConfig`), task shape and optimisation settings. `checkpoint_every` 0
    saves at the end only."""

    model: TNPConfig = field(default_factory=TNPConfig)
    batch: int = 32
    num_context: int = 64
    num_target: int = 500
    steps: int = 1000
    lr: float = 3e-4
    warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 0
    cuda_graph: bool = False
    device: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = TNPConfig.from_dict(self.model)
        for name, lo in (("batch", 1), ("num_context", 1), ("num_target", 1), ("steps", 1),
                         ("warmup", 0), ("log_every", 1), ("checkpoint_every", 0)):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise InputError(f"{name}: expected an int >= {lo}, got {value!r}")

    @property
    def tokens_per_step(self) -> int:
        """Rows per step on one rank: B * (M + N)."""
        return self.batch * (self.num_context + self.num_target)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TNPTrainConfig:
        """From a dict (a JSON file's, with "model" a dict of TNPConfig fields); unknown
        keys are an error."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise InputError(f"config: unknown keys {unknown}; expected some of {sorted(names)}")
        return cls(**values)


class TNPTrainer:
    """One fixed-shape training step on static input buffers; see the module docstring.

    model: a TransformerNP, or it wrapped in DistributedDataParallel (`ddp=True`), on
    `device`. `load(tasks)` copies a batch in; `step()` runs one step and returns the
    loss as a 0-dim device tensor (the same tensor every call under a CUDA graph: read it
    before the next step). The stages `forward()`, `backward(loss)` and `optimizer_step()`
    are public so a benchmark can time them one by one (eagerly).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        batch: int,
        num_context: int,
        num_target: int,
        lr: float,
        weight_decay: float = 0.0,
        grad_clip: float = 1.0,
        cuda_graph: bool = False,
        ddp: bool = False,
    ):
        self.model = model
        self.module: TransformerNP = model.module if ddp else model
        params = list(model.parameters())
        self.device = params[0].device
        if cuda_graph and self.device.type != "cuda":
            raise InputError(f"cuda_graph: expected a CUDA model, got device {self.device}")
        if cuda_graph and ddp:
            raise InputError(NO_GRAPH_WITH_DDP)
        self.cuda_graph, self.grad_clip = cuda_graph, grad_clip
        dim_x = self.module.config.dim_x
        zeros = lambda *shape: torch.zeros(*shape, device=self.device)
        self.x_context, self.y_context = zeros(batch, num_context, dim_x), zeros(batch, num_context)
        self.x_target, self.y_target = zeros(batch, num_target, dim_x), zeros(batch, num_target)
        self.optimizer = torch.optim.AdamW(
            params,
            lr=torch.tensor(lr, device=self.device) if cuda_graph else lr,
            betas=BETAS,
            weight_decay=weight_decay,
            capturable=cuda_graph,
        )
        self.graph: CapturedGraph[torch.Tensor] | None = None

    def load(self, tasks: TaskBatch) -> None:
        """Copy a batch of the buffers' shape into them."""
        for name in ("x_context", "y_context", "x_target", "y_target"):
            getattr(self, name).copy_(getattr(tasks, name), non_blocking=True)

    def set_lr(self, lr: float) -> None:
        """Set the learning rate (in place in the device tensor under a CUDA graph)."""
        for group in self.optimizer.param_groups:
            if not self.cuda_graph:
                group["lr"] = float(lr)
            elif isinstance(group["lr"], torch.Tensor) and group["lr"].device == self.device:
                group["lr"].fill_(lr)
            elif self.graph is None:
                group["lr"] = torch.tensor(float(lr), device=self.device)
            else:
                raise RuntimeError("set_lr: the captured step's lr tensor was replaced")

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        """Load a saved AdamW state (from an eager or a graph run) into this trainer's."""
        state = {**state, "param_groups": [dict(g) for g in state["param_groups"]]}
        for group in state["param_groups"]:
            group["capturable"] = self.cuda_graph
            group["lr"] = float(group["lr"])
        self.optimizer.load_state_dict(state)
        self.set_lr(self.optimizer.param_groups[0]["lr"])

    def forward(self) -> torch.Tensor:
        """The loss on the buffers' batch (bf16 autocast on CUDA, its weight cache off under
        a CUDA graph as torch asks)."""
        with torch.autocast(
            self.device.type,
            dtype=torch.bfloat16,
            enabled=self.device.type == "cuda",
            cache_enabled=not self.cuda_graph,
        ):
            return self.model(self.x_context, self.y_context, self.x_target, self.y_target)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def optimizer_step(self) -> None:
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.optimizer.step()

    def eager_step(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.forward()
        self.backward(loss)
        self.optimizer_step()
        return loss.detach()

    def step(self) -> torch.Tensor:
        """One step on the buffers' batch; the first call under a CUDA graph captures it."""
        if not self.cuda_graph:
            return self.eager_step()
        if self.graph is None:
            self.capture()
        return self.graph.replay()

    def capture(self) -> None:
        """Warm up on a side stream, restore the model and optimizer state, capture."""
        saved_params = [p.detach().clone() for p in self.optimizer.param_groups[0]["params"]]
        saved_state = {
            p: {k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)}
            for p, s in self.optimizer.state.items()
        }

        @torch.no_grad()
        def restore() -> None:
            for p, value in zip(
                self.optimizer.param_groups[0]["params"], saved_params, strict=True
            ):
                p.copy_(value)
            for p, s in self.optimizer.state.items():
                for k, v in s.items():
                    if not isinstance(v, torch.Tensor):
                        continue
                    if p in saved_state:
                        v.copy_(saved_state[p][k])
                    else:
                        v.zero_()  # AdamW's fresh state: step 0, zero moments
            self.optimizer.zero_grad(set_to_none=True)

        self.graph = capture(
            self.eager_step, device=self.device, warmup=WARMUP_STEPS, after_warmup=restore
        )


def save_tnp_checkpoint(
    path: str | Path, trainer: TNPTrainer, config: TNPTrainConfig, step: int
) -> None:
    """`{"step", "model", "optimizer", "config"}` (config: TNPTrainConfig as a dict)."""
    torch.save(
        {
            "step": step,
            "model": trainer.module.state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "config": config.to_dict(),
        },
        Path(path),
    )


def load_tnp_checkpoint(
    path: str | Path, *, map_location: str | torch.device = "cpu", **overrides: Any
) -> TransformerNP:
    """The model of a checkpoint, in eval mode; `overrides` replace TNPConfig fields (e.g.
    the backends or checkpoint_blocks, which do not change the weights)."""
    data = torch.load(Path(path), map_location=map_location, weights_only=True)
    config = TNPConfig.from_dict({**data["config"]["model"], **overrides})
    model = TransformerNP(config)
    model.load_state_dict(data["model"], strict=True)
    return model.eval()


def _data_seed(seed: int, rank: int, step: int) -> int:
    """A data seed per (run seed, rank, first step): ranks and resumed runs draw new tasks."""
    return ((seed * 1_000_003 + rank) * 1_000_003 + step) % 2**63


def _start_distributed(device_name: str) -> tuple[int, int, torch.device, bool]:
    """(rank, world size, device, whether this call started the process group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, resolve_device(device_name), False
    cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device, started


def train_tnp(
    config: TNPTrainConfig,
    *,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    progress: bool = True,
) -> tuple[TransformerNP, list[dict[str, float]]]:
    """Train (or, from `resume`, go on training) a TransformerNP on the prior; see the
    module docstring. Returns the model and rank 0's log rows (step, loss averaged over
    ranks, lr, tokens_per_s over all ranks; empty on other ranks). With `out`, rank 0
    writes the checkpoint there every `checkpoint_every` steps and at the end."""
    if config.cuda_graph and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError(NO_GRAPH_WITH_DDP)  # before joining the process group
    rank, world, device, started = _start_distributed(config.device)
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = TransformerNP(config.model).to(device).train()
    start_step, saved_optimizer = 0, None
    if resume is not None:
        data = torch.load(Path(resume), map_location=device, weights_only=True)
        model.load_state_dict(data["model"], strict=True)
        start_step, saved_optimizer = int(data["step"]), data["optimizer"]
    wrapped = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
    trainer = TNPTrainer(
        wrapped,
        batch=config.batch,
        num_context=config.num_context,
        num_target=config.num_target,
        lr=config.lr,
        weight_decay=config.weight_decay,
        grad_clip=config.grad_clip,
        cuda_graph=config.cuda_graph,
        ddp=world > 1,
    )
    if saved_optimizer is not None:
        trainer.load_optimizer_state(saved_optimizer)
    gen = torch.Generator().manual_seed(_data_seed(config.seed, rank, start_step))
    lead = rank == 0
    tokens = config.tokens_per_step * world
    log: list[dict[str, float]] = []
    steps = range(start_step, config.steps)
    bar = tqdm(steps, disable=not (progress and lead), desc="train-tnp", unit="step")
    window_start, window_steps = time.perf_counter(), 0
    try:
        for step in bar:
            tasks = sample_tasks(
                config.batch,
                num_context=config.num_context,
                num_buffer=0,
                num_target=config.num_target,
                num_features=config.model.dim_x,
                generator=gen,
            )
            trainer.load(tasks)
            trainer.set_lr(config.lr * lr_factor(step, config.warmup, config.steps))
            loss = trainer.step()
            window_steps += 1
            if (step + 1) % config.log_every == 0 or step in (start_step, config.steps - 1):
                loss = loss.detach().clone()
                if world > 1:
                    dist.all_reduce(loss)
                    loss /= world
                row = {
                    "step": step,
                    "loss": float(loss),
                    "lr": config.lr * lr_factor(step, config.warmup, config.steps),
                    "tokens_per_s": tokens * window_steps / (time.perf_counter() - window_start),
                }
                window_start, window_steps = time.perf_counter(), 0
                if lead:
                    log.append(row)
                    bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.3g}")
            if (
                out is not None
                and lead
                and config.checkpoint_every
                and (step + 1) % config.checkpoint_every == 0
            ):
                save_tnp_checkpoint(out, trainer, config, step + 1)
        if out is not None and lead:
            save_tnp_checkpoint(out, trainer, config, config.steps)
    finally:
        if started:
            # The DDP wrapper's reducer holds the process group: release it (and any cycle
            # through the trainer) first, or a gloo thread can outlive the group and abort
            # the process at exit ("terminate called without an active exception").
            del trainer, wrapped
            gc.collect()
            dist.destroy_process_group()
    return model.eval(), log
