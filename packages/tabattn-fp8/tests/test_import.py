from __future__ import annotations

import ast
import sys
from importlib import metadata
from pathlib import Path

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


def _triton_imports() -> list[tuple[str, int, str, list[str]]]:
    """Every import of tabattn_triton in tabattn-fp8's sources and tests (at any depth of
    the module, function bodies included): (file, line, module, names)."""
    root = Path(__file__).resolve().parents[1]
    found = []
    for path in sorted([*(root / "src").rglob("*.py"), *(root / "tests").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported = [(node.module, [a.name for a in node.names])]
                if node.module == "tabattn_triton":  # `from tabattn_triton import ops`
                    imported = [(f"tabattn_triton.{a.name}", []) for a in node.names]
            elif isinstance(node, ast.Import):
                imported = [(a.name, []) for a in node.names]
            else:
                continue
            for module, names in imported:
                if module.split(".")[0] == "tabattn_triton":
                    file = path.relative_to(root).as_posix()
                    found.append((file, node.lineno, module, names))
    return sorted(found)


def test_imports_from_tabattn_triton_only_its_building_blocks() -> None:
    # tabattn-triton's API for kernel packages is tabattn_triton.building_blocks (its
    # __all__, covered by the package version); everything else there is internal.
    from tabattn_triton import building_blocks

    found = _triton_imports()
    assert found, "the scan found no import of tabattn_triton at all"
    elsewhere = [f for f in found if f[2] != "tabattn_triton.building_blocks"]
    assert not elsewhere, f"tabattn_triton imported other than from building_blocks: {elsewhere}"
    undeclared = [
        (file, line, name)
        for file, line, _, names in found
        for name in names
        if name not in building_blocks.__all__
    ]
    assert not undeclared, f"names not in building_blocks.__all__: {undeclared}"
    assert all(hasattr(building_blocks, name) for name in building_blocks.__all__)


def test_the_scan_sees_every_kind_of_import(tmp_path, monkeypatch) -> None:
    source = (
        "import tabattn_triton.ops.common\n"
        "from tabattn_triton import ops\n"
        "def f():\n"
        "    from tabattn_triton.ops.attention import flash_attention\n"
        "from tabattn_triton.building_blocks import load_rows\n"
    )
    (tmp_path / "src").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "src" / "m.py").write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "__file__", str(tmp_path / "tests" / "t.py"))
    assert [f[1:3] for f in _triton_imports()] == [
        (1, "tabattn_triton.ops.common"),
        (2, "tabattn_triton.ops"),
        (4, "tabattn_triton.ops.attention"),
        (5, "tabattn_triton.building_blocks"),
    ]
