"""Study: the predictor's top-k context (`ARTabPFNPredictor(context_top_k=k)`) against
dense attention.

`python -m bench.studies.selection_predictor_accuracy [--out DIR] [--smoke]` (CPU by
default: float64, torch backend; triton backend in float32 on CUDA) writes
selection_predictor_accuracy.json: per-target log densities of `evaluate_joint_density`
with every buffer and target row reading only its top-k context blocks (the selection
forced: the predictor's dense fallback off), against the dense result. Golden: the peer's
model on its golden inputs (4 datasets, Nc=128, Nt=16, blocks of 16). Synthetic: the
shipped demo checkpoint on 4 prior tasks (Nc=8192, Nt=32, blocks of 64).

Conclusion (CPU, float64, `bench/results/selection_predictor_accuracy.json`): with every
block chosen the densities equal the dense ones (4e-14 nats at most); with fewer, the mean
error per target falls as the share of the context read grows: golden 0.32 / 2.65 nats (mean /
max) at k=1 of 8 blocks, 0.18 / 1.16 at 4; synthetic 0.22 / 0.79 at k=1 of 128, 0.079 /
0.41 at 16, 0.032 / 0.19 at 64 (dense joint densities: -51.5 and -22.8 nats per dataset).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from bench.harness import RunConfig, study_header, write_json
from bench.studies import study_main
from bench.studies.selection_crossover import forced_selection

GOLDEN = Path("packages/tabpfn-infer/tests/data/peer_default.pt")
ACCURACY_TASKS = {  # name -> (tasks B, context rows Nc, targets Nt, block size, k values)
    "golden": (4, 128, 16, 16, (1, 2, 4, 8)),
    "synthetic": (4, 8192, 32, 64, (1, 4, 16, 64, 128)),
}
SMOKE_TASKS = {"golden": (2, 128, 4, 16, (1, 8)), "synthetic": (2, 96, 4, 16, (1, 6))}


def _accuracy_models() -> dict[str, Any]:
    """name -> (model, inputs): the peer's golden model on its golden inputs (the per-row
    contexts), and the shipped demo checkpoint (trained on the synthetic prior)."""
    from tabpfn_infer.demo import CHECKPOINT
    from tabpfn_infer.model import ARTabPFN, load_peer_state_dict
    from tabpfn_infer.training.train import load_checkpoint

    golden = torch.load(GOLDEN, weights_only=True)
    peer = load_peer_state_dict(ARTabPFN(**golden["config"]), golden["state_dict"]).eval()
    return {
        "golden": (peer, golden["inputs_distinct"]),
        "synthetic": (load_checkpoint(CHECKPOINT), None),
    }


def predictor_accuracy(cfg: RunConfig, *, out: Path) -> dict[str, Any]:
    """Per-target log densities (`evaluate_joint_density`, one dataset per row) with the
    context read through the top-k blocks of each row against the dense result, float64:
    the golden peer model on its inputs (Nc = 128, blocks of 16) and the demo checkpoint on
    synthetic prior tasks (Nc = 8192, blocks of 64; smoke: small). Writes
    selection_predictor_accuracy.json under `out`."""
    from tabpfn_infer.predictor import ARTabPFNPredictor
    from tabpfn_infer.training.prior import sample_tasks

    cpu = cfg.device.type == "cpu"
    backend, dtype = ("torch", torch.float64) if cpu else ("triton", torch.float32)
    models = _accuracy_models()
    rows = []
    for name, (b, nc, nt, block, ks) in (SMOKE_TASKS if cfg.smoke else ACCURACY_TASKS).items():
        model, data = models[name]
        model = model.to(cfg.device, dtype)
        if data is None or cfg.smoke:
            gen = torch.Generator().manual_seed(cfg.seed)
            task = sample_tasks(b, num_context=nc, num_buffer=0, num_target=nt,
                                num_features=2, generator=gen, dtype=dtype)  # fmt: skip
            data = {"x_context": task.x_context, "y_context": task.y_context,
                    "x_target": task.x_target, "y_target": task.y_target}  # fmt: skip
        args = [data[k][:b].to(cfg.device, dtype)
                for k in ("x_context", "y_context", "x_target", "y_target")]  # fmt: skip
        args[2], args[3] = args[2][:, :nt], args[3][:, :nt]
        dense = ARTabPFNPredictor(model, backend=backend).evaluate_joint_density(*args)
        for k in ks:
            start = time.perf_counter()
            with forced_selection():  # the selection's accuracy, not the dense fallback's
                top = ARTabPFNPredictor(
                    model, backend=backend, context_top_k=k, context_block_size=block
                ).evaluate_joint_density(*args)
            diff = (top - dense).abs()
            rows.append({
                "task": name, "B": b, "Nc": args[0].shape[1], "Nt": nt, "block": block, "k": k,
                "context_fraction": min(1.0, k * block / args[0].shape[1]),
                "max_abs_target_nats": diff.max().item(),
                "mean_abs_target_nats": diff.mean().item(),
                "mean_abs_joint_nats": (top.sum(1) - dense.sum(1)).abs().mean().item(),
                "dense_mean_joint_nats": dense.sum(1).mean().item(),
                "seconds": time.perf_counter() - start,
            })  # fmt: skip
    header = study_header(
        "selection_predictor_accuracy",
        cfg,
        backend=backend,
        dtype=str(dtype).removeprefix("torch."),
    )
    result = {"header": header, "rows": rows}
    write_json(out / "selection_predictor_accuracy.json", result)
    return result


def _measure(args, cfg: RunConfig) -> list[Path]:
    result = predictor_accuracy(cfg, out=args.out)
    for r in result["rows"]:
        print(f"{r['task']:9s} Nc {r['Nc']:5d} block {r['block']:3d} k {r['k']:4d} "
              f"({100 * r['context_fraction']:5.1f}% of the context): target |d| max "
              f"{r['max_abs_target_nats']:.3g} mean {r['mean_abs_target_nats']:.3g} nats, joint "
              f"|d| {r['mean_abs_joint_nats']:.3g} (dense joint {r['dense_mean_joint_nats']:.4g})")  # fmt: skip
    return [args.out / "selection_predictor_accuracy.json"]


def main(argv: list[str] | None = None) -> int:
    return study_main(
        "bench.studies.selection_predictor_accuracy", argv, _measure, doc=__doc__, device="cpu"
    )


if __name__ == "__main__":
    raise SystemExit(main())
