"""A synthetic prior over regression tasks for training TabPFN-style models.

Each task draws features x ~ U(-2, 2)^C and labels y = f(x) + noise, with f one of: a sum of
random sinusoids of random feature projections, a random two-layer tanh network, or a linear
function; the noise level is random per task. A task's rows are split into context, buffer
and target rows, and x and y are z-normalised with the context's statistics (as the peer
trains). Everything is drawn from an explicit `torch.Generator`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tabattn_core.checks import InputError

__all__ = ["TaskBatch", "sample_tasks"]

FUNCTION_KINDS = ("sinusoids", "tanh_mlp", "linear")


@dataclass
class TaskBatch:
    """B tasks: x_* [B, N, C], y_* [B, N] (context Nc, buffer Nb, target Nt rows)."""

    x_context: torch.Tensor
    y_context: torch.Tensor
    x_buffer: torch.Tensor
    y_buffer: torch.Tensor
    x_target: torch.Tensor
    y_target: torch.Tensor

    def to(self, device: torch.device | str) -> TaskBatch:
        return TaskBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def _functions(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """y [B, N] for x [B, N, C], one random function per task (kinds mixed in the batch)."""
    b, _, c = x.shape
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=x.dtype)
    kind = torch.randint(len(FUNCTION_KINDS), (b,), generator=gen)
    # sum of 4 sinusoids of random projections
    w = randn(b, c, 4) / c**0.5
    phase = 2 * torch.pi * torch.rand(b, 1, 4, generator=gen, dtype=x.dtype)
    amp = randn(b, 1, 4)
    sinusoids = (amp * torch.sin(2.0 * x @ w + phase)).sum(-1)
    # random two-layer tanh network, 16 hidden units
    w1, b1, w2 = randn(b, c, 16) * 1.5 / c**0.5, randn(b, 1, 16), randn(b, 16, 1) / 4.0
    mlp = (torch.tanh(x @ w1 + b1) @ w2)[..., 0]
    linear = (x @ randn(b, c, 1))[..., 0] / c**0.5
    options = torch.stack([sinusoids, mlp, linear], -1)  # [B, N, 3]
    return options.gather(-1, kind.view(b, 1, 1).expand(-1, x.shape[1], 1))[..., 0]


def sample_tasks(
    batch: int,
    *,
    num_context: int,
    num_buffer: int,
    num_target: int,
    num_features: int,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
) -> TaskBatch:
    """Draw `batch` tasks; see the module docstring. Returns CPU tensors in `dtype`."""
    for name, value, lo in (
        ("batch", batch, 1),
        ("num_context", num_context, 2),
        ("num_buffer", num_buffer, 0),
        ("num_target", num_target, 1),
        ("num_features", num_features, 1),
    ):
        if int(value) != value or value < lo:
            raise InputError(f"{name}: expected an int >= {lo}, got {value!r}")
    n = num_context + num_buffer + num_target
    x = 4 * torch.rand(batch, n, num_features, generator=generator, dtype=torch.float64) - 2
    y = _functions(x, generator)
    noise = 10 ** (-2 + 1.5 * torch.rand(batch, 1, generator=generator, dtype=torch.float64))
    y = y + noise * torch.randn(batch, n, generator=generator, dtype=torch.float64)
    xc, yc = x[:, :num_context], y[:, :num_context]
    x_mean, x_std = xc.mean(1, keepdim=True), xc.std(1, keepdim=True).clamp(min=1e-6)
    y_mean, y_std = yc.mean(1, keepdim=True), yc.std(1, keepdim=True).clamp(min=1e-6)
    x = ((x - x_mean) / x_std).to(dtype)
    y = ((y - y_mean) / y_std).to(dtype)
    cut = (num_context, num_context + num_buffer)
    return TaskBatch(
        x[:, : cut[0]], y[:, : cut[0]], x[:, cut[0] : cut[1]], y[:, cut[0] : cut[1]],
        x[:, cut[1] :], y[:, cut[1] :],
    )  # fmt: skip
