"""Benchmark suites. Importing this package registers every suite with `bench.harness`.

One module per suite (cases, providers, reference); `flex`, `floor`,
`shared_context_providers` and `predictor_check` are parts the suites import.
"""

from bench.suites import (
    context_target,
    fp8,
    predictor,
    selection,
    shared_context,
    training,
    training_kernels,
)

__all__ = [
    "context_target",
    "fp8",
    "predictor",
    "selection",
    "shared_context",
    "training",
    "training_kernels",
]
