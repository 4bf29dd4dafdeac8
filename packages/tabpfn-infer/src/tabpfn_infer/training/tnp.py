"""Transformer neural process (TNP) for pretraining on the synthetic prior.

Rows are `[context (x and y embedded) | targets (x embedded, y unknown)]`, one token of
width d_model per row. Every block is pre-norm (LayerNorm without bias), with no biases,
no dropout and no positional encoding:

    x <- x + W_o attention(LN1(x))      context-target: context rows see the context,
                                         target rows see the context only (never a target)
    x <- x + W_2 gelu(W_1 LN2(x))       the "mlp" op

then a final LayerNorm and a head of K component MLPs (d_model -> d_ff -> 3: logit weight,
mean, log sigma) computed as one "grouped_mlp" op, and the mean Gaussian-mixture negative
log-likelihood of the targets' labels (the "gmm_nll" op). The mask, drawn for M = 3
context rows and N = 2 targets (rows query, columns key; keys are the context rows only):

    ctx_0  x x x
    ctx_1  x x x
    ctx_2  x x x
    tgt_0  x x x
    tgt_1  x x x

Each of the four kernels (attention, head, mlp, loss) runs through tabattn-core's op
registry with a backend chosen per kernel (`TNPConfig`), so a benchmark can switch one on
alone. Attention may also be "sdpa": torch's scaled_dot_product_attention over the context
keys, which computes the same function (no key is masked) and is the usual baseline.

Registry ops are called with their inputs cast to the autocast dtype (bf16 under the
training loop's CUDA autocast) and autocast switched off inside them, so every backend
sees the same explicit dtypes and the references compute in fp32 as documented.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tabattn_core.checks import InputError, check_head_dim, check_tensor
from tabattn_core.mlp import activation_fn
from tabattn_core.registry import get_backend
from tabpfn_infer.model import MultiheadAttention

__all__ = ["KERNELS", "KERNEL_DEFAULTS", "SDPA", "TNPConfig", "TransformerNP"]

#: Kernel name -> registry op it runs through (the keys of TNPConfig's per-kernel backends).
KERNELS: dict[str, str] = {
    "attention": "context_target_attention",
    "head": "grouped_mlp",
    "mlp": "mlp",
    "loss": "gmm_nll",
}
#: Attention backend name for torch's scaled_dot_product_attention (outside the registry).
SDPA = "sdpa"
#: Kernels whose default is not `TNPConfig.backend`: the FFN stays on cuBLAS, because the
#: Triton FFN loses forward+backward (H200, bf16, 512 -> 1365 -> 512: 0.55x at 8k rows,
#: 0.97x at 64k; bench/results/training_kernels.json).
KERNEL_DEFAULTS: dict[str, str] = {"mlp": "torch"}


@dataclass
class TNPConfig:
    """Model size and the backend of each kernel.

    `backend` is the default of every kernel ("auto", "torch", "triton", "fp8", "flex", or
    any registered backend) but the FFN's (KERNEL_DEFAULTS); `attention_backend`,
    `head_backend`, `mlp_backend` and `loss_backend` override it per kernel; attention also
    takes "sdpa". For the head and the FFN a backend without fused dense kernels
    (`Backend.fused_dense`: "torch", and "auto" where it picks "torch") is eager PyTorch in
    the compute dtype (cuBLAS matmuls and torch's activation), not the fp32 reference of
    tabattn-core.
    `checkpoint_blocks` recomputes each block in the backward pass
    (torch.utils.checkpoint, use_reentrant=False) to hold one block's activations at a time.
    """

    dim_x: int = 1
    d_model: int = 512
    n_heads: int = 8
    n_layers: int = 12
    d_ff: int = 1365
    num_components: int = 10
    backend: str = "auto"
    attention_backend: str | None = None
    head_backend: str | None = None
    mlp_backend: str | None = None
    loss_backend: str | None = None
    checkpoint_blocks: bool = False

    def __post_init__(self) -> None:
        for name in ("dim_x", "d_model", "n_heads", "n_layers", "d_ff", "num_components"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name}: expected an int >= 1, got {value!r}")
        if self.d_model % self.n_heads:
            raise InputError(
                f"n_heads: expected a divisor of d_model={self.d_model}, got {self.n_heads}"
            )
        check_head_dim("d_model // n_heads", self.d_model // self.n_heads)

    def backend_of(self, kernel: str) -> str:
        """The backend name of one of KERNELS."""
        if kernel not in KERNELS:
            raise InputError(f"kernel: expected one of {list(KERNELS)}, got {kernel!r}")
        override = getattr(self, f"{kernel}_backend")
        if override is not None:
            return override
        return KERNEL_DEFAULTS.get(kernel, self.backend)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TNPConfig:
        """From a dict (e.g. a checkpoint's or a JSON file's); unknown keys are an error."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise InputError(f"config: unknown keys {unknown}; expected some of {sorted(names)}")
        return cls(**values)


def _sdpa_context_target(q, k, v, *, context_lens=None, scale=None):
    """The registry's context_target_attention contract for k/v holding exactly the context
    rows (context_lens None): every key is visible, so plain SDPA computes it (no LSE)."""
    if context_lens is not None:
        raise InputError(f"context_lens: expected None for {SDPA!r}, got {context_lens!r}")
    return F.scaled_dot_product_attention(q, k, v, scale=scale), None


def _eager_mlp(x, w1, w2, *, activation="gelu"):
    """The "mlp" / "grouped_mlp" contract as a PyTorch user writes it, in x's dtype:
    act(x @ w1) @ w2 (x [N, d] against w1 [K, d, h] broadcasts to the K groups)."""
    return activation_fn(activation)(x @ w1) @ w2


class _Ops:
    """The four kernels' implementations for one device, each called with autocast off and
    its floating inputs cast to `dtype` (the loss's to fp32: labels stay exact)."""

    def __init__(self, config: TNPConfig, device: torch.device, dtype: torch.dtype):
        self.device_type, self.dtype = device.type, dtype
        self.fns: dict[str, Callable] = {}
        for kernel, op in KERNELS.items():
            name = config.backend_of(kernel)
            if kernel == "attention" and name == SDPA:
                self.fns[kernel] = _sdpa_context_target
                continue
            backend = get_backend(name, device=device, op=op)
            dense = kernel in ("head", "mlp")
            self.fns[kernel] = _eager_mlp if dense and not backend.fused_dense else backend.ops[op]

    def __call__(self, kernel: str, *args: torch.Tensor, **kwargs: Any) -> Any:
        dtype = torch.float32 if kernel == "loss" else self.dtype
        args = tuple(a.to(dtype) if a.is_floating_point() else a for a in args)
        with torch.autocast(self.device_type, enabled=False):
            return self.fns[kernel](*args, **kwargs)


def _uniform(*shape: int, fan_in: int) -> nn.Parameter:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)), nn.Linear's default weight init."""
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))


class FeedForward(nn.Module):
    """Bias-free GELU MLP, weights stored as the "mlp" op takes them: w1 [d_model, d_ff],
    w2 [d_ff, d_model]."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1 = _uniform(d_model, d_ff, fan_in=d_model)
        self.w2 = _uniform(d_ff, d_model, fan_in=d_ff)

    def forward(self, h: torch.Tensor, ops: _Ops) -> torch.Tensor:
        """h [..., d_model] -> [..., d_model]."""
        return ops("mlp", h, self.w1, self.w2)


class TNPBlock(nn.Module):
    """Pre-norm block: context-target attention, then the feed-forward, each residual."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model, bias=False)
        self.attn = MultiheadAttention(d_model, n_heads)
        self.norm2 = nn.LayerNorm(d_model, bias=False)
        self.ff = FeedForward(d_model, d_ff)

    def forward(self, x: torch.Tensor, ops: _Ops, num_context: int) -> torch.Tensor:
        """x [B, M+N, d_model] with the M context rows first."""
        attn, h = self.attn, self.norm1(x)
        context = h[:, :num_context]
        q = attn.split_heads(attn.q_proj(h))
        k, v = attn.split_heads(attn.k_proj(context)), attn.split_heads(attn.v_proj(context))
        x = x + attn.project_out(ops("attention", q, k, v)[0])
        return x + self.ff(self.norm2(x), ops)


class MixtureHead(nn.Module):
    """K component MLPs d_model -> d_ff -> 3 (logit weight, mean, log sigma), bias-free,
    as one grouped MLP: w1 [K, d_model, d_ff], w2 [K, d_ff, 3]."""

    def __init__(self, d_model: int, d_ff: int, num_components: int):
        super().__init__()
        self.w1 = _uniform(num_components, d_model, d_ff, fan_in=d_model)
        self.w2 = _uniform(num_components, d_ff, 3, fan_in=d_ff)

    def forward(
        self, z: torch.Tensor, ops: _Ops
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z [R, d_model] -> (logits, loc, log_std), each [R, K] (strided views)."""
        out = ops("head", z, self.w1, self.w2)  # [K, R, 3]
        logits, loc, log_std = out.permute(1, 0, 2).unbind(-1)
        return logits, loc, log_std


class TransformerNP(nn.Module):
    """The TNP of the module docstring; `TNPConfig` gives its size and kernel backends."""

    def __init__(self, config: TNPConfig | None = None):
        super().__init__()
        self.config = config = config if config is not None else TNPConfig()
        d = config.d_model
        self.x_embed = nn.Linear(config.dim_x, d, bias=False)
        self.y_embed = nn.Linear(1, d, bias=False)
        self.y_unknown = nn.Parameter(0.02 * torch.randn(d))
        self.blocks = nn.ModuleList(
            TNPBlock(d, config.n_heads, config.d_ff) for _ in range(config.n_layers)
        )
        self.norm = nn.LayerNorm(d, bias=False)
        self.head = MixtureHead(d, config.d_ff, config.num_components)

    def _ops(self, x: torch.Tensor) -> _Ops:
        dtype = (
            torch.get_autocast_dtype(x.device.type)
            if torch.is_autocast_enabled(x.device.type)
            else x.dtype
        )
        return _Ops(self.config, x.device, dtype)

    def _check(self, x_context, y_context, x_target) -> None:
        c = self.config.dim_x
        check_tensor("x_context", x_context, ndim=3, shape=(None, None, c), dims="[B, M, C]")
        b, m = x_context.shape[:2]
        if m < 1:
            raise InputError(f"x_context: expected at least 1 context row, got shape {[b, m, c]}")
        check_tensor("y_context", y_context, shape=(b, m), dims="[B, M]")
        check_tensor("x_target", x_target, ndim=3, shape=(b, None, c), dims="[B, N, C]")

    def encode(
        self, x_context: torch.Tensor, y_context: torch.Tensor, x_target: torch.Tensor
    ) -> torch.Tensor:
        """Final-norm representations of every row: x_context [B, M, C], y_context [B, M],
        x_target [B, N, C] -> [B, M+N, d_model] (context rows first)."""
        self._check(x_context, y_context, x_target)
        return self._encode(x_context, y_context, x_target)

    def _encode(self, x_context, y_context, x_target) -> torch.Tensor:
        m = x_context.shape[1]
        context = self.x_embed(x_context) + self.y_embed(y_context.unsqueeze(-1))
        x = torch.cat([context, self.x_embed(x_target) + self.y_unknown], 1)
        ops = self._ops(x)
        for block in self.blocks:
            if self.config.checkpoint_blocks and torch.is_grad_enabled():
                x = checkpoint(block, x, ops, m, use_reentrant=False, preserve_rng_state=False)
            else:
                x = block(x, ops, m)
        return self.norm(x)

    def mixture(
        self, x_context: torch.Tensor, y_context: torch.Tensor, x_target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The predictive mixture of each target: (logits, loc, log_std), each [B, N, K]."""
        z = self.encode(x_context, y_context, x_target)[:, x_context.shape[1] :]
        mix = self.head(z.flatten(0, 1), self._ops(z))
        return tuple(t.unflatten(0, z.shape[:2]) for t in mix)

    def forward(
        self,
        x_context: torch.Tensor,
        y_context: torch.Tensor,
        x_target: torch.Tensor,
        y_target: torch.Tensor,
    ) -> torch.Tensor:
        """Mean negative log-likelihood (nats per target) of y_target [B, N], a 0-dim fp32
        tensor; x_context [B, M, C], y_context [B, M], x_target [B, N, C]."""
        self._check(x_context, y_context, x_target)
        check_tensor("y_target", y_target, shape=x_target.shape[:2], dims="[B, N]")
        z = self._encode(x_context, y_context, x_target)[:, x_context.shape[1] :].flatten(0, 1)
        ops = self._ops(z)
        logits, loc, log_std = self.head(z, ops)
        return ops("loss", y_target.flatten(), logits, loc, log_std, scale_param="log_std")
