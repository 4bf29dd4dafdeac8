"""The backbone as an inference call runs it: every layer's weights stacked once per call
and one linear op for all its GEMMs (the backend's fused one, or the modules' arithmetic)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tabattn_core.mlp import activation_fn
from tabpfn_infer.model import ARTabPFN

__all__ = ["InferenceBackbone", "LinearOp", "modules_linear"]

# The registry's "linear" op: (x, weight, bias=None, *, activation=None, residual=None,
# norm_weight=None, norm_bias=None, eps=1e-5) -> y = norm(residual + act(x W^T + bias)).
LinearOp = Callable[..., torch.Tensor]


def modules_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """The "linear" op as the model's own modules compute it (torch's functional ops in x's
    dtype): x [..., d_in], weight [d_out, d_in] -> [..., d_out]."""
    y = F.linear(x, weight, bias)
    if activation is not None:
        y = activation_fn(activation)(y)
    if residual is not None:
        y = residual + y
    if norm_weight is not None:
        y = F.layer_norm(y, y.shape[-1:], norm_weight, norm_bias, eps)
    return y


def _norm_args(norm: nn.LayerNorm) -> dict[str, object]:
    return {"norm_weight": norm.weight, "norm_bias": norm.bias, "eps": norm.eps}


class InferenceBackbone:
    """`ARTabPFN`'s layers for one inference call: per layer the feature sub-layer's W_o W_v
    [D, D] and the row attention's [W_q; W_k; W_v] [3 D, D], made at construction (inside
    the call's work, so a captured graph reads the parameters in place), and `linear` for
    the five GEMMs of a layer (each with its bias, activation, residual and norm)."""

    def __init__(self, model: ARTabPFN, linear: LinearOp):
        self.layers = [
            (layer, layer.value_out_weight(), layer.attn_rows.stacked_qkv_weight())
            for layer in model.backbone.layers
        ]
        self.linear = linear

    def __call__(self, x: torch.Tensor, attend) -> torch.Tensor:
        """Rows x [..., L, D] through every layer -> [..., L, D]; attend(layer_idx, q, k, v)
        gives the row attention's output [..., H, L, Dh] from q, k, v [..., H, L, Dh]."""
        linear = self.linear
        for layer_idx, (layer, value_out, qkv) in enumerate(self.layers):
            attn = layer.attn_rows
            x1 = linear(x, value_out, residual=x, **_norm_args(layer.norm1))
            q, k, v = (attn.split_heads(t) for t in linear(x1, qkv).chunk(3, -1))
            o = attend(layer_idx, q, k, v).transpose(-2, -3).flatten(-2)
            x2 = linear(o, attn.out_proj.weight, residual=x1, **_norm_args(layer.norm2))
            up, _, down = layer.ff
            h = linear(x2, up.weight, up.bias, activation="gelu")
            x = linear(h, down.weight, down.bias, residual=x2, **_norm_args(layer.norm3))
        return x
