"""Test setup for tabattn-fp8.

On CPU the kernels run under the Triton interpreter: nox sets ``TRITON_INTERPRET=1``
before Python starts (Triton reads it at import time). Tests that need a real GPU carry
``@pytest.mark.gpu`` and are skipped here when no CUDA device is present.
"""

from __future__ import annotations

import pytest

from tabattn_core.testing import skip_gpu_tests_without_cuda


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu_tests_without_cuda(items)
