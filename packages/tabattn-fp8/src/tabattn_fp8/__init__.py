"""Hopper (sm90) FP8 E4M3 attention path with per-block scales.

This package will hold FP8 attention kernels for Hopper GPUs, built on tabattn-triton and
checked against the references in tabattn-core. Release 0.1.0 is the packaging skeleton:
it registers no kernels yet (they arrive in later releases) and provides
:func:`require_sm90`, the capability check those kernels will use.
"""

from __future__ import annotations

import torch

__version__ = "0.1.0"

__all__ = ["__version__", "require_sm90"]


def require_sm90(device: torch.device | str | int | None = None) -> torch.device:
    """Return ``device`` as a ``torch.device`` if it is a Hopper (sm90) CUDA GPU, else raise.

    ``None`` means the current CUDA device. Raises ``RuntimeError`` naming the device and
    what it is (CPU, no CUDA, or the compute capability it has) when it is not sm90.
    """
    if device is None:
        if not torch.cuda.is_available():
            raise RuntimeError(
                "tabattn-fp8 needs a Hopper GPU (compute capability 9.x, sm90); "
                "no CUDA device is available (torch.cuda.is_available() is False)"
            )
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device(device)
    if device.type != "cuda":
        raise RuntimeError(
            f"tabattn-fp8 needs a Hopper GPU (compute capability 9.x, sm90); "
            f"got device {str(device)!r}, which is not a CUDA device (no CUDA)"
        )
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"tabattn-fp8 needs a Hopper GPU (compute capability 9.x, sm90); got device "
            f"{str(device)!r} but no CUDA device is available (torch.cuda.is_available() is False)"
        )
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    if major != 9:
        name = torch.cuda.get_device_name(index)
        raise RuntimeError(
            f"tabattn-fp8 needs a Hopper GPU (compute capability 9.x, sm90); device "
            f"cuda:{index} ({name}) has compute capability {major}.{minor} (sm{major}{minor})"
        )
    return torch.device("cuda", index)
