"""The predictor's passes over a trained `ARTabPFN`: the context prefill, joint density by
teacher forcing, decoding (joint sampling, stepwise density) and the marginals. The density
and decoding passes are built as stages (`graphs.Stages`) to run eagerly or from CUDA
graphs. op(name): the routed registry op of that name on the inputs' device; linear: the
linear op of the backbone's GEMMs (`layers.InferenceBackbone`)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from tabattn_core.gmm import gmm_sample_from_noise
from tabattn_core.kv_cache import SharedContextKVCache
from tabpfn_infer.model import ARTabPFN
from tabpfn_infer.predictor.graphs import Stages
from tabpfn_infer.predictor.layers import InferenceBackbone, LinearOp

__all__ = ["decode_stages", "density_stages", "marginal_mixture", "prefill"]

OpOf = Callable[[str], Callable]
KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (k, v), each [G, H, Nc, Dh]


def prefill(
    model: ARTabPFN,
    backbone: InferenceBackbone,
    attention: Callable,
    x_context: torch.Tensor,
    y_context: torch.Tensor,
) -> KV:
    """Row-attention K/V of the context rows, per layer: x_context [G, Nc, C], y_context
    [G, Nc] -> [(k, v)] with k, v [G, H, Nc, Dh] (strided views). Context rows attend to
    each other. attention: the routed "attention" op."""
    kv = []

    def attend(_, q, k, v):
        kv.append((k, v))
        return attention(q, k, v)[0]

    backbone(model.embedder.context(x_context, y_context), attend)
    return kv


def density_stages(
    model: ARTabPFN, op: OpOf, linear: LinearOp, inputs: dict[str, torch.Tensor]
) -> Stages:
    """The teacher-forcing pass over `inputs` (see `Batch.inputs`) as one stage: per-target
    log p(y_t | context, y_0..y_{t-1}) [G, S, Nt]."""
    x_target, y_target = inputs["x_target"], inputs["y"]
    nt = x_target.shape[2]
    attention, teacher_forcing = op("attention"), op("teacher_forcing_attention")
    result = torch.empty(y_target.shape, device=x_target.device, dtype=x_target.dtype)

    def density() -> None:
        backbone = InferenceBackbone(model, linear)
        ctx_kv = prefill(model, backbone, attention, inputs["x_context"], inputs["y_context"])
        ar = model.ar_token(torch.arange(nt, device=x_target.device))
        rows = torch.cat(
            [
                model.embedder.buffer(x_target, y_target) + ar,
                model.embedder.target(x_target),
            ],
            2,
        )  # [G, S, 2 Nt, D]

        def attend(i, q, k, v):
            return teacher_forcing(q, *ctx_kv[i], k[..., :nt, :], v[..., :nt, :])[0]

        x = backbone(rows, attend)
        z = model.backbone.norm(x[:, :, nt:])
        result.copy_(model.head.log_likelihood(z, y_target))

    return [(density, 1)], result


def decode_stages(
    model: ARTabPFN, op: OpOf, linear: LinearOp, inputs: dict[str, torch.Tensor], *, sampling: bool
) -> Stages:
    """Decoding the targets of `inputs` in order, as two stages: the context prefill and
    step 0 (the target row alone), then step t >= 1, run Nt - 1 times: [buffer row t-1
    (its x and its sampled or fixed y), target row t]; the buffer row sees the context
    and buffer rows 0..t-1, the target the same; nobody sees a target. The step index
    lives in a device tensor, so one captured graph replays every step >= 1.

    inputs["y"]: the noise [2, G, S, Nt] (uniform, normal) when `sampling`, else the
    fixed y [G, S, Nt]. Result [G, S, Nt]: the samples, or the fixed y's log densities.
    """
    x_target, y = inputs["x_target"], inputs["y"]
    g, s, nt, _ = x_target.shape
    dev, dtype = x_target.device, x_target.dtype
    first = model.backbone.layers[0].attn_rows
    # The prefilled context K/V are read in place (never copied); the cache holds the
    # per-path buffers.
    cache = SharedContextKVCache.allocate(
        num_layers=len(model.backbone.layers),
        num_datasets=g,
        num_samples=s,
        kv_heads=first.n_heads,
        head_dim=model.d_model // first.n_heads,
        buffer_capacity=max(nt, 1),
        dtype=dtype,
        device=dev,
    )
    attention, decode = op("attention"), op("shared_context_attention")
    result = torch.empty((g, s, nt), device=dev, dtype=dtype)
    previous = torch.empty((g, s), device=dev, dtype=dtype)  # y of the last buffer row
    step = torch.zeros((), dtype=torch.long, device=dev)
    state: dict[str, object] = {}  # made by the first stage, read by the next steps

    def run_layers(x, start, rule):
        """All layers over rows x written at buffer slots [start, start + rows); the
        last row's final norm [G, S, D]. start: 0 or the step tensor minus one."""
        buffer_len = start + x.shape[2]
        length = cache.buffer_capacity if isinstance(start, torch.Tensor) else buffer_len
        ctx_kv = state["ctx_kv"]

        def attend(i, q, k, v):
            cache.write_buffer(i, k, v, start=start)
            k_buf, v_buf = cache.buffer(i, length=length)
            return decode(q, *ctx_kv[i], k_buf, v_buf, buffer_len=buffer_len, row_rule=rule)[0]

        x = state["backbone"](x, attend)
        return model.backbone.norm(x[:, :, -1])

    def head(z) -> None:
        """Sample (or score the fixed value of) the target at `step`."""
        at = step.reshape(1)
        if sampling:
            uniform, normal = y.index_select(-1, at)[..., 0]
            value = gmm_sample_from_noise(*model.head.mixture(z), uniform, normal)
            previous.copy_(value)
        else:
            fixed = y.index_select(-1, at)[..., 0]
            value = model.head.log_likelihood(z, fixed)
            previous.copy_(fixed)
        result.index_copy_(2, at, value[..., None].to(dtype))

    def prefill_and_first_step() -> None:
        state["backbone"] = backbone = InferenceBackbone(model, linear)
        state["ctx_kv"] = prefill(
            model, backbone, attention, inputs["x_context"], inputs["y_context"]
        )
        state["targets"] = targets = model.embedder.target(x_target)  # [G, S, Nt, D]
        step.zero_()
        head(run_layers(targets[:, :, :1], 0, ("strict",)))

    def next_step() -> None:
        step.add_(1)
        x_prev = x_target.index_select(2, (step - 1).reshape(1))
        target = state["targets"].index_select(2, step.reshape(1))
        buffer_row = model.embedder.buffer(x_prev, previous[..., None])
        rows = torch.cat([buffer_row + model.ar_token(step - 1), target], 2)
        head(run_layers(rows, step - 1, ("causal", "strict")))

    if nt == 0:
        return [], result
    return [(prefill_and_first_step, 1), (next_step, nt - 1)], result


def marginal_mixture(
    model: ARTabPFN,
    op: OpOf,
    linear: LinearOp,
    x_context: torch.Tensor,
    y_context: torch.Tensor,
    x_target: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each target's mixture given the context alone: x_context [G, Nc, C], y_context
    [G, Nc], x_target [G, S, Nt, C] -> (log weights, means, stds), each [G, S, Nt, K]. The
    targets attend to the context, not to each other (a decode step with no buffer). With
    Nt = 0 the mixtures are empty [G, S, 0, K] and no attention runs."""
    targets = model.embedder.target(x_target)  # [G, S, Nt, D]
    if targets.shape[2] == 0:
        return model.head.mixture(model.backbone.norm(targets))
    backbone = InferenceBackbone(model, linear)
    ctx_kv = prefill(model, backbone, op("attention"), x_context, y_context)
    decode = op("shared_context_attention")
    x = backbone(targets, lambda i, q, k, v: decode(q, *ctx_kv[i])[0])
    return model.head.mixture(model.backbone.norm(x))
