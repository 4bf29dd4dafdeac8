import pytest
import torch

from tabattn_core.testing import nan_poisoned_empty


@pytest.fixture(autouse=True)
def _seed_and_poison():
    """Seeded RNG, and NaN-filled torch.empty outputs so unwritten elements fail tests."""
    torch.manual_seed(42)
    with nan_poisoned_empty():
        yield
