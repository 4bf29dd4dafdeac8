from __future__ import annotations

from importlib import metadata

import pytest
import torch

import tabattn_fp8
from tabattn_fp8 import require_sm90
from tabattn_fp8.backend import register


def test_version_matches_metadata() -> None:
    assert tabattn_fp8.__version__ == metadata.version("tabattn-fp8") == "0.1.0"


def test_entry_point_declared() -> None:
    eps = metadata.entry_points(group="tabattn.backends")
    (ep,) = [ep for ep in eps if ep.name == "fp8"]
    assert ep.value == "tabattn_fp8.backend:register"
    assert ep.load() is register


def test_register_adds_the_fp8_backend_on_any_machine() -> None:
    # Registering never touches the GPU; whether the backend can run is its `available`.
    added = []

    class Registry:
        def register_backend(self, backend) -> None:
            added.append(backend)

    assert register(Registry()) is None
    (backend,) = added
    assert backend.name == "fp8"
    assert backend.available(torch.device("cpu"))[0] is False


def test_require_sm90_rejects_cpu_naming_it() -> None:
    with pytest.raises(RuntimeError, match=r"sm90") as info:
        require_sm90("cpu")
    message = str(info.value)
    assert "'cpu'" in message
    assert "no CUDA" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_require_sm90_without_cuda_says_so() -> None:
    with pytest.raises(RuntimeError, match=r"no CUDA device is available"):
        require_sm90()
    with pytest.raises(RuntimeError, match=r"'cuda:0'.*no CUDA device is available"):
        require_sm90("cuda:0")


@pytest.mark.gpu
def test_require_sm90_on_gpu_matches_capability() -> None:
    major, minor = torch.cuda.get_device_capability()
    if major == 9:
        assert require_sm90().type == "cuda"
    else:
        with pytest.raises(RuntimeError, match=rf"compute capability {major}\.{minor}"):
            require_sm90()


@pytest.mark.gpu
@pytest.mark.sm90
def test_require_sm90_accepts_hopper() -> None:
    assert require_sm90(torch.device("cuda", 0)) == torch.device("cuda", 0)
