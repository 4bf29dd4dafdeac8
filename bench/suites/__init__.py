"""Benchmark suites. Importing this package registers every suite with `bench.harness`."""

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
