"""`ARTabPFNPredictor`: joint sampling and joint density with a trained `ARTabPFN`, with the
peer's method names (`sample_sequence`, `evaluate_joint_density`, `prefill_context`,
`from_trained_model`).

Batch rows that share one context (all rows equal) are run as one dataset with many sample
paths: the context K/V is computed once and read by every path, never copied. Otherwise each
row is its own dataset. The KV cache belongs to the call, or with CUDA graphs to the
predictor's captured graphs (nothing is stored on the model), so predictors sharing a model
do not interfere; threads sharing one predictor take turns.

With `context_top_k` the buffer and target rows read, of the context, only the top-k blocks
that `select_blocks` picks for each row (selection attention, for contexts of 100k rows and
more); their buffer part stays exact, and the two parts are merged by their LSEs.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tabattn_core.checks import InputError, check_positive_int, check_tensor
from tabattn_core.gmm import gmm_sample_from_noise
from tabattn_core.kv_cache import SharedContextKVCache
from tabattn_core.precision import check_fp32_dot_precision, fp32_dot_precision
from tabattn_core.reference import merge_states
from tabattn_core.registry import get_backend
from tabattn_core.selection import select_blocks
from tabpfn_infer.model import ARTabPFN

__all__ = ["ARTabPFNPredictor", "check_finite"]


def check_finite(name: str, t: torch.Tensor, axes: tuple[str, ...]) -> None:
    """Reject NaN/inf naming the first bad element by its axes (e.g. batch, row, column)."""
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        where = [int(i) for i in bad.nonzero()[0]]
        at = ", ".join(f"{axis} {i}" for axis, i in zip(axes, where, strict=True))
        raise InputError(f"{name}: expected finite values, got {t[tuple(where)].item()} at {at}")


# The ops whose context part `context_top_k` replaces by selection attention.
CONTEXT_OPS = ("shared_context_attention", "teacher_forcing_attention")

SCORE_BUDGET = 512 * 2**20  # bytes of fp32 scores per reference attention call


def _split_call(
    op, name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *buffers, **kwargs
):
    """Run a reference op in slices so its dense scores stay under SCORE_BUDGET: "attention"
    (q [B, H, L, D]) along B; the shared-context ops and the top-k context (q [G, S, H, L,
    D]) along S, or along G (with the context) when S = 1. Returns (out, lse) like the op."""
    keys = k.shape[-2] + (buffers[0].shape[-2] if buffers and buffers[0] is not None else 0)
    dim = 0 if name == "attention" or q.shape[1] == 1 else 1
    per_slice = 4 * keys * (q.numel() // q.shape[-1]) // max(q.shape[dim], 1)
    step = max(1, SCORE_BUDGET // max(per_slice, 1))
    if step >= q.shape[dim]:
        return op(q, k, v, *buffers, **kwargs)
    lens = kwargs.get("context_lens")
    outs, lses = [], []
    for i in range(0, q.shape[dim], step):
        part = slice(i, i + step)
        if dim == 0:
            args = (
                q[part],
                k[part],
                v[part],
                *(b[part] if b is not None else None for b in buffers),
            )
            if isinstance(lens, torch.Tensor):
                kwargs = {**kwargs, "context_lens": lens[part]}
        else:
            args = (q[:, part], k, v, *(b[:, part] if b is not None else None for b in buffers))
        out, lse = op(*args, **kwargs)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim), torch.cat(lses, dim)


log = logging.getLogger("tabattn")
_said: set[tuple[str, bool]] = set()

# With `context_top_k`, the context is read by exact dense attention (the op the predictor
# runs without top-k) where that was measured faster than the selection: contexts of fewer
# than DENSE_CONTEXT_BELOW rows, or top_k * block_size covering at least
# DENSE_CONTEXT_FRACTION of the context. One rule for decoding and teacher forcing (both
# then read the same keys: the chain rule holds). Measured by `python -m
# bench.suites.selection crossover` (default ARTabPFN, float32, triton backend, eager, one
# shared context; evaluate_joint_density and sample_sequence; the rule of least summed
# relative time lost over its grid): bench/results/selection_crossover.json, "rules" ->
# "predictor" (that run, on an H200 at commit f1e78e4, was cut off in the predictor part; its
# printed cells are in bench/results/selection_crossover_predictor.log). Dense was faster in
# every cell measured: density at Nc 1024-65536 (B 64, Nt 16: top-k 1.05-2.5x slower;
# B 512, Nt 64: 1.5-26x) and sampling at Nc 1024 (2.0x). Both passes pay the context's own
# dense attention, and top-k runs eagerly with a host sync per layer. So contexts up to the
# largest measured, 2**16 rows, read densely; longer ones take the top-k asked for
# (unmeasured). A top-k covering the whole context (the dense result) runs the dense op.
DENSE_CONTEXT_BELOW = 2**16 + 1
DENSE_CONTEXT_FRACTION = 1.0


def _dense_context(name: str, nc: int, *, top_k: int, block_size: int) -> bool:
    """Whether the `context_top_k` call of op `name` over a context of nc rows runs exact
    dense attention (module constants above); logs each op's first decision either way."""
    dense = nc < DENSE_CONTEXT_BELOW or top_k * block_size >= DENSE_CONTEXT_FRACTION * nc
    if (name, dense) not in _said:
        _said.add((name, dense))
        log.info(
            "tabattn: ARTabPFNPredictor context_top_k=%d (blocks of %d) over %d context rows: "
            "%s runs %s (dense below DENSE_CONTEXT_BELOW=%d rows or from "
            "DENSE_CONTEXT_FRACTION=%s of the context)",
            top_k,
            block_size,
            nc,
            name,
            "exact dense attention" if dense else "selection attention",
            DENSE_CONTEXT_BELOW,
            DENSE_CONTEXT_FRACTION,
        )
    return dense


def _top_k_context(
    attend,
    q: torch.Tensor,
    k_ctx: torch.Tensor,
    v_ctx: torch.Tensor,
    *,
    block_size: int,
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows q [G, S, H, L, D] over the top-k blocks of their dataset's context k_ctx, v_ctx
    [G, H_kv, Nc, D], chosen by `select_blocks` per row and kv head. Dataset g is one varlen
    sequence: its S*L rows over its Nc keys. attend: the registry's "selection_attention".
    Returns out [G, S, H, L, D], lse [G, S, H, L] (strided views of the packed results)."""
    g, s, h, rows, d = q.shape
    nc = k_ctx.shape[2]
    # [G, S, L, H, D] and [G, Nc, H_kv, D] are the projections' own layouts: views, no copies.
    q_rows = q.permute(0, 1, 3, 2, 4).reshape(g * s * rows, h, d)
    k, v = (t.transpose(1, 2).reshape(g * nc, t.shape[1], d) for t in (k_ctx, v_ctx))
    offsets = torch.arange(g + 1, device=q.device, dtype=torch.int64)
    cu = {"cu_seqlens_q": offsets * (s * rows), "cu_seqlens_k": offsets * nc}
    blocks = select_blocks(q_rows, k, block_size=block_size, top_k=top_k, **cu)
    out, lse = attend(q_rows, k, v, block_indices=blocks, block_size=block_size, **cu)
    return (
        out.unflatten(0, (g, s, rows)).permute(0, 1, 3, 2, 4),
        lse.unflatten(1, (g, s, rows)).permute(1, 2, 0, 3),
    )


def _merge_with_buffer(context, op, dense, q, k_ctx, v_ctx, k_buf=None, v_buf=None, **kwargs):
    """A decode or teacher-forcing `op` whose context part is `context(q, k_ctx, v_ctx)`
    (the top-k selection): `op` runs over the buffer alone (an empty context, Nc = 0) and the
    two parts are merged by their LSEs. Without a buffer, the context part alone. Where
    `dense(Nc)` (`_dense_context`), `op` itself over context and buffer, as without top-k."""
    if dense(k_ctx.shape[2]):
        return op(q, k_ctx, v_ctx, *(() if k_buf is None else (k_buf, v_buf)), **kwargs)
    part = context(q, k_ctx, v_ctx)
    if k_buf is None:
        return part
    empty = k_ctx[:, :, :0], v_ctx[:, :, :0]
    return merge_states(*part, *op(q, *empty, k_buf, v_buf, **kwargs))


def _through_layers(
    model: ARTabPFN,
    x: torch.Tensor,
    attend,
    weights: list[tuple[torch.Tensor, torch.Tensor]],
    linear=None,
) -> torch.Tensor:
    """Rows x [..., L, D] through every layer of the backbone; attend(layer_idx, q, k, v)
    gives the row attention's output [..., H, L, Dh] from that layer's projections.
    weights: every layer's `inference_weights()`, made once per call; linear: the registry's
    fused linear op for the projections and feed-forward (None: the model's own modules)."""
    for layer_idx, (layer, (value_out, qkv)) in enumerate(
        zip(model.backbone.layers, weights, strict=True)
    ):
        x1 = layer.features(x, value_out, linear)
        x = layer.finish(x1, attend(layer_idx, *layer.attn_rows.qkv(x1, qkv, linear)), linear)
    return x


# Counts every registration of a parameter or submodule by any module (assigning a
# Parameter or a Module attribute, register_parameter, load_state_dict(assign=True), a new
# layer): the cue for a predictor to list its model's parameters anew.
_registrations = [0]


def _count_registration(*_args) -> None:
    _registrations[0] += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_count_registration)
torch.nn.modules.module.register_module_module_registration_hook(_count_registration)


def _max_magnitude(t: torch.Tensor) -> torch.Tensor:
    """max |t| as a 0-dim fp32 tensor (NaN if t holds one; 0 if empty or integer, always
    finite); an expanded (stride 0) dim is read once."""
    t = t[tuple(slice(0, 1) if stride == 0 else slice(None) for stride in t.stride())]
    if not t.is_floating_point() or t.numel() == 0:
        return torch.zeros((), device=t.device)
    return torch.linalg.vector_norm(t, float("inf")).float()


def _largest_magnitude(given: list[tuple[str, torch.Tensor, tuple[str, ...]]]) -> torch.Tensor:
    """max |value| over the given tensors, a 0-dim fp32 tensor on the first one's device:
    finite iff they all are (NaN and inf propagate through max; a finite value beyond fp32's
    range only triggers the exact check)."""
    device = given[0][1].device
    return torch.stack([_max_magnitude(t).to(device) for _, t, _ in given]).amax()


def _inference_weights(model: ARTabPFN) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [layer.inference_weights() for layer in model.backbone.layers]


@dataclass
class _Batch:
    """Inputs arranged as G datasets x S sample paths."""

    x_context: torch.Tensor  # [G, Nc, C]
    y_context: torch.Tensor  # [G, Nc]
    x_target: torch.Tensor  # [G, S, Nt, C]
    y_target: torch.Tensor | None  # [G, S, Nt]
    batch: int  # B = G * S
    given: list[tuple[str, torch.Tensor, tuple[str, ...]]]  # the caller's (name, tensor, axes)
    largest: float | None  # finite iff every given tensor is; None: not yet computed

    def check_finite(self) -> None:
        """Raise `InputError` naming the first NaN/inf of the given tensors. Called after the
        call's work is queued, it queues the max |value| of the inputs behind that work, so
        the read is the call's only host sync."""
        if self.largest is None:
            self.largest = float(_largest_magnitude(self.given))
        if not math.isfinite(self.largest):
            for name, t, axes in self.given:
                check_finite(name, t, axes)
        self.largest = 0.0

    def inputs(self, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors a call reads, by name (y: the labels or the noise it needs)."""
        return {
            "x_context": self.x_context,
            "y_context": self.y_context,
            "x_target": self.x_target,
            "y": y,
        }


def _in_precision_scope(method: Callable) -> Callable:
    """Run a predictor method with its kernels' float32 dots in `self.fp32_precision`."""

    @functools.wraps(method)
    def scoped(self, *args, **kwargs):
        with fp32_dot_precision(self.fp32_precision):
            return method(self, *args, **kwargs)

    return scoped


class ARTabPFNPredictor:
    """Joint predictions of a trained `ARTabPFN`.

    backend: "auto" (core's registry picks the best available for the device), "torch",
    "triton", ... for every attention op. cuda_graph: on a CUDA device with a kernel backend,
    `sample_sequence`, `stepwise_log_density` and `evaluate_joint_density` capture their work
    in CUDA graphs at their first call with given input shapes (warm-up and capture: that
    call costs a few eager calls) and later calls with those shapes copy their inputs in and
    replay the graphs instead of launching every kernel from Python; decode steps 1.. are
    one graph replayed per step (the step index lives on the device). Per method the graphs
    of the latest shapes are kept, with their static buffers and KV cache, until
    `release_graphs()` (`captured_methods` lists them). A capture that CUDA refuses is
    reported by a warning, and those calls run eagerly.

    fp32_precision: how the kernels multiply a float32 model's operands on tensor cores
    (`tabattn_core.precision`; fp32 accumulation in every mode): "bf16x3" (default: ~16
    mantissa bits per product; joint densities within ~1e-3 nats of float64, measured in
    the `predictor` bench suite, and ~1.4x faster than "tf32x3" on Hopper), "tf32x3"
    (fp32-level products, ~3e-5 nats) or "tf32" (10 bits; ~2e-2 nats, too coarse for
    densities). The PyTorch parts of the model and the "torch" backend follow torch's own
    settings; bf16/fp16 models are unaffected.

    context_top_k: None (default) for exact attention; an int k for selection attention over
    large contexts: every buffer and target row (joint density, decode steps, marginals)
    reads, per layer and kv head, only the k context blocks of `context_block_size` rows
    whose mean key scores highest against its query (`tabattn_core.selection.select_blocks`),
    through the registry's "selection_attention"; its attention over the buffer stays exact,
    and the two parts are merged by their LSEs. A row's blocks depend only on its query and
    the context, so decoding and teacher forcing pick the same ones (the chain rule holds).
    k >= the number of blocks is exact. Where exact dense attention was measured faster
    (`bench.suites.selection crossover`), it is used instead, and the results are those of
    the predictor without top-k: contexts shorter than `DENSE_CONTEXT_BELOW` rows, or k
    blocks covering at least `DENSE_CONTEXT_FRACTION` of the context (module constants; one
    rule for decoding and teacher forcing, so the chain rule still holds; each op's first
    decision is logged, logger "tabattn"). The context rows' own attention
    (`prefill_context`) stays dense. Block selection synchronises with the host (not
    graph-safe): with top-k, every call runs eagerly, without CUDA graphs.
    """

    def __init__(
        self,
        model: ARTabPFN,
        *,
        backend: str = "auto",
        cuda_graph: bool = True,
        context_top_k: int | None = None,
        context_block_size: int = 64,
        fp32_precision: str = "bf16x3",
    ):
        self.model = model
        self.backend = backend
        self.cuda_graph = cuda_graph
        self.fp32_precision = check_fp32_dot_precision("fp32_precision", fp32_precision)
        if context_top_k is not None:
            check_positive_int("context_top_k", context_top_k)
        self.context_top_k = context_top_k
        self.context_block_size = check_positive_int("context_block_size", context_block_size)
        self._parameter_list: tuple[int, list[torch.Tensor]] | None = None  # (registrations, list)
        self._graph_devices: dict[torch.device, bool] = {}  # `_graphs_apply` per device
        self._graphs: dict[str, _Captured] = {}  # per method, the latest input shapes'
        self._eager: set[tuple] = set()  # (method, input key) whose capture CUDA refused
        self._lock = threading.Lock()

    @classmethod
    def from_trained_model(cls, model: ARTabPFN, backend: str = "auto") -> ARTabPFNPredictor:
        return cls(model, backend=backend)

    # ---- inputs ---------------------------------------------------------------------

    def _model_parameters(self) -> list[torch.Tensor]:
        """The model's parameters, listed anew only after a parameter or module was
        registered anywhere (`_registrations`); walking the module tree every call costs
        ~0.15 ms of host time on the GPU machine."""
        if self._parameter_list is None or self._parameter_list[0] != _registrations[0]:
            self._parameter_list = (_registrations[0], list(self.model.parameters()))
        return self._parameter_list[1]

    def _weight_addresses(self) -> tuple[int, ...]:
        """The address of every parameter, read every call: `p.data = ...` and `.to()` move
        a parameter without registering one."""
        return tuple(map(torch.Tensor.data_ptr, self._model_parameters()))

    def _arrange(self, x_context, y_context, x_target, y_target=None) -> _Batch:
        param = self._model_parameters()[0]
        dev, dt = param.device, param.dtype
        check_tensor("x_context", x_context, ndim=3, dims="[B, Nc, C]")
        b, nc, c = x_context.shape
        check_tensor("x_target", x_target, ndim=3, dims="[B, Nt, C]")
        if x_target.shape[0] != b or x_target.shape[2] != c:
            raise InputError(
                f"x_target: expected shape [{b}, Nt, {c}] (batch and columns of x_context), "
                f"got {list(x_target.shape)}"
            )
        if y_context.dim() == 3:
            y_context = y_context.squeeze(-1)
        check_tensor("y_context", y_context, shape=(b, nc), dims="[B, Nc] or [B, Nc, 1]")
        nt = x_target.shape[1]
        if y_target is not None:
            check_tensor("y_target", y_target, shape=(b, nt), dims="[B, Nt]")
        given = [
            (name, t, axes)
            for name, t, axes in (
                ("x_context", x_context, ("batch", "row", "column")),
                ("y_context", y_context, ("batch", "row")),
                ("x_target", x_target, ("batch", "row", "column")),
                ("y_target", y_target, ("batch", "row")),
            )
            if t is not None
        ]
        # Finite inputs are confirmed after the call is queued (`_Batch.check_finite`), unless
        # the shared-context test below needs a sync anyway: then both are read at once.
        largest = None
        if b == 1 or (x_context.stride(0) == 0 and y_context.stride(0) == 0):
            shared = b > 1  # one row, or one context expanded B times: no test needed
        else:
            same = (x_context == x_context[:1]).all() & (y_context == y_context[:1]).all()
            magnitude = _largest_magnitude(given)
            shared, largest = torch.stack([same.to(magnitude.dtype), magnitude]).tolist()
        g, s = (1, b) if shared else (b, 1)
        # Only the distinct contexts are converted (an expanded shared context is never
        # copied B times).
        x_context, y_context = (t[:g].to(dev, dt) for t in (x_context, y_context))
        x_target = x_target.to(dev, dt)
        y_target = None if y_target is None else y_target.to(dev, dt)
        batch = _Batch(
            x_context,
            y_context,
            x_target.view(g, s, nt, c),
            None if y_target is None else y_target.view(g, s, nt),
            b,
            given,
            largest,
        )
        if largest is not None:
            batch.check_finite()
        return batch

    def _op(self, name: str, device: torch.device):
        """The registry's implementation of `name`; the PyTorch references materialise the
        scores, so there the call is split along datasets or sample paths to keep them
        under SCORE_BUDGET bytes (the kernels need no split). With `context_top_k`, the
        decode and teacher-forcing ops read the context through `_top_k_context`, or
        densely where `_dense_context` says (measured faster)."""
        backend = get_backend(self.backend, device=device, op=name)
        op = backend.ops[name]
        if backend.name == "torch":
            op = functools.partial(_split_call, op, name)
        if self.context_top_k is None or name not in CONTEXT_OPS:
            return op
        selection = get_backend(self.backend, device=device, op="selection_attention")
        context = functools.partial(
            _top_k_context,
            selection.ops["selection_attention"],
            block_size=self.context_block_size,
            top_k=self.context_top_k,
        )
        if selection.name == "torch":
            context = functools.partial(_split_call, context, "selection_attention")
        dense = functools.partial(
            _dense_context, name, top_k=self.context_top_k, block_size=self.context_block_size
        )
        return functools.partial(_merge_with_buffer, context, op, dense)

    def _linear(self, device: torch.device):
        """The fused linear op (GEMM + bias/activation/residual/norm in one launch) of the
        backend running the decode op, or None (the model's own modules) for the PyTorch
        backend and for backends without it."""
        backend = get_backend(self.backend, device=device, op="shared_context_attention")
        return None if backend.name == "torch" else backend.ops.get("linear")

    # ---- the three passes -------------------------------------------------------------

    @torch.no_grad()
    @_in_precision_scope
    def prefill_context(
        self,
        x_context: torch.Tensor,
        y_context: torch.Tensor,
        weights: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Row-attention K/V of the context rows, per layer: x_context [G, Nc, C], y_context
        [G, Nc] -> [(k, v)] with k, v [G, H, Nc, Dh] (strided views). Context rows attend to
        each other. weights: the layers' `inference_weights()`, when the caller has them."""
        weights = _inference_weights(self.model) if weights is None else weights
        attention = self._op("attention", x_context.device)
        kv = []

        def attend(_, q, k, v):
            kv.append((k, v))
            return attention(q, k, v)[0]

        rows = self.model.embedder.context(x_context, y_context)
        _through_layers(self.model, rows, attend, weights, self._linear(rows.device))
        return kv

    @torch.no_grad()
    @_in_precision_scope
    def evaluate_joint_density(
        self,
        x_context: torch.Tensor,
        y_context: torch.Tensor,
        x_target: torch.Tensor,
        y_target: torch.Tensor,
    ) -> torch.Tensor:
        """Per-target conditional log densities log p(y_t | context, y_0..y_{t-1}) in one
        teacher-forcing pass; their sum over t is the joint log density.

        x_context [B, Nc, C], y_context [B, Nc] (or [B, Nc, 1]), x_target [B, Nt, C],
        y_target [B, Nt] -> [B, Nt] (natural log). Buffer row j carries ar_tokens[j mod bs].
        """
        data = self._arrange(x_context, y_context, x_target, y_target)
        return self._run("evaluate_joint_density", data, data.y_target, self._density_stages)

    def _density_stages(self, inputs: dict[str, torch.Tensor]) -> _Stages:
        """The teacher-forcing pass over `inputs` (see `_Batch.inputs`) as one stage."""
        model = self.model
        x_target, y_target = inputs["x_target"], inputs["y"]
        nt = x_target.shape[2]
        teacher_forcing = self._op("teacher_forcing_attention", x_target.device)
        linear = self._linear(x_target.device)
        result = torch.empty(y_target.shape, device=x_target.device, dtype=x_target.dtype)

        def density() -> None:
            weights = _inference_weights(model)
            ctx_kv = self.prefill_context(inputs["x_context"], inputs["y_context"], weights)
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

            x = _through_layers(model, rows, attend, weights, linear)
            z = model.backbone.norm(x[:, :, nt:])
            result.copy_(model.head.log_likelihood(z, y_target))

        return [(density, 1)], result

    @torch.no_grad()
    @_in_precision_scope
    def sample_sequence(
        self,
        x_context: torch.Tensor,
        y_context: torch.Tensor,
        x_target: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """One joint sample per batch row: y_t ~ p(y_t | context, y_0..y_{t-1}) in order.

        x_context [B, Nc, C], y_context [B, Nc], x_target [B, Nt, C] -> [B, Nt]. For S joint
        samples of one dataset pass its context S times: it is computed and stored once.
        RNG: one uniform and one normal draw per (row, target), both drawn up front from
        `generator` (fp32, fp64 for a float64 model); y_t takes the mixture component by
        inverse CDF and the normal draw (`gmm_sample_from_noise`), so the same seed gives the
        same samples with or without CUDA graphs. (The peer draws a multinomial and a normal
        at each step instead: the same distribution, another stream.)
        """
        data = self._arrange(x_context, y_context, x_target)
        g, s, nt, _ = data.x_target.shape
        noise_dtype = torch.float64 if data.x_target.dtype == torch.float64 else torch.float32
        noise = torch.empty((2, g, s, nt), device=data.x_target.device, dtype=noise_dtype)
        noise[0].uniform_(generator=generator)
        noise[1].normal_(generator=generator)
        stages = functools.partial(self._decode_stages, sampling=True)
        return self._run("sample_sequence", data, noise, stages)

    @torch.no_grad()
    @_in_precision_scope
    def stepwise_log_density(
        self,
        x_context: torch.Tensor,
        y_context: torch.Tensor,
        x_target: torch.Tensor,
        y_target: torch.Tensor,
    ) -> torch.Tensor:
        """The sampling path with y fixed to y_target: per-step log p(y_t | ...) [B, Nt].
        Equal to `evaluate_joint_density` (the chain rule), computed step by step."""
        data = self._arrange(x_context, y_context, x_target, y_target)
        stages = functools.partial(self._decode_stages, sampling=False)
        return self._run("stepwise_log_density", data, data.y_target, stages)

    @torch.no_grad()
    @_in_precision_scope
    def marginal_mixture(
        self, x_context: torch.Tensor, y_context: torch.Tensor, x_target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each target's predictive mixture given the context alone, p(y_t | context):
        x_context [B, Nc, C], y_context [B, Nc], x_target [B, Nt, C] -> (log weights, means,
        stds), each [B, Nt, K]. One pass: the targets attend to the context, not to each
        other (a decode step with no buffer)."""
        data = self._arrange(x_context, y_context, x_target)
        model = self.model
        weights = _inference_weights(model)
        ctx_kv = self.prefill_context(data.x_context, data.y_context, weights)
        decode = self._op("shared_context_attention", data.x_target.device)
        targets = model.embedder.target(data.x_target)  # [G, S, Nt, D]
        x = _through_layers(
            model,
            targets,
            lambda i, q, k, v: decode(q, *ctx_kv[i])[0],
            weights,
            self._linear(targets.device),
        )
        nt = data.x_target.shape[2]
        mixture = model.head.mixture(model.backbone.norm(x))
        data.check_finite()
        return tuple(t.reshape(data.batch, nt, -1) for t in mixture)

    def _decode_stages(self, inputs: dict[str, torch.Tensor], *, sampling: bool) -> _Stages:
        """Decoding the targets of `inputs` in order, as two stages: the context prefill and
        step 0 (the target row alone), then step t >= 1, run Nt - 1 times: [buffer row t-1
        (its x and its sampled or fixed y), target row t]; the buffer row sees the context
        and buffer rows 0..t-1, the target the same; nobody sees a target. The step index
        lives in a device tensor, so one captured graph replays every step >= 1.

        inputs["y"]: the noise [2, G, S, Nt] (uniform, normal) when `sampling`, else the
        fixed y [G, S, Nt]. Result [G, S, Nt]: the samples, or the fixed y's log densities.
        """
        model = self.model
        x_target, y = inputs["x_target"], inputs["y"]
        g, s, nt, _ = x_target.shape
        dev, dtype = x_target.device, x_target.dtype
        first = model.backbone.layers[0].attn_rows
        # The prefilled context K/V are read in place (never copied); the cache holds the
        # per-path buffers only.
        cache = SharedContextKVCache.allocate(
            num_layers=len(model.backbone.layers),
            num_datasets=g,
            num_samples=s,
            kv_heads=first.n_heads,
            head_dim=model.d_model // first.n_heads,
            context_capacity=0,
            buffer_capacity=max(nt, 1),
            dtype=dtype,
            device=dev,
        )
        decode = self._op("shared_context_attention", dev)
        linear = self._linear(dev)
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

            x = _through_layers(model, x, attend, state["weights"], linear)
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
            state["weights"] = weights = _inference_weights(model)
            state["ctx_kv"] = self.prefill_context(
                inputs["x_context"], inputs["y_context"], weights
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

    # ---- running the stages: eagerly, or from CUDA graphs --------------------------------

    def _run(
        self,
        method: str,
        data: _Batch,
        y: torch.Tensor,
        stages: Callable[[dict[str, torch.Tensor]], _Stages],
    ) -> torch.Tensor:
        """`stages(data.inputs(y))` run eagerly, or, where `_graphs_apply`, from the graphs
        captured for `method` at the first call with these input shapes; then the inputs'
        finiteness is confirmed (the call's only host sync). Returns the result as [B, Nt].
        A capture that CUDA refuses is reported once (a warning naming the error) and the
        call, and later calls with these shapes, run eagerly."""
        inputs = data.inputs(y)
        if self._graphs_apply(inputs["x_target"].device):
            result = self._replay(method, inputs, stages)
        else:
            result = _run_eagerly(inputs, stages)
        data.check_finite()
        return result.reshape(data.batch, -1)

    def _replay(
        self,
        method: str,
        inputs: dict[str, torch.Tensor],
        stages: Callable[[dict[str, torch.Tensor]], _Stages],
    ) -> torch.Tensor:
        """`_run` with CUDA graphs: capture at the first call with these shapes, replay."""
        # The graphs read the weights at their addresses: a model whose parameters were
        # reallocated (`.to()`, `load_state_dict(assign=True)`) is captured anew; so is a call
        # after allow_tf32 or fp32_precision changed (dot precisions are fixed at capture).
        key = (
            tuple((name, t.shape, t.dtype, t.device) for name, t in inputs.items()),
            self._weight_addresses(),
            torch.backends.cuda.matmul.allow_tf32,
            self.fp32_precision,
        )
        if (method, key) not in self._eager:
            with self._lock:
                captured = self._graphs.get(method)
                if captured is None or captured.key != key:
                    self._graphs.pop(method, None)  # free the old graphs before capturing
                    try:
                        captured = self._graphs[method] = _Captured(key, inputs, stages)
                    except RuntimeError as exc:
                        self._eager.add((method, key))
                        warnings.warn(
                            f"ARTabPFNPredictor.{method}: CUDA-graph capture failed ({exc}); "
                            "calls with these input shapes run eagerly",
                            RuntimeWarning,
                            stacklevel=4,
                        )
                if (method, key) not in self._eager:
                    return captured.replay(inputs)
        return _run_eagerly(inputs, stages)

    def _graphs_apply(self, device: torch.device) -> bool:
        """CUDA graphs are used with `cuda_graph`, on CUDA, with a kernel backend and without
        `context_top_k` (its block selection syncs with the host)."""
        if not (self.cuda_graph and device.type == "cuda" and self.context_top_k is None):
            return False
        if device not in self._graph_devices:  # the registry's choice, resolved once
            backend = get_backend(self.backend, device=device, op="shared_context_attention")
            self._graph_devices[device] = backend.name != "torch"
        return self._graph_devices[device]

    @property
    def captured_methods(self) -> tuple[str, ...]:
        """The methods whose CUDA graphs are held now (for the latest shapes of each)."""
        return tuple(self._graphs)

    def release_graphs(self) -> None:
        """Free the captured CUDA graphs and their static buffers (KV cache included)."""
        with self._lock:
            self._graphs.clear()
            self._eager.clear()


# Stages of a predictor call: [(run, repeats)] in order, and the tensor holding the result.
_Stages = tuple[list[tuple[Callable[[], None], int]], torch.Tensor]


def _run_eagerly(
    inputs: dict[str, torch.Tensor], stages: Callable[[dict[str, torch.Tensor]], _Stages]
) -> torch.Tensor:
    steps, result = stages(inputs)
    for run, repeats in steps:
        for _ in range(repeats):
            run()
    return result


class _Captured:
    """A predictor call's stages captured as CUDA graphs, one per stage, with static copies
    of its inputs: `replay(inputs)` copies new inputs of the same shapes in, replays each
    stage's graph its number of times and returns a copy of the result."""

    def __init__(
        self,
        key: tuple,
        inputs: dict[str, torch.Tensor],
        stages: Callable[[dict[str, torch.Tensor]], _Stages],
    ):
        self.key = key
        self.inputs = {name: t.clone() for name, t in inputs.items()}
        # The stage closures hold what the graphs read and write between stages (the
        # prefilled context K/V): kept alive with the graphs.
        self.steps, self.result = stages(self.inputs)
        dev = self.result.device
        side = torch.cuda.Stream(dev)
        self.graphs = []
        for run, repeats in self.steps:
            if repeats == 0:
                continue
            # Warm-up outside the capture (autotuning, compilation), on a side stream.
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                run()
            torch.cuda.current_stream(dev).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                run()
            self.graphs.append((graph, repeats))

    def replay(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        torch._foreach_copy_(list(self.inputs.values()), [inputs[name] for name in self.inputs])
        for graph, repeats in self.graphs:
            for _ in range(repeats):
                graph.replay()
        return self.result.clone()
