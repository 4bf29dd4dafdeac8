"""FP8 shared-context decode and teacher forcing: the context part in FP8, the buffer part
exact (tabattn-triton), merged by LSE."""

from tabattn_fp8.shared_context.interface import (
    fp8_shared_context_attention,
    fp8_teacher_forcing_attention,
)

__all__ = ["fp8_shared_context_attention", "fp8_teacher_forcing_attention"]
