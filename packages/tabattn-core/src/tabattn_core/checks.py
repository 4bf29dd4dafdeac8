"""Input checks shared by every op: each error names the argument, the expected and the
actual value, and is raised before any kernel launches."""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence

import torch

from tabattn_core.memo import TensorMemo

__all__ = [
    "check_block_indices",
    "check_cu_seqlens_pair",
    "check_int",
    "check_positive_int",
    "InputError",
    "check_cu_seqlens",
    "check_head_dim",
    "check_gqa",
    "check_lengths",
    "check_same_device",
    "check_scale",
    "check_tensor",
    "host_readable",
    "MIN_HEAD_DIM",
    "MAX_HEAD_DIM",
    "FLOAT_DTYPES",
]

MIN_HEAD_DIM = 16
MAX_HEAD_DIM = 256
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class InputError(ValueError):
    """A bad argument: wrong shape, dtype, device, stride, head dim or length."""


def _fmt_dtypes(dtypes: Iterable[torch.dtype]) -> str:
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | None = None,
    shape: Sequence[int | None] | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    device: torch.device | None = None,
    unit_last_stride: bool = False,
    dims: str | None = None,
) -> torch.Tensor:
    """Check one tensor argument.

    `shape` entries that are None are free; `dims` names the axes in messages
    (e.g. "[B, H, L, D]"). Returns the tensor for chaining.
    """
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    layout = f" {dims}" if dims else ""
    if ndim is not None and t.dim() != ndim:
        raise InputError(
            f"{name}: expected {ndim} dims{layout}, got {t.dim()} dims with shape {tuple(t.shape)}"
        )
    if shape is not None and (
        t.dim() != len(shape)
        or any(s is not None and s != a for s, a in zip(shape, t.shape, strict=False))
    ):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise InputError(f"{name}: expected shape {want}{layout}, got {list(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            raise InputError(f"{name}: expected dtype {_fmt_dtypes(dtypes)}, got {t.dtype}")
    if device is not None and t.device != torch.device(device):
        raise InputError(f"{name}: expected device {torch.device(device)}, got {t.device}")
    if unit_last_stride and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise InputError(
            f"{name}: expected stride 1 on the last (head) dim, got strides {t.stride()}"
        )
    return t


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """All given tensors (None skipped) live on one device; returns it."""
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for n, t in items[1:]:
        if t.device != first.device:
            raise InputError(
                f"{n}: expected device {first.device} (as {first_name}), got {t.device}"
            )
    return first.device


def check_head_dim(
    name: str, head_dim: int, *, lo: int = MIN_HEAD_DIM, hi: int = MAX_HEAD_DIM
) -> None:
    """Head dim D must lie in [lo, hi] (non-powers of two are fine)."""
    if not lo <= head_dim <= hi:
        raise InputError(f"{name}: expected head dim D in [{lo}, {hi}], got {head_dim}")


def check_gqa(q_heads: int, kv_heads: int, *, q_name: str = "q", kv_name: str = "k") -> int:
    """GQA: H_q must be a multiple of H_kv. Returns the group size H_q // H_kv."""
    if kv_heads < 1 or q_heads % kv_heads != 0:
        raise InputError(
            f"{kv_name}: expected a head count dividing {q_name}'s {q_heads} heads (GQA), "
            f"got {kv_heads}"
        )
    return q_heads // kv_heads


def host_readable(t: torch.Tensor) -> bool:
    """Whether reading values of `t` on the host is allowed now: not for a CUDA tensor while
    the current stream captures a CUDA graph (the read would be a host sync, which capture
    refuses). Value checks are skipped then; the warm-up calls before a capture run them."""
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def check_lengths(
    name: str, lengths: object, *, count: int, max_len: int, device: torch.device | None = None
) -> torch.Tensor:
    """Per-dataset lengths: an int tensor [count] with 0 <= len <= max_len (the values read
    on the host, a sync for a device tensor, except while capturing: `host_readable`)."""
    t = check_tensor(
        name, lengths, shape=(count,), dtypes=(torch.int32, torch.int64), device=device, dims="[B]"
    )
    if t.numel() and host_readable(t):
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi > max_len:
            raise InputError(f"{name}: expected values in [0, {max_len}], got min {lo} max {hi}")
    return t


def check_scale(scale: float | None, head_dim: int) -> float:
    """Softmax scale: default D ** -0.5; must be a finite positive number."""
    if scale is None:
        return head_dim**-0.5
    s = float(scale)
    if not (s > 0 and s != float("inf")):
        raise InputError(f"scale: expected a finite positive float, got {scale}")
    return s


# Host copies of device offsets that passed `check_cu_seqlens`, per tensor object, version
# and total: checking the same unchanged tensor again needs no device-to-host copy (no
# stream sync).
VALIDATED_OFFSETS = TensorMemo()


def check_cu_seqlens(name: str, cu: object, *, total: int, device: torch.device) -> torch.Tensor:
    """Offsets of packed sequences: int [B+1], non-decreasing from 0 to `total`.

    Returns them as an int64 CPU tensor: one device-to-host copy (a stream sync) the first
    time a device tensor is checked, none for the same unchanged tensor later
    (`VALIDATED_OFFSETS`).
    """
    t = check_tensor(
        name, cu, ndim=1, dtypes=(torch.int32, torch.int64), device=device, dims="[B+1]"
    )
    on_device = t.device.type != "cpu"
    if on_device and (host := VALIDATED_OFFSETS.lookup((t,), total)) is not None:
        return host
    host = t.to(device="cpu", dtype=torch.int64)
    if (
        host.numel() < 1
        or int(host[0]) != 0
        or int(host[-1]) != total
        or bool((host[1:] < host[:-1]).any())
    ):
        shown = host.tolist()
        raise InputError(
            f"{name}: expected non-decreasing offsets from 0 to {total}, got {shown[:8]}"
            + ("..." if len(shown) > 8 else "")
        )
    if on_device:
        VALIDATED_OFFSETS.store((t,), total, host)
    return host


def check_cu_seqlens_pair(
    cu_seqlens_q: object,
    cu_seqlens_k: object,
    *,
    total_q: int,
    total_k: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The query and key offsets of one packed batch (`check_cu_seqlens` each, and as many
    sequences on both sides); returns both as int64 CPU tensors."""
    cq = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, total=total_q, device=device)
    ck = check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, total=total_k, device=device)
    if cq.numel() != ck.numel():
        raise InputError(
            f"cu_seqlens_k: expected {cq.numel()} offsets (as cu_seqlens_q), got {ck.numel()}"
        )
    return cq, ck


def _int_wanted(lo: int | None, hi: int | None) -> str:
    if hi is not None:
        return f"an int <= {hi}" if lo is None else f"an int in [{lo}, {hi}]"
    return {None: "an int", 0: "a non-negative int", 1: "a positive int"}.get(lo, f"an int >= {lo}")


def check_int(name: str, value: object, *, lo: int | None = 0, hi: int | None = None) -> int:
    """An integer (Python or numpy; a bool, float, string or tensor is not one: nothing is
    truncated or parsed) with lo <= value <= hi (None: unbounded); returned as an int."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        v = int(value)
        if (lo is None or v >= lo) and (hi is None or v <= hi):
            return v
    raise InputError(f"{name}: expected {_int_wanted(lo, hi)}, got {value!r}")


def check_positive_int(name: str, value: object, *, allow_zero: bool = False) -> int:
    """An int >= 1 (>= 0 with allow_zero), as `check_int`."""
    return check_int(name, value, lo=0 if allow_zero else 1)


def check_block_indices(
    block_indices: object, *, rows: int, kv_heads: int, device: torch.device
) -> torch.Tensor:
    """Selection attention's block_indices: int32/int64 [Tq, H_kv, n_sel] on `device`."""
    t = check_tensor(
        "block_indices",
        block_indices,
        ndim=3,
        dtypes=(torch.int32, torch.int64),
        device=device,
        dims="[Tq, H_kv, n_sel]",
    )
    if tuple(t.shape[:2]) != (rows, kv_heads):
        raise InputError(
            f"block_indices: expected shape [{rows}, {kv_heads}, n_sel], got {list(t.shape)}"
        )
    return t
