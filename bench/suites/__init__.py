"""Benchmark suites. Importing this package registers every suite with `bench.harness`."""

from bench.suites import context_target

__all__ = ["context_target"]
