"""The measured rules of flash attention's "auto" kernel (tabattn_triton's dispatch.py)
agree with the committed context-target benchmark they cite: at every shape and mode the
kernel "auto" takes is within 5% of the fastest of the sm90, portable and cuDNN kernels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tabattn_triton.ops.attention import dispatch
from tabattn_triton.ops.attention.interface import PrefixMask
from tabattn_triton.ops.common import MASK_CONTEXT

RESULTS = Path(__file__).parents[1] / "bench" / "results" / "context_target.json"
PROVIDERS = {"sm90": "tabattn-sm90", "portable": "tabattn-plain", "cudnn": "sdpa-cudnn"}
MARGIN = 1.05


def _measured() -> dict[tuple[str, str], dict]:
    rows: dict[tuple[str, str], dict] = {}
    for row in json.loads(RESULTS.read_text())["rows"]:
        if row["status"] == "ok" and row["provider"] in PROVIDERS.values():
            rows.setdefault((row["shape"], row["mode"]), {"case": row["case"]})[row["provider"]] = (
                row["ms"]
            )
    return rows


def test_the_benchmark_measured_every_kernel_at_every_shape():
    rows = _measured()
    assert len(rows) == 20, sorted(rows)
    assert all(set(PROVIDERS.values()) <= set(r) for r in rows.values())


@pytest.mark.parametrize("key", sorted(_measured()), ids=" ".join)
def test_auto_takes_a_kernel_within_5_percent_of_the_fastest(key, monkeypatch):
    monkeypatch.setattr(dispatch, "_hopper", lambda q: True)
    monkeypatch.setattr(dispatch, "sm90_unsupported", lambda q, k, v: None)
    monkeypatch.setattr(dispatch, "cudnn_unsupported", lambda *args: None)
    row = _measured()[key]
    c = row["case"]
    q = torch.empty(c["B"], c["H"], c["M"] + c["N"], c["D"], device="meta")
    k = torch.empty(c["B"], c["H"], c["M"], c["D"], device="meta")
    pm = PrefixMask(MASK_CONTEXT, ctx_len=c["M"])  # every key visible
    name, why = dispatch._auto(q, k, k, pm, False, False, backward=key[1] == "fwd+bwd")
    best = min(row[p] for p in PROVIDERS.values())
    assert row[PROVIDERS[name]] <= MARGIN * best, (name, why, row)
