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

Parts, by concern: `inputs` (checking and arranging a call's inputs), `routing` (the
registry's ops as the predictor calls them, and what a backend can do), `layers` (the
backbone as a call runs it), `passes` (prefill, density, decoding, marginals), `graphs`
(stages run eagerly or from CUDA graphs), `precision` (the scoped float32 dot precision).
The top-k crossover rule (`DENSE_CONTEXT_BELOW`, `DENSE_CONTEXT_FRACTION`) lives here.
"""

from __future__ import annotations

import functools
import logging

import torch

from tabattn_core.checks import check_positive_int
from tabattn_core.logs import LogOnce
from tabattn_core.precision import check_fp32_dot_precision
from tabattn_core.registry import get_backend
from tabpfn_infer.model import ARTabPFN
from tabpfn_infer.predictor import passes
from tabpfn_infer.predictor.graphs import CapturedCalls, StagesOf, run_eagerly
from tabpfn_infer.predictor.inputs import Batch, arrange, check_finite
from tabpfn_infer.predictor.layers import InferenceBackbone, LinearOp, modules_linear
from tabpfn_infer.predictor.precision import in_precision_scope
from tabpfn_infer.predictor.routing import SCORE_BUDGET as SCORE_BUDGET  # bench/ reads it here
from tabpfn_infer.predictor.routing import routed_op

__all__ = ["ARTabPFNPredictor", "check_finite"]

_said = LogOnce()

# With `context_top_k`, the context is read by exact dense attention (the op the predictor
# runs without top-k) where that was measured faster than the selection: contexts of fewer
# than DENSE_CONTEXT_BELOW rows, or top_k * block_size covering at least
# DENSE_CONTEXT_FRACTION of the context. One rule for decoding and teacher forcing (both
# then read the same keys: the chain rule holds). Measured by `python -m
# bench.studies.selection_crossover` (default ARTabPFN, float32, triton backend, eager, one
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
    _said(
        (name, dense),
        logging.INFO,
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
    (`bench.studies.selection_crossover`), it is used instead, and the results are those of
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
        self._graph_devices: dict[torch.device, bool] = {}  # `_graphs_apply` per device
        self._captured = CapturedCalls()

    @classmethod
    def from_trained_model(cls, model: ARTabPFN, backend: str = "auto") -> ARTabPFNPredictor:
        return cls(model, backend=backend)

    # ---- inputs, ops -------------------------------------------------------------------

    def _weight_addresses(self) -> tuple[int, ...]:
        """The address of every parameter, read from the model at each call (what the
        graphs read): assigned or replaced parameters and layers, `p.data = ...` and `.to()`
        all change it."""
        return tuple(p.data_ptr() for p in self.model.parameters())

    def _arrange(self, x_context, y_context, x_target, y_target=None) -> Batch:
        param = next(self.model.parameters())
        return arrange(
            x_context, y_context, x_target, y_target, device=param.device, dtype=param.dtype
        )

    def _op(self, name: str, device: torch.device):
        """The registry's implementation of `name` as this predictor calls it
        (`routing.routed_op`): with `context_top_k`, dense where `_dense_context` says."""
        dense = functools.partial(
            _dense_context, name, top_k=self.context_top_k, block_size=self.context_block_size
        )
        return routed_op(
            self.backend,
            name,
            device,
            top_k=self.context_top_k,
            block_size=self.context_block_size,
            dense=dense,
        )

    def _linear(self, device: torch.device) -> LinearOp:
        """The fused linear op (GEMM + bias/activation/residual/norm in one launch) of the
        backend running the decode op, or the modules' arithmetic (`modules_linear`) where it
        has none (`Backend.fused_dense`: the references' is fp32 and no faster)."""
        backend = get_backend(self.backend, device=device, op="shared_context_attention")
        fused = backend.fused_dense and "linear" in backend.ops
        return backend.ops["linear"] if fused else modules_linear

    def _ops(self, device: torch.device):
        """(op(name) on `device`, the linear op) for the passes."""
        return functools.partial(self._op, device=device), self._linear(device)

    # ---- the passes -------------------------------------------------------------------

    @torch.no_grad()
    @in_precision_scope
    def prefill_context(
        self, x_context: torch.Tensor, y_context: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Row-attention K/V of the context rows, per layer: x_context [G, Nc, C], y_context
        [G, Nc] -> [(k, v)] with k, v [G, H, Nc, Dh] (strided views). Context rows attend to
        each other."""
        dev = x_context.device
        backbone = InferenceBackbone(self.model, self._linear(dev))
        return passes.prefill(
            self.model, backbone, self._op("attention", dev), x_context, y_context
        )

    @torch.no_grad()
    @in_precision_scope
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
        ops = self._ops(data.x_target.device)
        stages = functools.partial(passes.density_stages, self.model, *ops)
        return self._run("evaluate_joint_density", data, data.y_target, stages)

    @torch.no_grad()
    @in_precision_scope
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
        ops = self._ops(data.x_target.device)
        stages = functools.partial(passes.decode_stages, self.model, *ops, sampling=True)
        return self._run("sample_sequence", data, noise, stages)

    @torch.no_grad()
    @in_precision_scope
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
        ops = self._ops(data.x_target.device)
        stages = functools.partial(passes.decode_stages, self.model, *ops, sampling=False)
        return self._run("stepwise_log_density", data, data.y_target, stages)

    @torch.no_grad()
    @in_precision_scope
    def marginal_mixture(
        self, x_context: torch.Tensor, y_context: torch.Tensor, x_target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each target's predictive mixture given the context alone, p(y_t | context):
        x_context [B, Nc, C], y_context [B, Nc], x_target [B, Nt, C] -> (log weights, means,
        stds), each [B, Nt, K]. One pass: the targets attend to the context, not to each
        other (a decode step with no buffer). No target rows (Nt = 0) give empty [B, 0, K]
        mixtures, as the other methods give [B, 0] (the inputs are still checked)."""
        data = self._arrange(x_context, y_context, x_target)
        ops = self._ops(data.x_target.device)
        mixture = passes.marginal_mixture(
            self.model, *ops, data.x_context, data.y_context, data.x_target
        )
        data.check_finite()
        return tuple(t.reshape(data.batch, data.x_target.shape[2], t.shape[-1]) for t in mixture)

    # ---- running the stages: eagerly, or from CUDA graphs --------------------------------

    def _run(self, method: str, data: Batch, y: torch.Tensor, stages: StagesOf) -> torch.Tensor:
        """`stages(data.inputs(y))` run eagerly, or, where `_graphs_apply`, from the graphs
        captured for `method` at the first call with these input shapes; then the inputs'
        finiteness is confirmed (the call's only host sync). Returns the result as [B, Nt]."""
        inputs = data.inputs(y)
        if self._graphs_apply(inputs["x_target"].device):
            # The graphs read the weights at their addresses: a model whose parameters were
            # reallocated (`.to()`, `load_state_dict(assign=True)`) is captured anew; so is a
            # call after allow_tf32 or fp32_precision changed (dot precisions are fixed at
            # capture).
            key = (
                tuple((name, t.shape, t.dtype, t.device) for name, t in inputs.items()),
                self._weight_addresses(),
                torch.backends.cuda.matmul.allow_tf32,
                self.fp32_precision,
            )
            result = self._captured.run(method, key, inputs, stages)
        else:
            result = run_eagerly(inputs, stages)
        data.check_finite()
        return result.reshape(data.batch, -1)

    def _graphs_apply(self, device: torch.device) -> bool:
        """CUDA graphs are used with `cuda_graph`, on CUDA, with a backend that gains from
        them (`Backend.graph_safe`: the kernels) and without `context_top_k` (its block
        selection syncs with the host)."""
        if not (self.cuda_graph and device.type == "cuda" and self.context_top_k is None):
            return False
        if device not in self._graph_devices:  # the registry's choice, resolved once
            backend = get_backend(self.backend, device=device, op="shared_context_attention")
            self._graph_devices[device] = backend.graph_safe
        return self._graph_devices[device]

    @property
    def captured_methods(self) -> tuple[str, ...]:
        """The methods whose CUDA graphs are held now (for the latest shapes of each)."""
        return self._captured.methods

    def release_graphs(self) -> None:
        """Free the captured CUDA graphs and their static buffers (KV cache included)."""
        self._captured.clear()
