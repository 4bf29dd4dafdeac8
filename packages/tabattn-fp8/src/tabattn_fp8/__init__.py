"""Hopper (sm90) FP8 E4M3 attention path with per-block scales.

- :func:`quantize_fp8` (``tabattn_fp8.quantize``): per-block E4M3 quantisation;
- :func:`fp8_attention` (``tabattn_fp8.attention``): FP8 forward for tabattn-triton's prefix
  masks (context-target, causal, AR rows), backward by tabattn-triton's flash backward;
- :func:`fp8_shared_context_attention`, :func:`fp8_teacher_forcing_attention`
  (``tabattn_fp8.shared_context``): decode and teacher forcing with the shared context in
  FP8 and the buffer exact (tabattn-triton), merged by LSE; forward only;
- ``tabattn_fp8.reference``: the PyTorch references (quantise, dequantise, FP8-emulated
  attention);
- backend ``fp8`` of tabattn-core's registry (sm90 only, never chosen by ``auto``);
- :func:`require_sm90`, the capability check.
"""

from __future__ import annotations

import torch

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "fp8_attention",
    "fp8_shared_context_attention",
    "fp8_teacher_forcing_attention",
    "quantize_fp8",
    "require_sm90",
]


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


def __getattr__(name: str):
    """The kernels import triton: load them on first use, so `require_sm90` needs torch only."""
    if name == "fp8_attention":
        from tabattn_fp8.attention import fp8_attention

        return fp8_attention
    if name == "fp8_shared_context_attention":
        from tabattn_fp8.shared_context import fp8_shared_context_attention

        return fp8_shared_context_attention
    if name == "fp8_teacher_forcing_attention":
        from tabattn_fp8.shared_context import fp8_teacher_forcing_attention

        return fp8_teacher_forcing_attention
    if name == "quantize_fp8":
        from tabattn_fp8.quantize import quantize_fp8

        return quantize_fp8
    raise AttributeError(f"module 'tabattn_fp8' has no attribute {name!r}")
