"""Training the AR-TabPFN model on the synthetic prior, and checkpoints.

AdamW (betas 0.9/0.95, no weight decay), linear warm-up then cosine decay, gradient-norm
clipping, bf16 autocast on CUDA; a progress bar and a log line every `log_every` steps.
Checkpoints are `{"step", "model" (state dict), "config" (ARTabPFN arguments)}`, the peer's
layout plus the model configuration.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from tqdm import tqdm

from tabattn_core.checks import InputError
from tabpfn_infer.model import ARTabPFN, load_peer_state_dict
from tabpfn_infer.training.prior import sample_tasks

__all__ = ["TrainConfig", "config_from_dict", "load_checkpoint", "save_checkpoint", "train"]

MODEL_FIELDS = (
    "d_model",
    "n_heads",
    "n_layers",
    "d_ff",
    "num_features",
    "buffer_size",
    "num_components",
)


@dataclass
class TrainConfig:
    """Model size, task sizes and optimisation settings."""

    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 4
    d_ff: int = 128
    num_features: int = 2
    buffer_size: int = 8
    num_components: int = 5
    batch: int = 32
    num_context: int = 64
    num_buffer: int = 8
    num_target: int = 64
    steps: int = 1000
    lr: float = 1e-3
    warmup: int = 100
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 50
    device: str = "auto"
    backend: str = "auto"

    def model_config(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in MODEL_FIELDS}


def save_checkpoint(path: str | Path, model: ARTabPFN, config: dict[str, int], step: int) -> None:
    torch.save({"step": step, "model": model.state_dict(), "config": dict(config)}, Path(path))


def load_checkpoint(
    path: str | Path, *, config: dict[str, int] | None = None, map_location: str = "cpu"
) -> ARTabPFN:
    """A model from a checkpoint of ours (it carries its config) or of the peer (pass the
    ARTabPFN arguments as `config`)."""
    data = torch.load(Path(path), map_location=map_location, weights_only=True)
    config = config or data.get("config")
    if config is None:
        raise InputError(f"config: {path} holds no model config; pass the ARTabPFN arguments")
    return load_peer_state_dict(ARTabPFN(**config), data).eval()


def resolve_device(name: str) -> torch.device:
    """ "auto": CUDA when available, else CPU; any other name as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Learning-rate multiplier: linear warm-up over `warmup` steps, then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train(
    config: TrainConfig, *, out: str | Path | None = None, progress: bool = True
) -> tuple[ARTabPFN, list[dict[str, float]]]:
    """Train a fresh model on the prior; returns it and the log rows (step, loss, lr,
    tokens/s). With `out`, writes the checkpoint there at the end."""
    if config.steps < 1 or config.warmup < 0:
        raise InputError(
            f"steps, warmup: expected steps >= 1 and warmup >= 0, got {config.steps}, {config.warmup}"
        )
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    model = ARTabPFN(**config.model_config()).to(device).train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=0.0
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, config.warmup, config.steps)
    )
    gen = torch.Generator().manual_seed(config.seed)
    tokens = config.batch * (config.num_context + config.num_buffer + config.num_target)
    log: list[dict[str, float]] = []
    bar = tqdm(range(config.steps), disable=not progress, desc="train", unit="step")
    start = time.perf_counter()
    for step in bar:
        tasks = sample_tasks(
            config.batch,
            num_context=config.num_context,
            num_buffer=config.num_buffer,
            num_target=config.num_target,
            num_features=config.num_features,
            generator=gen,
        ).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(
                tasks.x_context, tasks.y_context, tasks.x_buffer, tasks.y_buffer,
                tasks.x_target, tasks.y_target, backend=config.backend,
            )  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        schedule.step()
        if step % config.log_every == 0 or step == config.steps - 1:
            elapsed = time.perf_counter() - start
            row = {
                "step": step,
                "loss": float(loss.detach()),
                "lr": schedule.get_last_lr()[0],
                "tokens_per_s": tokens * (step + 1) / max(elapsed, 1e-9),
            }
            log.append(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
    model.eval()
    if out is not None:
        save_checkpoint(out, model, config.model_config(), config.steps)
    return model, log


def config_from_dict(values: dict) -> TrainConfig:
    """TrainConfig from a dict (e.g. a JSON config file); unknown keys are an error."""
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise InputError(f"config: unknown keys {unknown}; expected some of {sorted(names)}")
    return TrainConfig(**{**asdict(TrainConfig()), **values})
