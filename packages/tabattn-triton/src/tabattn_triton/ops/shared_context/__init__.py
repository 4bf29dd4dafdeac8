"""Shared-context attention for joint sampling: fused decode and teacher forcing."""

from tabattn_triton.ops.shared_context.interface import (
    check_context_buffer_inputs,
    check_decode_inputs,
    check_teacher_forcing_inputs,
    choose_num_splits,
    decode_with_splits,
    shared_context_attention,
    teacher_forcing_attention,
)

__all__ = [
    "check_context_buffer_inputs",
    "check_decode_inputs",
    "check_teacher_forcing_inputs",
    "choose_num_splits",
    "decode_with_splits",
    "shared_context_attention",
    "teacher_forcing_attention",
]
