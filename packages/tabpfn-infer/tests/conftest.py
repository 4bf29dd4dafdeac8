"""Test setup for tabpfn-infer: GPU tests are skipped when no CUDA device is present."""

from __future__ import annotations

import pytest

from tabattn_core.testing import skip_gpu_tests_without_cuda


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu_tests_without_cuda(items)
