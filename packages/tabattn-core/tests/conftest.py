"""Test setup for tabattn-core: tests that need a real GPU carry `@pytest.mark.gpu` and are
skipped when no CUDA device is present. Every test runs with a fixed seed and NaN-filled
`torch.empty` outputs, so unwritten elements fail.
"""

from __future__ import annotations

import pytest
import torch

from tabattn_core.testing import nan_poisoned_empty, skip_gpu_tests_without_cuda


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu_tests_without_cuda(items)


@pytest.fixture(autouse=True)
def _seed_and_poison():
    """Seeded RNG, and NaN-filled torch.empty outputs so unwritten elements fail tests."""
    torch.manual_seed(42)
    with nan_poisoned_empty():
        yield
