"""Test setup for tabattn-fp8.

On CPU the kernels run under the Triton interpreter: without a CUDA device this conftest
sets ``TRITON_INTERPRET=1`` (as nox does) before the kernels are imported, since Triton reads
it as each kernel is defined. Tests that need a real GPU carry ``@pytest.mark.gpu`` (and
``sm90`` for Hopper) and are skipped when no CUDA device is present. Every test runs with a
fixed seed and NaN-filled ``torch.empty`` outputs, so unwritten elements fail.
"""

from __future__ import annotations

import pytest
import torch

from tabattn_core.testing import (
    interpret_triton_without_cuda,
    nan_poisoned_empty,
    skip_gpu_tests_without_cuda,
)

interpret_triton_without_cuda()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu_tests_without_cuda(items)


@pytest.fixture(autouse=True)
def _seed_and_poison():
    torch.manual_seed(42)
    with nan_poisoned_empty():
        yield
