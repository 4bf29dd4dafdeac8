"""The registry's promise, checked over every backend installed here: each backend's op
takes exactly the signature of `tabattn_core.registry.OPS`, and the same bad input raises
the same `InputError` (same text) in every backend, before anything runs (the contracts of
`tabattn_core.contracts`, which every backend calls first)."""

from __future__ import annotations

import ast
import inspect

import pytest
import torch

from tabattn_core import masks
from tabattn_core.checks import InputError
from tabattn_core.registry import OPS, registry

BACKENDS = {b.name: b for b in registry.backends()}


def _parse(signature: str) -> list[tuple[str, bool, object]]:
    """OPS text "(a, b=None, *, c='x') -> out" as (name, keyword-only, default) triples."""
    params, keyword_only = [], False
    for part in signature.split(" -> ")[0].strip("()").split(", "):
        if part == "*":
            keyword_only = True
            continue
        name, _, default = part.partition("=")
        params.append((name, keyword_only, ast.literal_eval(default) if default else None))
    return params


def _params(fn) -> list[tuple[str, bool, object]]:
    return [
        (p.name, p.kind is p.KEYWORD_ONLY, None if p.default is p.empty else p.default)
        for p in inspect.signature(fn).parameters.values()
    ]


@pytest.mark.parametrize(
    "backend, op", [(b, op) for b, backend in BACKENDS.items() for op in backend.ops]
)
def test_registered_ops_take_the_registry_signature(backend, op):
    assert _params(BACKENDS[backend].ops[op]) == _parse(OPS[op])


def _qkv():
    return torch.randn(2, 4, 6, 32), torch.randn(2, 2, 5, 32), torch.randn(2, 2, 5, 32)


def _shared():
    """q [G=2, S=3, H=4, Lq=1, D=32], context [2, 2, 5, 32], buffers T_cap=3."""
    return (
        torch.randn(2, 3, 4, 1, 32),
        torch.randn(2, 2, 5, 32),
        torch.randn(2, 2, 5, 32),
        torch.randn(2, 3, 2, 3, 32),
        torch.randn(2, 3, 2, 3, 32),
    )


def _tf(rows=4):
    _, kc, vc, kb, vb = _shared()
    nt = rows // 2
    return torch.randn(2, 3, 4, rows, 32), kc, vc, kb[..., :nt, :], vb[..., :nt, :]


def _packed():
    q, k = torch.randn(4, 4, 16), torch.randn(9, 2, 16)
    kw = {
        "cu_seqlens_q": torch.tensor([0, 4]),
        "cu_seqlens_k": torch.tensor([0, 9]),
        "block_indices": torch.zeros(4, 2, 1, dtype=torch.int64),
        "block_size": 16,
    }
    return q, k, k.clone(), kw


def _varlen(**change):
    q, k, v, kw = _packed()
    kw = {n: kw[n] for n in ("cu_seqlens_q", "cu_seqlens_k")} | change
    return (q, k, v), kw


def _selection(**change):
    q, k, v, kw = _packed()
    return (q, k, v), kw | change


q, k, v = _qkv()
sq, kc, vc, kb, vb = _shared()
# (op, args, kwargs, the start of the expected message)
BAD_INPUTS = {
    "attention-q-3d": ("attention", (q[0], k, v), {}, "q: expected 4 dims"),
    "attention-k-dtype": ("attention", (q, k.half(), v), {}, "k: expected dtype"),
    "attention-v-shape": ("attention", (q, k, v[:, :, :3]), {}, "v: expected shape"),
    "attention-gqa": ("attention", (q[:, :3], k, v), {}, "k: expected a head count"),
    "attention-head-dim": ("attention", (q[..., :8], k[..., :8], v[..., :8]), {}, "q: expected head dim"),
    "attention-batch": ("attention", (q, k[:1], v[:1]), {}, "k: expected leading dims"),
    "attention-scale": ("attention", (q, k, v), {"scale": -1.0}, "scale:"),
    "attention-mask-size": ("attention", (q, k, v), {"mask": masks.CausalMask(3, 3)}, "mask: expected a spec"),
    "context-target-int": ("context_target_attention", (q, k, v), {"context_lens": 9}, "context_lens: expected an int"),
    "context-target-float": ("context_target_attention", (q, k, v), {"context_lens": 2.7}, "context_lens: expected an int in [0, 5], got 2.7"),
    "context-target-str": ("context_target_attention", (q, k, v), {"context_lens": "3"}, "context_lens: expected an int in [0, 5], got '3'"),
    "context-target-bool": ("context_target_attention", (q, k, v), {"context_lens": True}, "context_lens: expected an int in [0, 5], got True"),
    "context-target-tensor-float": ("context_target_attention", (q, k, v), {"context_lens": torch.tensor([1.0, 2.0])}, "context_lens: expected dtype int32 or int64"),
    "context-target-tensor": ("context_target_attention", (q, k, v), {"context_lens": torch.tensor([1, 9])}, "context_lens: expected values"),
    "context-target-count": ("context_target_attention", (q, k, v), {"context_lens": torch.tensor([1])}, "context_lens: expected shape"),
    "decode-q-4d": ("shared_context_attention", (sq[0], kc, vc), {}, "q: expected 5 dims"),
    "decode-k-ctx-batch": ("shared_context_attention", (sq, kc[:1], vc[:1]), {}, "k_ctx: expected shape"),
    "decode-v-ctx-shape": ("shared_context_attention", (sq, kc, vc[..., :16]), {}, "v_ctx: expected shape"),
    "decode-no-buffer": ("shared_context_attention", (sq, kc, vc), {"buffer_len": 2}, "k_buf: expected a tensor"),
    "decode-capacity": ("shared_context_attention", (sq, kc, vc, kb, vb), {"buffer_len": 4}, "k_buf: expected capacity T_cap >= buffer_len=4"),
    "decode-v-buf-shape": ("shared_context_attention", (sq, kc, vc, kb, vb[:, :1]), {}, "v_buf: expected shape"),
    "decode-buffer-len": ("shared_context_attention", (sq, kc, vc, kb, vb), {"buffer_len": -1}, "buffer_len: expected a non-negative int"),
    "decode-buffer-len-tensor": ("shared_context_attention", (sq, kc, vc, kb, vb), {"buffer_len": torch.tensor([2])}, "buffer_len: expected shape"),
    "decode-buffer-len-float": ("shared_context_attention", (sq, kc, vc, kb, vb), {"buffer_len": 2.0}, "buffer_len: expected a non-negative int, got 2.0"),
    "decode-buffer-len-bool": ("shared_context_attention", (sq, kc, vc, kb, vb), {"buffer_len": True}, "buffer_len: expected a non-negative int, got True"),
    "decode-buffer-len-tensor-negative": ("shared_context_attention", (sq, kc, vc, kb, vb), {"buffer_len": torch.tensor(-1)}, "buffer_len: expected a non-negative int, got -1"),
    "decode-buffer-len-tensor-float": ("shared_context_attention", (sq, kc, vc, kb, vb), {"buffer_len": torch.tensor(1.0)}, "buffer_len: expected dtype int32 or int64"),
    "decode-row-rule": ("shared_context_attention", (sq, kc, vc, kb, vb), {"buffer_len": 1, "row_rule": "up"}, "row_rule:"),
    "decode-row-rule-length": ("shared_context_attention", (sq, kc, vc), {"row_rule": ("causal", "strict")}, "row_rule:"),
    "decode-context-lens": ("shared_context_attention", (sq, kc, vc), {"context_lens": torch.tensor([9, 1])}, "context_lens: expected values"),
    "decode-context-len": ("shared_context_attention", (sq, kc, vc), {"context_lens": 6}, "context_lens: expected an int"),
    "decode-context-len-float": ("shared_context_attention", (sq, kc, vc), {"context_lens": 2.7}, "context_lens: expected an int in [0, 5], got 2.7"),
    "tf-context-len-bool": ("teacher_forcing_attention", _tf(), {"context_lens": True}, "context_lens: expected an int in [0, 5], got True"),
    "tf-odd-rows": ("teacher_forcing_attention", (sq, kc, vc, kb, vb), {}, "q: expected an even row count"),
    "tf-no-buffer": ("teacher_forcing_attention", (*_tf()[:3], None, None), {}, "k_buf, v_buf: expected tensors"),
    "tf-rows": ("teacher_forcing_attention", (_tf()[0], kc, vc, kb, vb), {}, "k_buf: expected Nt=2 rows"),
    "tf-capacity": ("teacher_forcing_attention", (_tf(8)[0], kc, vc, kb, vb), {}, "k_buf: expected capacity T_cap >= Nt=4"),
    "varlen-offsets": ("varlen_attention", *_varlen(cu_seqlens_k=torch.tensor([0, 3, 9])), "cu_seqlens_k:"),
    "varlen-k-shape": ("varlen_attention", (_packed()[0], torch.randn(9, 2, 32), torch.randn(9, 2, 32)), _varlen()[1], "k: expected shape"),
    "selection-indices-dtype": ("selection_attention", *_selection(block_indices=torch.zeros(4, 2, 1)), "block_indices: expected dtype"),
    "selection-indices-shape": ("selection_attention", *_selection(block_indices=torch.zeros(4, 1, 1, dtype=torch.int64)), "block_indices: expected shape"),
    "selection-block-size": ("selection_attention", *_selection(block_size=0), "block_size:"),
    "selection-gqa": ("selection_attention", (torch.randn(4, 3, 16), *_packed()[1:3]), _selection()[1], "k: expected a head count"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUTS, ids=str)
def test_every_backend_raises_the_same_input_error(case):
    op, args, kwargs, expected = BAD_INPUTS[case]
    messages = {}
    for name, backend in BACKENDS.items():
        if op in backend.ops:
            with pytest.raises(InputError) as info:
                backend.ops[op](*args, **kwargs)
            messages[name] = str(info.value)
    assert messages["torch"].startswith(expected), messages
    assert len(set(messages.values())) == 1, messages
