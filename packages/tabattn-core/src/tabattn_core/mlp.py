"""Two-layer MLPs without biases: the transformer feed-forward block and the K component
MLPs of a mixture head run as one grouped computation.

`mlp`: y = act(x @ w1) @ w2. `grouped_mlp`: K MLPs over the same rows x,
y[k] = act(x @ w1[k]) @ w2[k]. Activations: "gelu" (exact, erf form), "relu", "silu".
`linear`: one inference-time linear layer with what a post-norm transformer layer does
after it: y = norm(residual + act(x @ weight^T + bias)).
The references compute in fp32 (fp64 for fp64 inputs) and return x's dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from tabattn_core.checks import FLOAT_DTYPES, InputError, check_tensor

__all__ = [
    "ACTIVATIONS",
    "activation_fn",
    "check_linear",
    "check_mlp",
    "grouped_mlp",
    "linear",
    "mlp",
]

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": lambda t: F.gelu(t, approximate="none"),
    "relu": F.relu,
    "silu": F.silu,
}


def activation_fn(activation: object) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation of that name; InputError for any other value."""
    if activation not in ACTIVATIONS:
        raise InputError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {activation!r}")
    return ACTIVATIONS[activation]


def check_mlp(
    x: object,
    w1: object,
    w2: object,
    *,
    grouped: bool,
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES,
) -> None:
    """Shapes, dtypes and devices of an MLP's arguments.

    grouped: x [N, d_in], w1 [K, d_in, d_hidden], w2 [K, d_hidden, d_out];
    otherwise x [..., d_in], w1 [d_in, d_hidden], w2 [d_hidden, d_out]. w1 and w2 take x's
    dtype and device.
    """
    lead = (None,) if grouped else ()
    if grouped:
        check_tensor("x", x, ndim=2, dtypes=dtypes, dims="[N, d_in]")
    else:
        check_tensor("x", x, dtypes=dtypes, dims="[..., d_in]")
        if x.dim() == 0:
            raise InputError("x: expected at least 1 dim [..., d_in], got a 0-dim tensor")
    d_in = x.shape[-1]
    w1_dims = "[K, d_in, d_hidden]" if grouped else "[d_in, d_hidden]"
    check_tensor(
        "w1", w1, shape=(*lead, d_in, None), dtypes=(x.dtype,), device=x.device, dims=w1_dims
    )
    groups = w1.shape[:1] if grouped else ()
    w2_dims = "[K, d_hidden, d_out]" if grouped else "[d_hidden, d_out]"
    check_tensor(
        "w2",
        w2,
        shape=(*groups, w1.shape[-1], None),
        dtypes=(x.dtype,),
        device=x.device,
        dims=w2_dims,
    )


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def mlp(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, *, activation: str = "gelu"
) -> torch.Tensor:
    """Feed-forward block: y = act(x @ w1) @ w2.

    x: [..., d_in]; w1: [d_in, d_hidden]; w2: [d_hidden, d_out] (x's dtype and device).
    Returns y [..., d_out] in x's dtype.
    """
    act = activation_fn(activation)
    check_mlp(x, w1, w2, grouped=False)
    dt = _compute_dtype(x)
    return (act(x.to(dt) @ w1.to(dt)) @ w2.to(dt)).to(x.dtype)


def grouped_mlp(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, *, activation: str = "gelu"
) -> torch.Tensor:
    """K MLPs over the same rows: y[k] = act(x @ w1[k]) @ w2[k].

    x: [N, d_in] (shared by the K groups); w1: [K, d_in, d_hidden]; w2: [K, d_hidden, d_out]
    (x's dtype and device). Returns y [K, N, d_out] in x's dtype.
    """
    act = activation_fn(activation)
    check_mlp(x, w1, w2, grouped=True)
    dt = _compute_dtype(x)
    return (act(x.to(dt) @ w1.to(dt)) @ w2.to(dt)).to(x.dtype)


def check_linear(
    x: object,
    weight: object,
    bias: object = None,
    *,
    activation: object = None,
    residual: object = None,
    norm_weight: object = None,
    norm_bias: object = None,
    eps: object = 1e-5,
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES,
) -> None:
    """Arguments of `linear`: x [..., d_in]; weight [d_out, d_in] (nn.Linear's layout);
    bias, norm_weight, norm_bias [d_out]; residual [..., d_out] like the output; one dtype
    and device; norm_weight and norm_bias together; eps > 0."""
    if activation is not None:
        activation_fn(activation)
    check_tensor("x", x, dtypes=dtypes, dims="[..., d_in]")
    if x.dim() == 0:
        raise InputError("x: expected at least 1 dim [..., d_in], got a 0-dim tensor")
    same = {"dtypes": (x.dtype,), "device": x.device}
    check_tensor("weight", weight, shape=(None, x.shape[-1]), dims="[d_out, d_in]", **same)
    d_out = weight.shape[0]
    for name, t in (("bias", bias), ("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if t is not None:
            check_tensor(name, t, shape=(d_out,), dims="[d_out]", **same)
    if (norm_weight is None) != (norm_bias is None):
        raise InputError("norm_weight, norm_bias: expected both tensors or both None")
    if residual is not None:
        check_tensor(
            "residual", residual, shape=(*x.shape[:-1], d_out), dims="[..., d_out]", **same
        )
    if not (isinstance(eps, float | int) and eps > 0):
        raise InputError(f"eps: expected a positive number, got {eps!r}")


def linear(
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
    """Linear layer with a post-norm transformer's epilogue, in this order:
    y = x @ weight^T (+ bias); y = act(y) (activation given); y = y + residual (given);
    y = layer_norm(y) * norm_weight + norm_bias (given).

    x: [..., d_in]; weight: [d_out, d_in]; bias, norm_weight, norm_bias: [d_out];
    residual: [..., d_out]. Returns y [..., d_out] in x's dtype.
    """
    check_linear(
        x, weight, bias, activation=activation, residual=residual,
        norm_weight=norm_weight, norm_bias=norm_bias, eps=eps,
    )  # fmt: skip
    dt = _compute_dtype(x)
    y = F.linear(x.to(dt), weight.to(dt), None if bias is None else bias.to(dt))
    if activation is not None:
        y = activation_fn(activation)(y)
    if residual is not None:
        y = y + residual.to(dt)
    if norm_weight is not None:
        y = F.layer_norm(y, y.shape[-1:], norm_weight.to(dt), norm_bias.to(dt), eps)
    return y.to(x.dtype)
