"""Benchmark suites. Importing this package registers every suite with `bench.harness`."""

from bench.suites import context_target, selection, shared_context

__all__ = ["context_target", "selection", "shared_context"]
