"""The checks the kernels add to an op's contract (`tabattn_core.contracts`, which every
backend calls first): kernel dtypes, a device they run on, a unit stride on the last dim.
Raised before any launch."""

from __future__ import annotations

import torch

from tabattn_core.checks import InputError, check_tensor
from tabattn_triton.ops import common

__all__ = ["KERNEL_DTYPES", "check_device", "check_kernel_tensors"]

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_device(name: str, t: torch.Tensor) -> None:
    """Kernels need CUDA tensors, or CPU tensors under the interpreter."""
    if t.device.type == "cuda" or (common.interpreting() and t.device.type == "cpu"):
        return
    raise InputError(
        f"{name}: expected a CUDA tensor (or CPU with TRITON_INTERPRET=1), got device {t.device}"
    )


def check_kernel_tensors(*, unit_last_stride: bool = True, **tensors: torch.Tensor | None) -> None:
    """Each given tensor (None skipped) in KERNEL_DTYPES, with a unit stride on its last dim
    (unless unit_last_stride=False: kernels that take any strides), on a kernel device."""
    for name, t in tensors.items():
        if t is not None:
            check_tensor(name, t, dtypes=KERNEL_DTYPES, unit_last_stride=unit_last_stride)
            check_device(name, t)
