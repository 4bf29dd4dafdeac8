"""Integration tests: every tabattn package installed together (nox session ``integration``)."""

from __future__ import annotations

import pytest

from tabattn_core.testing import interpret_triton_without_cuda, skip_gpu_tests_without_cuda

interpret_triton_without_cuda()  # before anything imports the kernels


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu_tests_without_cuda(items)
