"""`TensorMemo`: values reused while the very same tensors live on unchanged."""

from __future__ import annotations

import gc

import torch

from tabattn_core.memo import TensorMemo


def test_answers_for_the_same_unchanged_tensors_and_extra_only():
    memo = TensorMemo()
    a, b = torch.tensor([0, 3, 7]), torch.zeros(2)
    assert memo.lookup((a, b), 7) is None
    memo.store((a, b), 7, "value")
    assert memo.lookup((a, b), 7) == "value"
    assert memo.lookup((a, b), 8) is None  # another extra
    assert memo.lookup((b, a), 7) is None  # another order
    assert memo.lookup((a.clone(), b), 7) is None  # equal values, another tensor
    b.add_(1)  # an in-place write to either tensor bumps its version
    assert memo.lookup((a, b), 7) is None
    memo.store((a, b), 7, "new")
    assert memo.lookup((a, b), 7) == "new" and len(memo) == 1  # the stale entry replaced


def test_entries_die_with_their_tensors_and_are_bounded():
    memo = TensorMemo(max_entries=2)
    a, b = torch.zeros(1), torch.zeros(1)
    memo.store((a, b), (), 1)
    del b
    gc.collect()
    assert len(memo) == 0
    kept = [torch.zeros(1) for _ in range(3)]
    for i, t in enumerate(kept):
        memo.store((t,), (), i)
    assert len(memo) == 2 and memo.lookup((kept[0],)) is None  # the oldest went
    assert memo.lookup((kept[2],)) == 2


def test_inference_tensors_are_never_memoised():
    memo = TensorMemo()
    with torch.inference_mode():
        t = torch.zeros(3)
    memo.store((t,), (), "value")
    assert len(memo) == 0 and memo.lookup((t,)) is None
