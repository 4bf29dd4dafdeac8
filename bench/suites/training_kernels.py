"""Suite `training_kernels`: the non-attention kernels of a TNP training step, bf16.

Three ops (case key `op`, one plot panel each), forward and forward+backward:

- `gmm`: the mixture loss `gmm_nll(y, logits, loc, log_sigma, scale_param="log_std")` over
  R = B*N target rows, K = 10 components: R = 16*500, 1000, 5000 and 65536. Leaves logits,
  loc, log_sigma [R, K] (y is data). Providers: tabattn (fused kernel), torch (the core
  reference, eager), torch-compile (torch.compile of the core reference, CUDA only).
  Rows carry `gbps`: the bytes the op must move at least (inputs read, plus gradients
  written with the backward) per second.
- `head`: the K = 10 component MLPs of the mixture head, x [N, 512] -> 1365 -> 3 each
  (gelu), N in {8192, 65536}. Providers: tabattn (grouped kernels, one launch per GEMM),
  torch (K separate matmul pairs), torch-bmm (one bmm pair on stacked weights).
- `ffn`: the transformer feed-forward block 512 -> 1365 -> 512 (gelu), N in {8192, 65536}.
  Providers: tabattn (`fused_mlp.mlp`), torch (two matmuls on cuBLAS and the torch
  activation).

Correctness: every provider against an fp64 run of the core reference on the same input
values (for the MLPs in row chunks, weight gradients accumulated): the output and every
leaf's gradient, bound REL_TOL[dtype]. The plot shows time per call (log scale).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from bench import harness
from bench.harness import Check, Inputs, Provider, RunConfig, Suite, Unavailable, by_name

GMM, HEAD, FFN = "gmm", "head", "ffn"
K = 10
GMM_ROWS = (16 * 500, 1000, 5000, 65536)
MLP_ROWS = (8192, 65536)
HEAD_DIMS = (512, 1365, 3)
FFN_DIMS = (512, 1365, 512)
ACTIVATION = "gelu"

SMOKE_K = 3
SMOKE_GMM_ROWS = (37, 300)
SMOKE_MLP_ROWS = (29,)
SMOKE_HEAD_DIMS = (16, 24, 3)
SMOKE_FFN_DIMS = (16, 40, 16)

CHECK_CHUNK_ELEMENTS = 2**27  # fp64 hidden activations per row chunk of the MLP check


def cases(cfg: RunConfig) -> list[dict[str, Any]]:
    k, gmm_rows, mlp_rows, head, ffn = (
        (SMOKE_K, SMOKE_GMM_ROWS, SMOKE_MLP_ROWS, SMOKE_HEAD_DIMS, SMOKE_FFN_DIMS)
        if cfg.smoke
        else (K, GMM_ROWS, MLP_ROWS, HEAD_DIMS, FFN_DIMS)
    )
    out: list[dict[str, Any]] = [{"op": GMM, "R": r, "K": k} for r in gmm_rows]
    for op, groups, dims in ((HEAD, k, head), (FFN, 1, ffn)):
        d_in, d_hidden, d_out = dims
        out += [
            {"op": op, "N": n, "K": groups, "d_in": d_in, "d_hidden": d_hidden, "d_out": d_out}
            for n in mlp_rows
        ]
    return out


def make_inputs(case: dict[str, Any], cfg: RunConfig, seed: int) -> Inputs:
    randn = harness.normal(cfg, seed, harness.smoke_dtype(cfg))
    if case["op"] == GMM:
        r, k = case["R"], case["K"]
        leaves = {"logits": randn(r, k), "loc": randn(r, k), "log_sigma": randn(r, k, scale=0.5)}
        grad_out = torch.ones((), device=cfg.device)
        extra = {"y": randn(r, scale=2.0)}
    else:
        n, k, d_in, d_hidden, d_out = (case[key] for key in ("N", "K", "d_in", "d_hidden", "d_out"))
        lead = (k,) if case["op"] == HEAD else ()
        leaves = {
            "x": randn(n, d_in),
            "w1": randn(*lead, d_in, d_hidden, scale=d_in**-0.5),
            "w2": randn(*lead, d_hidden, d_out, scale=d_hidden**-0.5),
        }
        grad_out = randn(*lead, n, d_out)
        extra = {}
    for t in leaves.values():
        t.requires_grad_(True)
    return Inputs(leaves=leaves, grad_out=grad_out, extra=extra)


def forward_flops(case: dict[str, Any]) -> float:
    if case["op"] == GMM:
        return 0.0  # memory-bound: see the gbps column
    return 2.0 * case["N"] * case["K"] * case["d_hidden"] * (case["d_in"] + case["d_out"])


def shape_label(case: dict[str, Any]) -> str:
    if case["op"] == GMM:
        return f"gmm R{case['R']} K{case['K']}"
    dims = f"{case['d_in']}-{case['d_hidden']}-{case['d_out']}"
    groups = f" K{case['K']}" if case["op"] == HEAD else ""
    return f"{case['op']} N{case['N']}{groups} {dims}"


def x_label(case: dict[str, Any]) -> str:
    return f"R{case['R']}" if case["op"] == GMM else f"N{case['N']}"


# ---------------------------------------------------------------------------------------
# correctness reference: fp64


def _gmm_reference(inputs: Inputs, mode: str) -> dict[str, torch.Tensor]:
    from tabattn_core.gmm import gmm_nll

    leaves = {n: t.detach().double().requires_grad_() for n, t in inputs.leaves.items()}
    loss = gmm_nll(inputs.extra["y"].double(), *leaves.values(), scale_param="log_std")
    out = {"out": loss.detach()}
    if mode == "fwd+bwd":
        grads = torch.autograd.grad(loss, list(leaves.values()), inputs.grad_out.double())
        out.update({"d" + n: g for n, g in zip(leaves, grads, strict=True)})
    return out


def _mlp_reference(case: dict[str, Any], inputs: Inputs, mode: str) -> dict[str, torch.Tensor]:
    """Row chunks of the core reference in fp64; weight gradients summed over chunks."""
    from tabattn_core import mlp

    fn = mlp.grouped_mlp if case["op"] == HEAD else mlp.mlp
    x = inputs.leaves["x"].detach().double()
    w1, w2 = (inputs.leaves[n].detach().double().requires_grad_() for n in ("w1", "w2"))
    chunk = max(1, CHECK_CHUNK_ELEMENTS // (case["K"] * case["d_hidden"]))
    outs, dxs = [], []
    for start in range(0, x.shape[0], chunk):
        xc = x[start : start + chunk].requires_grad_()
        y = fn(xc, w1, w2, activation=ACTIVATION)
        if mode == "fwd+bwd":
            y.backward(inputs.grad_out[..., start : start + chunk, :].double())
            dxs.append(xc.grad)
        outs.append(y.detach())
    out = {"out": torch.cat(outs, dim=-2)}
    if mode == "fwd+bwd":
        out.update(dx=torch.cat(dxs), dw1=w1.grad, dw2=w2.grad)
    return out


def reference(case: dict[str, Any], inputs: Inputs, mode: str, cfg: RunConfig) -> dict[str, Check]:
    expected = (
        _gmm_reference(inputs, mode) if case["op"] == GMM else _mlp_reference(case, inputs, mode)
    )
    return {name: Check(t, lambda got: got) for name, t in expected.items()}


# ---------------------------------------------------------------------------------------
# providers


def _gmm_args(inputs: Inputs) -> tuple[torch.Tensor, ...]:
    leaves = inputs.leaves
    return inputs.extra["y"], leaves["logits"], leaves["loc"], leaves["log_sigma"]


def _mlp_args(inputs: Inputs) -> tuple[torch.Tensor, ...]:
    return inputs.leaves["x"], inputs.leaves["w1"], inputs.leaves["w2"]


def _by_op(**makers: Callable[[dict[str, Any], Inputs], Callable[[], torch.Tensor]]):
    """A provider's `make`: the maker of the case's op, Unavailable for the other ops; the
    callable returns (out, None) as the harness expects."""

    def make(case: dict[str, Any], inputs: Inputs):
        maker = makers.get(case["op"])
        if maker is None:
            raise Unavailable(f"no {case['op']} variant (runs on {', '.join(makers)})")
        fn = maker(case, inputs)
        return lambda: (fn(), None)

    return make


def _need_triton(inputs: Inputs) -> None:
    harness.need_gpu_or_interpreter(inputs.grad_out, "tabattn (Triton)")


def _tabattn_gmm(case, inputs):
    from tabattn_triton.ops.gmm import gmm_nll

    _need_triton(inputs)
    args = _gmm_args(inputs)
    return lambda: gmm_nll(*args, scale_param="log_std")


def _tabattn_head(case, inputs):
    from tabattn_triton.ops.grouped_mlp import grouped_mlp

    _need_triton(inputs)
    args = _mlp_args(inputs)
    return lambda: grouped_mlp(*args, activation=ACTIVATION)


def _tabattn_ffn(case, inputs):
    from tabattn_triton.ops.fused_mlp import mlp

    _need_triton(inputs)
    args = _mlp_args(inputs)
    return lambda: mlp(*args, activation=ACTIVATION)


def _torch_gmm(case, inputs):
    from tabattn_core.gmm import gmm_nll

    args = _gmm_args(inputs)
    return lambda: gmm_nll(*args, scale_param="log_std")


def _gelu(t: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(t, approximate="none")


def _torch_head(case, inputs):
    x, w1, w2 = _mlp_args(inputs)
    return lambda: torch.stack([_gelu(x @ w1[k]) @ w2[k] for k in range(w1.shape[0])])


def _torch_bmm_head(case, inputs):
    x, w1, w2 = _mlp_args(inputs)
    return lambda: torch.bmm(_gelu(torch.bmm(x.expand(w1.shape[0], *x.shape), w1)), w2)


def _torch_ffn(case, inputs):
    x, w1, w2 = _mlp_args(inputs)
    return lambda: _gelu(x @ w1) @ w2


@functools.cache
def _compiled_gmm():
    from tabattn_core.gmm import gmm_nll

    return harness.compile_static(functools.partial(gmm_nll, scale_param="log_std"))


def _compile_gmm(case, inputs):
    if not inputs.grad_out.is_cuda:
        raise Unavailable(
            "torch-compile: measured on CUDA only (CPU compile is slow, not a target)"
        )
    compiled, args = _compiled_gmm(), _gmm_args(inputs)
    return lambda: compiled(*args)


# ---------------------------------------------------------------------------------------
# bandwidth of the memory-bound loss


def annotate(case, mode, rows, calibration, cfg) -> None:
    """gmm rows: `gbps` = minimal bytes / time (inputs read once per pass; the backward
    reads them again and writes the three [R, K] gradients)."""
    if case["op"] != GMM:
        return
    size = harness.smoke_dtype(cfg).itemsize
    params = case["R"] * case["K"] * 3 * size
    read = params + case["R"] * size
    total = read if mode == "fwd" else 2 * read + params
    for row in rows:
        if row["ms"]:
            row["gbps"] = total / (row["ms"] * 1e-3) / 1e9


SUITE = harness.register_suite(
    Suite.from_module(
        __name__,
        name="training_kernels",
        description=(
            "TNP training kernels, bf16: mixture loss (K=10, R rows), grouped head MLP "
            "(K=10, 512->1365->3) and FFN (512->1365->512), fwd and fwd+bwd"
        ),
        providers=by_name(
            Provider(
                "tabattn",
                _by_op(gmm=_tabattn_gmm, head=_tabattn_head, ffn=_tabattn_ffn),
                "tabattn_triton.ops: gmm.gmm_nll, grouped_mlp.grouped_mlp, fused_mlp.mlp",
            ),
            Provider(
                "torch",
                _by_op(gmm=_torch_gmm, head=_torch_head, ffn=_torch_ffn),
                "gmm: tabattn_core.gmm.gmm_nll (eager); head: K separate matmul pairs; "
                "ffn: two matmuls (cuBLAS) + torch gelu",
            ),
            Provider(
                "torch-compile",
                _by_op(gmm=_compile_gmm),
                "torch.compile(tabattn_core.gmm.gmm_nll), dynamic=False",
            ),
            Provider(
                "torch-bmm",
                _by_op(head=_torch_bmm_head),
                "head: torch.bmm on the stacked [K, ...] weights (x expanded, no copy)",
            ),
        ),
        baseline="torch",
        panel_keys=("op",),
        reference_method=(
            "fp64 run of the core reference (tabattn_core.gmm.gmm_nll, tabattn_core.mlp) on "
            "the same input values and upstream gradient: the output and the gradient of "
            "every leaf (MLPs in row chunks, weight gradients accumulated). Error = "
            "||x - ref|| / ||ref|| (tabattn_core.testing.rel_error), bound REL_TOL[dtype]."
        ),
        header_extra={
            "plot": {"metric": "us", "yscale": "log"},
            "table_columns": [{"title": "GB/s", "key": "gbps", "format": ".0f"}],
        },
    )
)
