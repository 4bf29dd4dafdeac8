"""The building blocks of tabattn-triton that kernel packages (tabattn-fp8) may use.

Public API covered by the package version: a name here is removed or changes its meaning
only in a release that says so in CHANGELOG.md and is breaking under semantic versioning
(a new minor version while 0.x), so `tabattn-triton>=0.1,<0.2` holds it. Everything else
under `tabattn_triton.ops` is internal and may change in any release.
"""

from tabattn_triton.backend import attention as backend_attention
from tabattn_triton.ops.attention.interface import (
    PrefixMask,
    attention_bwd,
    check_attention_inputs,
    flash_attention,
    prefix_mask_of,
)
from tabattn_triton.ops.attention.kernel import key_tiles, query_block
from tabattn_triton.ops.common import (
    LOG2E,
    MASK_CONTEXT,
    bucket,
    capturing,
    dot_precision,
    finish_softmax,
    head_block,
    interpreting,
    load_rows,
    needs_grad,
    online_softmax_tile,
    pick_configs,
)
from tabattn_triton.ops.kernel_checks import check_device, check_kernel_tensors
from tabattn_triton.ops.shared_context import (
    check_context_buffer_inputs,
    check_decode_inputs,
    check_teacher_forcing_inputs,
    shared_context_attention,
    teacher_forcing_attention,
)

__all__ = [
    # ops: the triton backend's "attention" (the reference for non-prefix masks), flash
    # attention and its backward launcher, the shared-context ops
    "backend_attention",
    "flash_attention",
    "attention_bwd",
    "shared_context_attention",
    "teacher_forcing_attention",
    # argument checks: tabattn-core's contract, then the kernels' own checks
    "check_attention_inputs",
    "check_context_buffer_inputs",
    "check_decode_inputs",
    "check_teacher_forcing_inputs",
    "check_device",
    "check_kernel_tensors",
    # the kernel form of a mask spec
    "MASK_CONTEXT",
    "PrefixMask",
    "prefix_mask_of",
    # launch helpers
    "LOG2E",
    "bucket",
    "capturing",
    "dot_precision",
    "head_block",
    "interpreting",
    "needs_grad",
    "pick_configs",
    # @triton.jit device functions of the prefix-mask kernels
    "finish_softmax",
    "key_tiles",
    "load_rows",
    "online_softmax_tile",
    "query_block",
]
