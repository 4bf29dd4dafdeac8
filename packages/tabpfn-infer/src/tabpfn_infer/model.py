"""The AR-TabPFN model: the peer's parameter names and math (AR-nanoTabPFN), attention through
tabattn-core's op registry.

Rows are `[context | buffer | targets]`, each row one token of width D (the features of a
row are averaged by the embedder, as in the peer). Every layer is post-norm: a feature
sub-layer (with one token per row it reduces exactly to `W_o W_v x`), row attention with a
mask, and a GELU feed-forward block.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tabattn_core.checks import MAX_HEAD_DIM, MIN_HEAD_DIM, InputError, check_tensor
from tabattn_core.gmm import gmm_log_likelihood, gmm_sample
from tabattn_core.masks import ARTrainingRowMask
from tabattn_core.registry import get_op

__all__ = ["ARTabPFN", "load_peer_state_dict"]

MARKER_TARGET, MARKER_CONTEXT, MARKER_BUFFER = 0, 1, 2


class Embedder(nn.Module):
    """Row embeddings: mean over features of `x_embed(x_c)`, plus `y_embed(y)` for rows with
    a label, plus the row-kind marker."""

    def __init__(self, d_model: int):
        super().__init__()
        self.x_embed = nn.Linear(1, d_model)
        self.y_embed = nn.Linear(1, d_model)
        self.marker_embed = nn.Embedding(3, d_model)

    def _x(self, x: torch.Tensor) -> torch.Tensor:  # [..., N, C] -> [..., N, D]
        return self.x_embed(x.unsqueeze(-1)).mean(-2)

    def _y(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Labels [..., N] (or [..., N, 1], told apart by x [..., N, C]) -> [..., N, D]."""
        if y.dim() == x.dim():
            y = y.squeeze(-1)
        return self.y_embed(y.unsqueeze(-1))

    def context(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._x(x) + self._y(y, x) + self.marker_embed.weight[MARKER_CONTEXT]

    def buffer(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._x(x) + self._y(y, x) + self.marker_embed.weight[MARKER_BUFFER]

    def target(self, x: torch.Tensor) -> torch.Tensor:
        return self._x(x) + self.marker_embed.weight[MARKER_TARGET]


class MultiheadAttention(nn.Module):
    """Bias-free q/k/v/out projections; head h uses channels h*Dh .. (h+1)*Dh - 1."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        if d_model % n_heads:
            raise InputError(f"n_heads: expected a divisor of d_model={d_model}, got {n_heads}")
        self.n_heads = n_heads
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """[..., L, D] -> [..., H, L, Dh] (a strided view)."""
        return t.unflatten(-1, (self.n_heads, -1)).transpose(-2, -3)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [..., L, D] -> q, k, v [..., H, L, Dh] (strided views, no copies)."""
        split = self.split_heads
        return split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))

    def stacked_qkv_weight(self) -> torch.Tensor:
        """The q, k, v projection weights stacked, for one GEMM instead of three: [3 D, D]."""
        return torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])

    def project_out(self, o: torch.Tensor) -> torch.Tensor:
        """o [..., H, L, Dh] -> [..., L, D]."""
        return self.out_proj(o.transpose(-2, -3).flatten(-2))


class TwoStageTransformerLayer(nn.Module):
    """Post-norm layer: feature sub-layer, row attention, feed-forward."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int):
        super().__init__()
        self.attn_features = MultiheadAttention(d_model, n_heads)
        self.attn_rows = MultiheadAttention(d_model, n_heads)
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The feature sub-layer over one token per row: softmax over a single key is 1, so
        attention returns the value: x [..., L, D] <- norm1(x + W_o W_v x)."""
        attn = self.attn_features
        return self.norm1(x + attn.out_proj(attn.v_proj(x)))

    def value_out_weight(self) -> torch.Tensor:
        """The feature sub-layer's W_o W_v, for one GEMM instead of two: [D, D]."""
        attn = self.attn_features
        return attn.out_proj.weight @ attn.v_proj.weight

    def finish(self, x1: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Residual of the row attention (attn_out [..., H, L, Dh]) and the feed-forward:
        x1 [..., L, D] -> [..., L, D]."""
        x2 = self.norm2(x1 + self.attn_rows.project_out(attn_out))
        return self.norm3(x2 + self.ff(x2))


class TwoStageTransformer(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_layers: int, d_ff: int):
        super().__init__()
        self.layers = nn.ModuleList(
            TwoStageTransformerLayer(d_model, n_heads, d_ff) for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)


class MixtureGaussianHead(nn.Module):
    """K-component Gaussian mixture over a scalar y from a row representation z [..., D]."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        dim_y: int = 1,
        num_components: int = 5,
        std_min: float = 1e-3,
    ):
        super().__init__()
        if num_components < 2:
            raise InputError(f"num_components: expected >= 2, got {num_components}")
        if dim_y != 1:
            raise InputError(f"dim_y: expected 1 (scalar targets), got {dim_y}")
        k = num_components
        self.std_min = std_min
        self.mean_bias = nn.Parameter(torch.linspace(-1.0, 1.0, k))
        self.std_bias = nn.Parameter(torch.full((k,), math.log(math.expm1(1.0 / (k - 1)))))
        self.weight_bias = nn.Parameter(torch.zeros(k))
        self.head = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, 3 * k))

    def mixture(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z [..., D] -> (log weights, means, stds), each [..., K]; channels interleaved
        (mean, std, weight) per component; std = min(softplus(.), 2) + std_min."""
        raw = self.head(z).unflatten(-1, (-1, 3))
        mean = raw[..., 0] + self.mean_bias
        std = torch.clamp(F.softplus(raw[..., 1] + self.std_bias), max=2.0) + self.std_min
        log_w = torch.log_softmax(raw[..., 2] + self.weight_bias, -1)
        return log_w, mean, std

    def log_likelihood(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """z [..., D], y [...] -> log p(y) [...] (natural log)."""
        log_w, mean, std = self.mixture(z)
        return gmm_log_likelihood(y, log_w, mean, std)

    def sample(self, z: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """One draw per row: z [..., D] -> [...] (components by multinomial, then randn)."""
        log_w, mean, std = self.mixture(z)
        return gmm_sample(log_w, mean, std, num_samples=1, generator=generator)[..., 0]


class ARTabPFN(nn.Module):
    """The AR-TabPFN model with the peer's constructor and state-dict names.

    `num_features` is recorded but no layer depends on it: any number of columns works.
    """

    def __init__(
        self,
        d_model: int = 128,
        n_heads: int = 4,
        n_layers: int = 6,
        d_ff: int = 256,
        num_features: int = 10,
        buffer_size: int = 8,
        num_components: int = 5,
    ):
        super().__init__()
        if d_model % n_heads or not MIN_HEAD_DIM <= d_model // n_heads <= MAX_HEAD_DIM:
            raise InputError(
                f"n_heads: expected a divisor of d_model={d_model} giving a head dim in "
                f"[{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {n_heads}"
            )
        self.d_model, self.num_features, self.buffer_size = d_model, num_features, buffer_size
        self.ar_tokens = nn.Parameter(0.02 * torch.randn(buffer_size, d_model))
        self.embedder = Embedder(d_model)
        self.backbone = TwoStageTransformer(d_model, n_heads, n_layers, d_ff)
        self.head = MixtureGaussianHead(d_model, d_ff, num_components=num_components)

    @property
    def n_heads(self) -> int:
        return self.backbone.layers[0].attn_rows.n_heads

    def ar_token(self, index: torch.Tensor | int) -> torch.Tensor:
        """AR token of buffer row j: `ar_tokens[j mod buffer_size]` (the training convention,
        used for sampling and density alike)."""
        index = torch.as_tensor(index, device=self.ar_tokens.device) % self.buffer_size
        # index_select, not indexing: a 0-dim tensor index would be read on the host, which
        # a CUDA-graph capture forbids.
        rows = self.ar_tokens.index_select(0, index.reshape(-1))
        return rows.reshape(*index.shape, self.ar_tokens.shape[-1])

    def forward(
        self,
        x_context: torch.Tensor,
        y_context: torch.Tensor,
        x_buffer: torch.Tensor,
        y_buffer: torch.Tensor,
        x_target: torch.Tensor,
        y_target: torch.Tensor | None = None,
        *,
        attending_chunks: int | None = None,
        backend: str = "auto",
    ) -> torch.Tensor | None:
        """Training forward over rows [context | buffer | targets] with the AR row mask.

        x_*: [B, N, C]; y_context [B, Nc], y_buffer [B, Nb], y_target [B, Nt] (or [..., 1]).
        Returns the mean negative log-likelihood of y_target, or None without it.
        """
        check_tensor("x_context", x_context, ndim=3, dims="[B, Nc, C]")
        nc, nb, nt = x_context.shape[1], x_buffer.shape[1], x_target.shape[1]
        if nb > self.buffer_size:
            raise InputError(
                f"x_buffer: expected at most buffer_size={self.buffer_size} rows, got {nb}"
            )
        buffer = self.embedder.buffer(x_buffer, y_buffer) + self.ar_tokens[:nb]
        x = torch.cat(
            [self.embedder.context(x_context, y_context), buffer, self.embedder.target(x_target)], 1
        )
        mask = ARTrainingRowMask(nc, nb, nt, attending_chunks=attending_chunks)
        attention = get_op("attention", backend, device=x.device)
        for layer in self.backbone.layers:
            x1 = layer.features(x)
            q, k, v = layer.attn_rows.qkv(x1)
            x = layer.finish(x1, attention(q, k, v, mask=mask)[0])
        if y_target is None:
            return None
        z = self.backbone.norm(x[:, nc + nb :])
        y = y_target[..., 0] if y_target.dim() == 3 else y_target
        return -self.head.log_likelihood(z, y).mean()


def load_peer_state_dict(model: ARTabPFN, state_dict: dict[str, torch.Tensor]) -> ARTabPFN:
    """Load a peer checkpoint's weights (a `{"step", "model"}` dict or a bare state dict),
    dropping the `_orig_mod.` segments that torch.compile wrappers add. Strict: every key
    must match."""
    if "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    cleaned = {key.replace("_orig_mod.", ""): value for key, value in state_dict.items()}
    model.load_state_dict(cleaned, strict=True)
    return model
