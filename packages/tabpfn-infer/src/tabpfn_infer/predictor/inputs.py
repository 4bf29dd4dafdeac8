"""A predictor call's inputs: checked, and arranged as G datasets x S sample paths."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tabattn_core.checks import InputError, check_tensor

__all__ = ["Batch", "arrange", "check_finite"]


def check_finite(name: str, t: torch.Tensor, axes: tuple[str, ...]) -> None:
    """Reject NaN/inf naming the first bad element by its axes (e.g. batch, row, column)."""
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        where = [int(i) for i in bad.nonzero()[0]]
        at = ", ".join(f"{axis} {i}" for axis, i in zip(axes, where, strict=True))
        raise InputError(f"{name}: expected finite values, got {t[tuple(where)].item()} at {at}")


def max_magnitude(t: torch.Tensor) -> torch.Tensor:
    """max |t| as a 0-dim fp32 tensor (NaN if t holds one; 0 if empty or integer, always
    finite); an expanded (stride 0) dim is read once."""
    t = t[tuple(slice(0, 1) if stride == 0 else slice(None) for stride in t.stride())]
    if not t.is_floating_point() or t.numel() == 0:
        return torch.zeros((), device=t.device)
    return torch.linalg.vector_norm(t, float("inf")).float()


def largest_magnitude(given: list[tuple[str, torch.Tensor, tuple[str, ...]]]) -> torch.Tensor:
    """max |value| over the given tensors, a 0-dim fp32 tensor on the first one's device:
    finite iff they all are (NaN and inf propagate through max; a finite value beyond fp32's
    range only triggers the exact check)."""
    device = given[0][1].device
    return torch.stack([max_magnitude(t).to(device) for _, t, _ in given]).amax()


@dataclass
class Batch:
    """Inputs arranged as G datasets x S sample paths."""

    x_context: torch.Tensor  # [G, Nc, C]
    y_context: torch.Tensor  # [G, Nc]
    x_target: torch.Tensor  # [G, S, Nt, C]
    y_target: torch.Tensor | None  # [G, S, Nt]
    batch: int  # B = G * S
    given: list[tuple[str, torch.Tensor, tuple[str, ...]]]  # the caller's (name, tensor, axes)
    largest: float | None  # finite iff every given tensor is; None: not yet computed

    def check_finite(self) -> None:
        """Raise `InputError` naming the first NaN/inf of the given tensors. Called after the
        call's work is queued, it queues the max |value| of the inputs behind that work, so
        the read is the call's only host sync."""
        if self.largest is None:
            self.largest = float(largest_magnitude(self.given))
        if not math.isfinite(self.largest):
            for name, t, axes in self.given:
                check_finite(name, t, axes)
        self.largest = 0.0

    def inputs(self, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors a call reads, by name (y: the labels or the noise it needs)."""
        return {
            "x_context": self.x_context,
            "y_context": self.y_context,
            "x_target": self.x_target,
            "y": y,
        }


def arrange(
    x_context: torch.Tensor,
    y_context: torch.Tensor,
    x_target: torch.Tensor,
    y_target: torch.Tensor | None,
    *,
    device: torch.device,
    dtype: torch.dtype,
) -> Batch:
    """x_context [B, Nc, C], y_context [B, Nc] (or [B, Nc, 1]), x_target [B, Nt, C],
    y_target [B, Nt] or None, checked and moved to the model's device and dtype: one dataset
    with B sample paths where every row has the same context (G = 1, S = B), else B datasets
    (G = B, S = 1)."""
    check_tensor("x_context", x_context, ndim=3, dims="[B, Nc, C]")
    b, nc, c = x_context.shape
    check_tensor("x_target", x_target, ndim=3, dims="[B, Nt, C]")
    if x_target.shape[0] != b or x_target.shape[2] != c:
        raise InputError(
            f"x_target: expected shape [{b}, Nt, {c}] (batch and columns of x_context), "
            f"got {list(x_target.shape)}"
        )
    if y_context.dim() == 3:
        y_context = y_context.squeeze(-1)
    check_tensor("y_context", y_context, shape=(b, nc), dims="[B, Nc] or [B, Nc, 1]")
    nt = x_target.shape[1]
    if y_target is not None:
        check_tensor("y_target", y_target, shape=(b, nt), dims="[B, Nt]")
    given = [
        (name, t, axes)
        for name, t, axes in (
            ("x_context", x_context, ("batch", "row", "column")),
            ("y_context", y_context, ("batch", "row")),
            ("x_target", x_target, ("batch", "row", "column")),
            ("y_target", y_target, ("batch", "row")),
        )
        if t is not None
    ]
    # Finite inputs are confirmed after the call is queued (`Batch.check_finite`), unless
    # the shared-context test below needs a sync anyway: then both are read at once.
    largest = None
    if b == 1 or (x_context.stride(0) == 0 and y_context.stride(0) == 0):
        shared = b > 1  # one row, or one context expanded B times: no test needed
    else:
        same = (x_context == x_context[:1]).all() & (y_context == y_context[:1]).all()
        magnitude = largest_magnitude(given)
        shared, largest = torch.stack([same.to(magnitude.dtype), magnitude]).tolist()
    g, s = (1, b) if shared else (b, 1)
    # Only the distinct contexts are converted (an expanded shared context is never
    # copied B times).
    x_context, y_context = (t[:g].to(device, dtype) for t in (x_context, y_context))
    x_target = x_target.to(device, dtype)
    y_target = None if y_target is None else y_target.to(device, dtype)
    batch = Batch(
        x_context,
        y_context,
        x_target.view(g, s, nt, c),
        None if y_target is None else y_target.view(g, s, nt),
        b,
        given,
        largest,
    )
    if largest is not None:
        batch.check_finite()
    return batch
