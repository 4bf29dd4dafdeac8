"""Shared-context attention for joint sampling: fused decode and teacher forcing."""

from tabattn_triton.ops.shared_context.interface import (
    choose_num_splits,
    shared_context_attention,
    teacher_forcing_attention,
)

__all__ = ["choose_num_splits", "shared_context_attention", "teacher_forcing_attention"]
