"""Gaussian mixture head math: log-likelihood, loss, sampling, moments, CDF and quantiles.

A mixture over the last axis of `logits, loc, scale: [..., K]` (batch axes broadcast).
Component k has weight softmax(logits)_k, mean loc_k and standard deviation
std_k = scale_k (`scale_param="std"`, must be > 0; not checked, to avoid a device sync)
or std_k = exp(scale_k) (`scale_param="log_std"`). Every function computes in the promoted
dtype of its floating inputs, at least fp32, and returns results in that dtype.
The head layout matches the peer AR-TabPFN `MixtureGaussianHead` (dim_y = 1).
"""

from __future__ import annotations

import math
from functools import reduce

import torch

from tabattn_core.checks import FLOAT_DTYPES, InputError, check_same_device, check_tensor

__all__ = [
    "SCALE_PARAMS",
    "check_mixture",
    "gmm_cdf",
    "gmm_log_likelihood",
    "gmm_mean_var",
    "gmm_nll",
    "gmm_quantile",
    "gmm_sample",
    "gmm_sample_from_noise",
]

SCALE_PARAMS = ("std", "log_std")
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = reduce(torch.promote_types, (t.dtype for t in tensors))
    return dtype if dtype == torch.float64 else torch.float32


def check_mixture(
    logits: object,
    loc: object,
    scale: object,
    scale_param: str,
    *,
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES,
    **others: object,
) -> torch.Size:
    """Check a mixture's parameters logits, loc, scale [..., K] (K >= 1, one device, `dtypes`)
    and `others` (each [...], e.g. y); returns the broadcast batch shape [...]."""
    if scale_param not in SCALE_PARAMS:
        raise InputError(f"scale_param: expected one of {SCALE_PARAMS}, got {scale_param!r}")
    params = {"logits": logits, "loc": loc, "scale": scale}
    for name, t in params.items():
        check_tensor(name, t, dtypes=dtypes, dims="[..., K]")
        if t.dim() == 0:
            raise InputError(f"{name}: expected at least 1 dim [..., K], got a 0-dim tensor")
    k = logits.shape[-1]
    if k < 1:
        raise InputError(f"logits: expected K >= 1 components (last dim), got {k}")
    for name in ("loc", "scale"):
        if params[name].shape[-1] != k:
            raise InputError(
                f"{name}: expected K = {k} components (last dim, as logits), "
                f"got {params[name].shape[-1]} in shape {list(params[name].shape)}"
            )
    for name, t in others.items():
        check_tensor(name, t, dtypes=dtypes, dims="[...]")
    check_same_device(**params, **others)

    batch = logits.shape[:-1]
    for name, shape in [(n, t.shape[:-1]) for n, t in params.items()] + [
        (n, t.shape) for n, t in others.items()
    ]:
        try:
            batch = torch.broadcast_shapes(batch, shape)
        except RuntimeError:
            raise InputError(
                f"{name}: expected a batch shape broadcastable with {list(batch)}, "
                f"got {list(shape)}"
            ) from None
    return batch


def _mixture(
    logits: object,
    loc: object,
    scale: object,
    scale_param: str,
    **others: object,
) -> tuple[torch.dtype, torch.Size, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check the mixture (and `others`, each [...]) and return
    (dtype, batch shape, log_weights, loc, std, log_std), the last four [..., K]."""
    batch = check_mixture(logits, loc, scale, scale_param, **others)
    dtype = _compute_dtype(logits, loc, scale, *others.values())
    log_w = torch.log_softmax(logits.to(dtype), dim=-1)
    scale = scale.to(dtype)
    if scale_param == "std":
        std, log_std = scale, torch.log(scale)
    else:
        std, log_std = torch.exp(scale), scale
    return dtype, batch, log_w, loc.to(dtype), std, log_std


def gmm_log_likelihood(
    y: torch.Tensor,
    logits: torch.Tensor,
    loc: torch.Tensor,
    scale: torch.Tensor,
    *,
    scale_param: str = "std",
) -> torch.Tensor:
    """Natural-log density log p(y) of the mixture.

    y: [...]; logits, loc, scale: [..., K]. Returns [...] (y broadcast with the batch).
    logsumexp_k [log_softmax(logits)_k - log std_k - log(2π)/2 - ((y - loc_k) / std_k)² / 2],
    stable for peaked components and far-away y (finite wherever the value is representable).
    """
    dtype, _, log_w, loc, std, log_std = _mixture(logits, loc, scale, scale_param, y=y)
    z = (y.to(dtype)[..., None] - loc) / std
    return torch.logsumexp(log_w - log_std - _HALF_LOG_2PI - 0.5 * z.square(), dim=-1)


def gmm_nll(
    y: torch.Tensor,
    logits: torch.Tensor,
    loc: torch.Tensor,
    scale: torch.Tensor,
    *,
    scale_param: str = "std",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean negative log-likelihood, a 0-dim tensor (the reference for fused loss kernels).

    y: [...]; logits, loc, scale: [..., K]; mask: [...] bool or float weights (shape of the
    log-likelihood). Without mask: sum(nll) / max(numel, 1); with mask:
    sum(nll * mask) / max(sum(mask), 1). Masked-out (zero) positions add 0 to the value even
    where their nll is not finite (their gradients still need finite inputs).
    """
    nll = -gmm_log_likelihood(y, logits, loc, scale, scale_param=scale_param)
    if mask is None:
        return nll.sum() / max(nll.numel(), 1)
    check_tensor("mask", mask, shape=nll.shape, device=nll.device, dims="[...]")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise InputError(f"mask: expected dtype bool or a floating dtype, got {mask.dtype}")
    weight = mask.to(nll.dtype)
    total = torch.where(weight != 0, nll * weight, torch.zeros_like(nll)).sum()
    return total / weight.sum().clamp_min(1.0)


def gmm_sample_from_noise(
    logits: torch.Tensor,
    loc: torch.Tensor,
    scale: torch.Tensor,
    uniform: torch.Tensor,
    normal: torch.Tensor,
    *,
    scale_param: str = "std",
) -> torch.Tensor:
    """One draw per mixture from noise drawn beforehand, by inverse CDF: the component is the
    first k whose cumulative weight exceeds `uniform`, the sample loc_k + std_k * `normal`.

    logits, loc, scale: [..., K]; uniform (in [0, 1)), normal: [...] -> [...]. With uniform
    ~ U[0, 1) and normal ~ N(0, 1) independent, the result is a draw from the mixture; no RNG
    and no host sync inside, so a CUDA graph can capture it and the noise sets the draw.
    """
    dtype, batch, log_w, loc, std, _ = _mixture(
        logits, loc, scale, scale_param, uniform=uniform, normal=normal
    )
    k = log_w.shape[-1]
    shape = (*batch, k)
    cdf = log_w.exp().cumsum(-1)
    # Components whose cumulative weight is <= u come before the drawn one; the clamp covers
    # a total weight that rounds below u.
    idx = (cdf <= uniform.to(dtype)[..., None]).sum(-1, keepdim=True).clamp_max(k - 1)
    loc_i = loc.expand(shape).gather(-1, idx.expand(*batch, 1))
    std_i = std.expand(shape).gather(-1, idx.expand(*batch, 1))
    return (loc_i + std_i * normal.to(dtype)[..., None])[..., 0]


def gmm_sample(
    logits: torch.Tensor,
    loc: torch.Tensor,
    scale: torch.Tensor,
    *,
    num_samples: int,
    generator: torch.Generator | None = None,
    scale_param: str = "std",
) -> torch.Tensor:
    """Draw samples from the mixture: logits, loc, scale: [..., K] -> [..., num_samples].

    RNG order (as the peer head): one `torch.multinomial(softmax(logits) as [N, K],
    num_samples, replacement=True, generator=generator)` for the component indices, then one
    `torch.randn([N, num_samples], generator=generator)`; sample = loc + std * eps. With an
    explicit `generator` (on the inputs' device) the result is reproducible from its seed.
    Differentiable with respect to loc and scale (reparameterised given the indices).
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise InputError(f"num_samples: expected an int >= 1, got {num_samples!r}")
    dtype, batch, log_w, loc, std, _ = _mixture(logits, loc, scale, scale_param)
    k = log_w.shape[-1]
    shape = (*batch, k)
    probs = log_w.exp().expand(shape).reshape(-1, k)
    idx = torch.multinomial(probs, num_samples, replacement=True, generator=generator)
    loc_i = loc.expand(shape).reshape(-1, k).gather(1, idx)
    std_i = std.expand(shape).reshape(-1, k).gather(1, idx)
    eps = torch.randn(idx.shape, generator=generator, dtype=dtype, device=idx.device)
    return (loc_i + std_i * eps).reshape(*batch, num_samples)


def gmm_mean_var(
    logits: torch.Tensor,
    loc: torch.Tensor,
    scale: torch.Tensor,
    *,
    scale_param: str = "std",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixture mean and variance: logits, loc, scale: [..., K] -> (mean [...], var [...]).

    var = sum_k w_k (std_k² + (loc_k - mean)²), which is never negative.
    """
    _, _, log_w, loc, std, _ = _mixture(logits, loc, scale, scale_param)
    w = log_w.exp()
    mean = (w * loc).sum(-1)
    var = (w * (std.square() + (loc - mean[..., None]).square())).sum(-1)
    return mean, var


def gmm_cdf(
    x: torch.Tensor,
    logits: torch.Tensor,
    loc: torch.Tensor,
    scale: torch.Tensor,
    *,
    scale_param: str = "std",
) -> torch.Tensor:
    """Mixture CDF P(Y <= x): x: [...]; logits, loc, scale: [..., K] -> [...].

    sum_k softmax(logits)_k Φ((x - loc_k) / std_k).
    """
    dtype, _, log_w, loc, std, _ = _mixture(logits, loc, scale, scale_param, x=x)
    return (log_w.exp() * torch.special.ndtr((x.to(dtype)[..., None] - loc) / std)).sum(-1)


def gmm_quantile(
    q: float | torch.Tensor,
    logits: torch.Tensor,
    loc: torch.Tensor,
    scale: torch.Tensor,
    *,
    scale_param: str = "std",
    tol: float = 1e-10,
    max_iter: int = 200,
) -> torch.Tensor:
    """Mixture quantiles by bisection on the CDF (not differentiable).

    q: a float or a 1-D tensor [Q] of probabilities in (0, 1); logits, loc, scale: [..., K].
    Returns [..., Q] (or [...] for a float q). The bracket is
    [min_k, max_k] of the component quantiles loc_k + std_k Φ⁻¹(q), which always holds the
    mixture quantile (exact for K = 1). Bisection runs, vectorised over all elements, until
    the widest bracket is below `tol` (absolute, in units of y) or `max_iter` halvings; the
    result is the final midpoint.
    """
    if not 0 < tol < math.inf:
        raise InputError(f"tol: expected a finite positive float, got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise InputError(f"max_iter: expected an int >= 0, got {max_iter!r}")
    if isinstance(q, torch.Tensor):
        check_tensor("q", q, ndim=1, dtypes=FLOAT_DTYPES, dims="[Q]")
        if q.numel() and not bool(((q > 0) & (q < 1)).all()):
            raise InputError(
                f"q: expected probabilities in (0, 1), got min {q.min().item()} "
                f"max {q.max().item()}"
            )
    elif isinstance(q, (int, float)) and not isinstance(q, bool):
        if not 0 < q < 1:
            raise InputError(f"q: expected a probability in (0, 1), got {q!r}")
    else:
        raise InputError(f"q: expected a float or a 1-D tensor, got {type(q).__name__}")

    dtype, batch, log_w, loc, std, _ = _mixture(logits, loc, scale, scale_param)
    qs = torch.as_tensor(q, dtype=dtype, device=log_w.device).reshape(-1)
    with torch.no_grad():
        w, loc, std = log_w.exp()[..., None, :], loc[..., None, :], std[..., None, :]
        comp_q = loc + std * torch.special.ndtri(qs)[:, None]  # [..., Q, K]
        lo = comp_q.amin(-1).expand(*batch, qs.numel()).clone()
        hi = comp_q.amax(-1).expand(*batch, qs.numel()).clone()
        width = (hi - lo).amax().item() if lo.numel() else 0.0
        n_iter = min(max_iter, max(0, math.ceil(math.log2(width / tol)))) if width > 0 else 0
        for _ in range(n_iter):
            mid = 0.5 * (lo + hi)
            below = (w * torch.special.ndtr((mid[..., None] - loc) / std)).sum(-1) < qs
            lo = torch.where(below, mid, lo)
            hi = torch.where(below, hi, mid)
        x = 0.5 * (lo + hi)
    return x if isinstance(q, torch.Tensor) else x.squeeze(-1)
