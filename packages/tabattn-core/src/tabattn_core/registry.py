"""The op registry: op names and signatures, backends that implement them, and the choice
of backend.

Backends: `torch` (the references of `tabattn_core.reference`, everywhere) is built in;
kernel packages register more through the `tabattn.backends` entry point group (a callable
taking the registry), and, when run from source without installed metadata, by importing the
known backend modules. `get_backend("auto", device=...)` picks the highest-priority backend
available on the device that implements the op, and says why once (logger "tabattn").
The environment variable TABATTN_BACKEND forces a backend by name. What a backend can do
beyond its ops is in its capability fields (`Backend`), which callers read instead of
testing its name.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tabattn_core import gmm, mlp, reference
from tabattn_core.checks import InputError

__all__ = [
    "ATTENTION_OPS",
    "DENSE_OPS",
    "OPS",
    "Backend",
    "BackendChoice",
    "Registry",
    "choose_backend",
    "get_backend",
    "get_op",
    "registry",
]

log = logging.getLogger("tabattn")

# Op name -> signature; every backend's implementation takes and returns exactly these.
OPS: dict[str, str] = {
    "attention": "(q, k, v, *, mask=None, scale=None) -> (out, lse)",
    "context_target_attention": "(q, k, v, *, context_lens=None, scale=None) -> (out, lse)",
    "shared_context_attention": (
        "(q, k_ctx, v_ctx, k_buf=None, v_buf=None, *, buffer_len=0, context_lens=None, "
        "row_rule='causal', scale=None) -> (out, lse)"
    ),
    "teacher_forcing_attention": (
        "(q, k_ctx, v_ctx, k_buf, v_buf, *, context_lens=None, scale=None) -> (out, lse)"
    ),
    "varlen_attention": (
        "(q, k, v, *, cu_seqlens_q, cu_seqlens_k, causal=False, scale=None) -> (out, lse)"
    ),
    "selection_attention": (
        "(q, k, v, *, cu_seqlens_q, cu_seqlens_k, block_indices, block_size, causal=False, "
        "scale=None) -> (out, lse)"
    ),
    "merge_states": "(out_a, lse_a, out_b, lse_b) -> (out, lse)",
    "gmm_nll": "(y, logits, loc, scale, *, scale_param='std', mask=None) -> loss",
    "grouped_mlp": "(x, w1, w2, *, activation='gelu') -> y",
    "mlp": "(x, w1, w2, *, activation='gelu') -> y",
    "linear": (
        "(x, weight, bias=None, *, activation=None, residual=None, norm_weight=None, "
        "norm_bias=None, eps=1e-5) -> y"
    ),
}

# The ops that compute attention scores, and the dense ones (GEMMs with their epilogues):
# the ops that `Backend.materialises_scores` and `Backend.fused_dense` speak of.
ATTENTION_OPS = (
    "attention",
    "context_target_attention",
    "shared_context_attention",
    "teacher_forcing_attention",
    "varlen_attention",
    "selection_attention",
)
DENSE_OPS = ("linear", "mlp", "grouped_mlp")

# Backend modules tried when entry points are not installed (running from source).
KNOWN_BACKEND_MODULES = ("tabattn_triton.backend", "tabattn_fp8.backend")
ENTRY_POINT_GROUP = "tabattn.backends"
ENV_BACKEND = "TABATTN_BACKEND"


def _everywhere(device: torch.device) -> tuple[bool, str]:
    return True, f"runs on any device ({device.type} included)"


@dataclass(frozen=True)
class Backend:
    """A named set of op implementations and what they can do.

    `available(device) -> (ok, why)` says whether it can run on a device; `priority` orders
    the automatic choice (higher first). Capabilities, which callers read instead of the
    name (each False unless the backend declares it):

    - `materialises_scores`: its ATTENTION_OPS hold the dense [Lq, Lk] scores in memory.
    - `graph_safe`: once warmed up, its ops run without host syncs (CUDA graphs capture them).
    - `fused_dense`: its DENSE_OPS are fused kernels, to run in place of PyTorch's modules.
    """

    name: str
    priority: int
    ops: dict[str, Callable] = field(default_factory=dict)
    available: Callable[[torch.device], tuple[bool, str]] = _everywhere
    description: str = ""
    materialises_scores: bool = False
    graph_safe: bool = False
    fused_dense: bool = False


@dataclass(frozen=True)
class BackendChoice:
    backend: Backend
    reason: str


class Registry:
    """Backends by name. Thread-safe; discovery runs once, on first use."""

    def __init__(self) -> None:
        self._backends: dict[str, Backend] = {}
        self._load_errors: dict[str, str] = {}
        self._discovered = False
        self._said: set[tuple[str, str, str]] = set()
        self._lock = threading.RLock()

    def register_backend(self, backend: Backend) -> None:
        """Add (or replace) a backend; its ops must be known op names, its capabilities
        bools, and each capability must speak of ops it has."""
        unknown = sorted(set(backend.ops) - set(OPS))
        if unknown:
            raise InputError(f"backend.ops: expected op names among {sorted(OPS)}, got {unknown}")
        for name, ops in (
            ("materialises_scores", ATTENTION_OPS),
            ("graph_safe", OPS),
            ("fused_dense", DENSE_OPS),
        ):
            value = getattr(backend, name)
            if not isinstance(value, bool):
                raise InputError(f"backend.{name}: expected a bool, got {value!r}")
            if value and not set(ops) & set(backend.ops):
                raise InputError(
                    f"backend.{name}: expected False for a backend without any of {list(ops)}, "
                    f"got True (ops: {sorted(backend.ops)})"
                )
        with self._lock:
            self._backends[backend.name] = backend

    def discover(self) -> None:
        """Load entry-point backends, then known modules not loaded that way."""
        with self._lock:
            if self._discovered:
                return
            self._discovered = True
            loaded_modules = set()
            for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                self._load(ep.name, lambda ep=ep: ep.load())
                loaded_modules.add(ep.value.split(":")[0])
            for module in KNOWN_BACKEND_MODULES:
                if module in loaded_modules:
                    continue
                try:
                    found = importlib.util.find_spec(module) is not None
                except ModuleNotFoundError:
                    found = False
                if found:
                    self._load(module, lambda m=module: importlib.import_module(m).register)

    def _load(self, name: str, get_register: Callable[[], Callable]) -> None:
        try:
            get_register()(self)
        except Exception as exc:  # a broken backend must not break the others
            self._load_errors[name] = f"{type(exc).__name__}: {exc}"
            log.warning("tabattn: backend %s failed to load: %s", name, self._load_errors[name])

    @property
    def load_errors(self) -> dict[str, str]:
        self.discover()
        return dict(self._load_errors)

    def backends(self) -> list[Backend]:
        """All registered backends, highest priority first."""
        self.discover()
        with self._lock:
            return sorted(self._backends.values(), key=lambda b: -b.priority)

    def choose(
        self, name: str = "auto", *, device: torch.device | str | None = None, op: str | None = None
    ) -> BackendChoice:
        """Resolve a backend name ("auto" or a registered name) for a device and op."""
        self.discover()
        if op is not None and op not in OPS:
            raise InputError(f"op: expected one of {sorted(OPS)}, got {op!r}")
        dev = torch.device(device) if device is not None else _default_device()
        forced = os.environ.get(ENV_BACKEND)
        if name == "auto" and forced:
            name, how = forced, f"forced by {ENV_BACKEND}={forced}"
        else:
            how = "asked for by name"
        if name != "auto":
            backend = self._backends.get(name)
            if backend is None:
                raise InputError(
                    f"backend: expected 'auto' or one of {sorted(self._backends)}, got {name!r}"
                    + (f" (load errors: {self._load_errors})" if self._load_errors else "")
                )
            ok, why = backend.available(dev)
            if not ok:
                raise InputError(f"backend: {name!r} cannot run on {dev}: {why}")
            if op is not None and op not in backend.ops:
                raise InputError(f"backend: {name!r} does not implement op {op!r}")
            return BackendChoice(backend, f"{name} on {dev}: {how}")
        skipped = []
        for backend in self.backends():
            ok, why = backend.available(dev)
            if ok and (op is None or op in backend.ops):
                reason = f"auto -> {backend.name} on {dev}: {why}"
                if skipped:
                    reason += f" (skipped: {'; '.join(skipped)})"
                return BackendChoice(backend, reason)
            skipped.append(f"{backend.name}: {why if not ok else f'no {op}'}")
        raise InputError(
            f"backend: no backend can run {op or 'ops'} on {dev} ({'; '.join(skipped)})"
        )

    def get_backend(
        self, name: str = "auto", *, device: torch.device | str | None = None, op: str | None = None
    ) -> Backend:
        """`choose(...)`, logging the reason once per (name, device, op)."""
        choice = self.choose(name, device=device, op=op)
        key = (name, str(device), str(op))
        if key not in self._said:
            self._said.add(key)
            log.info("tabattn: %s", choice.reason)
        return choice.backend

    def get_op(
        self, op: str, backend: str = "auto", *, device: torch.device | str | None = None
    ) -> Callable:
        """The implementation of `op` in the chosen backend."""
        return self.get_backend(backend, device=device, op=op).ops[op]


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _torch_backend() -> Backend:
    return Backend(
        name="torch",
        priority=0,
        description="PyTorch references (tabattn_core.reference); CPU and CUDA",
        # The references build the dense scores, read lengths given as tensors on the host
        # (shared_context_attention's buffer_len), and compute the dense ops in fp32 for
        # 16-bit inputs, no faster than the modules.
        materialises_scores=True,
        graph_safe=False,
        fused_dense=False,
        ops={
            "attention": reference.attention,
            "context_target_attention": reference.context_target_attention,
            "shared_context_attention": reference.shared_context_attention,
            "teacher_forcing_attention": reference.teacher_forcing_attention,
            "varlen_attention": reference.varlen_attention,
            "selection_attention": reference.selection_attention,
            "merge_states": reference.merge_states,
            "gmm_nll": gmm.gmm_nll,
            "grouped_mlp": mlp.grouped_mlp,
            "mlp": mlp.mlp,
            "linear": mlp.linear,
        },
    )


registry = Registry()
registry.register_backend(_torch_backend())
choose_backend = registry.choose
get_backend = registry.get_backend
get_op = registry.get_op
