"""`tabattn` / `python -m tabattn_core`: which attention backend this machine gets and why,
and a check of every op of that backend on an embedded default problem (two datasets of
different context sizes, eight joint-sample paths each) against the fp64 reference."""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import time
from collections.abc import Callable

import torch

from tabattn_core import gmm, mlp, reference
from tabattn_core.registry import OPS, registry
from tabattn_core.testing import REL_TOL, rel_error

PACKAGES = ("tabattn-core", "tabattn-triton", "tabattn-fp8", "tabpfn-infer")


def default_problems(device: torch.device, dtype: torch.dtype) -> dict[str, tuple[tuple, dict]]:
    """Op name -> (args, kwargs) of the embedded default problem (seeded, non-trivial)."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    g, s, h, h_kv, d, nc, t, nt = 2, 8, 4, 2, 48, 37, 5, 6
    lens = torch.tensor([37, 20], device=device)
    q, k, v = randn(g, h, nc + nt, d), randn(g, h_kv, nc, d), randn(g, h_kv, nc, d)
    k_ctx, v_ctx = randn(g, h_kv, nc, d), randn(g, h_kv, nc, d)
    k_buf, v_buf = randn(g, s, h_kv, t + 3, d), randn(g, s, h_kv, t + 3, d)
    tq, tk, bs = 9, 40, 8
    sel = torch.randint(-1, 2, (tq, h_kv, 3), generator=gen).to(
        device
    )  # both sequences have >= 2 blocks
    k_logits = 5
    return {
        "attention": ((q, k, v), {}),
        "context_target_attention": ((q, k, v), {"context_lens": lens}),
        "shared_context_attention": (
            (randn(g, s, h, 2, d), k_ctx, v_ctx, k_buf, v_buf),
            {"buffer_len": t, "context_lens": lens, "row_rule": ("causal", "strict")},
        ),
        "teacher_forcing_attention": (
            (randn(g, s, h, 2 * nt, d), k_ctx, v_ctx, k_buf[:, :, :, :nt], v_buf[:, :, :, :nt]),
            {"context_lens": lens},
        ),
        "varlen_attention": (
            (randn(tq, h, d), randn(tk, h_kv, d), randn(tk, h_kv, d)),
            {
                "cu_seqlens_q": torch.tensor([0, 4, tq], device=device),
                "cu_seqlens_k": torch.tensor([0, 24, tk], device=device),
                "causal": True,
            },
        ),
        "selection_attention": (
            (randn(tq, h, d), randn(tk, h_kv, d), randn(tk, h_kv, d)),
            {
                "cu_seqlens_q": torch.tensor([0, 4, tq], device=device),
                "cu_seqlens_k": torch.tensor([0, 24, tk], device=device),
                "block_indices": sel,
                "block_size": bs,
                "causal": True,
            },
        ),
        "merge_states": (
            (randn(3, 7, d), randn(3, 7).float(), randn(3, 7, d), randn(3, 7).float()),
            {},
        ),
        "gmm_nll": (
            (randn(64), randn(64, k_logits), randn(64, k_logits), randn(64, k_logits).abs() + 0.1),
            {},
        ),
        "mlp": ((randn(2, 17, 24), randn(24, 40) * 0.2, randn(40, 24) * 0.2), {}),
        "grouped_mlp": ((randn(33, 24), randn(3, 24, 40) * 0.2, randn(3, 40, 3) * 0.2), {}),
        "linear": (
            (randn(2, 17, 24), randn(40, 24) * 0.2, randn(40)),
            {"residual": randn(2, 17, 40), "norm_weight": randn(40), "norm_bias": randn(40)},
        ),
    }


def _fp64(x: object) -> object:
    return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def _ground_truth(op: str) -> Callable:
    outside_reference = {
        "gmm_nll": gmm.gmm_nll,
        "mlp": mlp.mlp,
        "grouped_mlp": mlp.grouped_mlp,
        "linear": mlp.linear,
    }
    return outside_reference.get(op) or getattr(reference, op)


def check_ops(device: torch.device, backend: str, dtype: torch.dtype) -> bool:
    """Run every op on the default problem; print error vs fp64 and time. True if all pass."""
    ok = True
    print(f"\nops on {device} ({str(dtype).replace('torch.', '')}), backend={backend!r}:")
    print(f"  {'op':28s} {'backend':8s} {'rel. error':>11s} {'bound':>8s} {'ms':>8s}")
    for op, (args, kwargs) in default_problems(device, dtype).items():
        choice = registry.choose(backend, device=device, op=op)
        fn = choice.backend.ops[op]
        fn(*args, **kwargs)  # warm-up (compilation, autotuning)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        got = fn(*args, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - start) * 1e3
        want = _ground_truth(op)(*map(_fp64, args), **{k: _fp64(v) for k, v in kwargs.items()})
        got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
        err = max(rel_error(a, b) for a, b in zip(got, want, strict=True))
        bound = REL_TOL[dtype]
        status = "ok" if err <= bound else "FAIL"
        ok &= err <= bound
        print(f"  {op:28s} {choice.backend.name:8s} {err:11.2e} {bound:8.0e} {ms:8.3f}  {status}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tabattn", description=__doc__)
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)"
    )
    parser.add_argument("--backend", default="auto", help="auto or a backend name (default auto)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    if device.type == "cpu" and dtype != torch.float32:
        parser.error("--dtype: the CPU check runs in float32")

    print("packages:")
    for name in PACKAGES:
        try:
            print(f"  {name:16s} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            print(f"  {name:16s} (not installed)")
    print(f"  torch            {torch.__version__} (CUDA available: {torch.cuda.is_available()})")

    print(f"\nbackends (highest priority first), on {device}:")
    for b in registry.backends():
        avail, why = b.available(device)
        print(
            f"  {b.name:8s} priority {b.priority:3d}  {'available' if avail else 'unavailable'}: {why}"
        )
        print(f"           ops: {', '.join(sorted(b.ops)) or '(none yet)'}")
    for name, err in registry.load_errors.items():
        print(f"  {name}: failed to load: {err}")
    print(f"\nchoice: {registry.choose(args.backend, device=device).reason}")
    print(f"ops known to the registry: {len(OPS)}")

    ok = check_ops(device, args.backend, dtype)
    print("\nall ops match the fp64 reference" if ok else "\nSOME OPS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
