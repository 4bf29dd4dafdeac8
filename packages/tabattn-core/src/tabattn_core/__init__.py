"""tabattn-core: PyTorch references, mask specs, partial-attention merge (and the
context + buffer combinator built on it), GMM math, KV-cache layouts, input checks, test
helpers and the op registry of tabattn.

Torch only: nothing here imports triton. Kernel packages register themselves in
`tabattn_core.registry` through the `tabattn.backends` entry point group.
"""

from tabattn_core.checks import InputError
from tabattn_core.context_buffer import context_buffer_op
from tabattn_core.gmm import (
    gmm_cdf,
    gmm_log_likelihood,
    gmm_mean_var,
    gmm_nll,
    gmm_quantile,
    gmm_sample,
    gmm_sample_from_noise,
)
from tabattn_core.kv_cache import SharedContextKVCache
from tabattn_core.masks import (
    ARTrainingRowMask,
    BufferDecodeMask,
    CausalMask,
    ContextTargetMask,
    FullMask,
    MaskSpec,
    SelectionMask,
    TeacherForcingMask,
)
from tabattn_core.precision import FP32_DOT_PRECISIONS, fp32_dot_precision
from tabattn_core.reference import (
    attention,
    context_target_attention,
    merge_states,
    selection_attention,
    shared_context_attention,
    teacher_forcing_attention,
    varlen_attention,
)
from tabattn_core.registry import OPS, Backend, get_backend, get_op

__version__ = "0.1.0"

__all__ = [
    "FP32_DOT_PRECISIONS",
    "OPS",
    "ARTrainingRowMask",
    "Backend",
    "BufferDecodeMask",
    "CausalMask",
    "ContextTargetMask",
    "FullMask",
    "InputError",
    "MaskSpec",
    "SelectionMask",
    "SharedContextKVCache",
    "TeacherForcingMask",
    "attention",
    "context_buffer_op",
    "context_target_attention",
    "fp32_dot_precision",
    "get_backend",
    "get_op",
    "gmm_cdf",
    "gmm_log_likelihood",
    "gmm_mean_var",
    "gmm_nll",
    "gmm_quantile",
    "gmm_sample",
    "gmm_sample_from_noise",
    "merge_states",
    "selection_attention",
    "shared_context_attention",
    "teacher_forcing_attention",
    "varlen_attention",
    "__version__",
]
