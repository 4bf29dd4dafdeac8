"""Test setup for tabattn-fp8.

On CPU the kernels run under the Triton interpreter: nox sets ``TRITON_INTERPRET=1``
before Python starts (Triton reads it at import time). Tests that need a real GPU carry
``@pytest.mark.gpu`` and are skipped here when no CUDA device is present.
"""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
