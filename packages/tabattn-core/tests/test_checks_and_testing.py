"""The input checks (every error names the argument, expected and actual value) and the
test helpers (the bounds they enforce, the NaN poisoning)."""

from __future__ import annotations

import pytest
import torch

from tabattn_core import checks, testing
from tabattn_core.checks import InputError


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: checks.check_tensor("q", [1.0]), "q: expected a torch.Tensor, got list"),
        (
            lambda: checks.check_tensor("q", torch.zeros(2, 3), ndim=4, dims="[B, H, L, D]"),
            r"q: expected 4 dims \[B, H, L, D\], got 2 dims with shape \(2, 3\)",
        ),
        (
            lambda: checks.check_tensor("k", torch.zeros(2, 3), shape=(2, 4)),
            r"k: expected shape \[2, 4\], got \[2, 3\]",
        ),
        (
            lambda: checks.check_tensor("k", torch.zeros(2, 3), shape=(None, 4)),
            r"k: expected shape \[\*, 4\]",
        ),
        (
            lambda: checks.check_tensor(
                "v", torch.zeros(2), dtypes=(torch.float16, torch.bfloat16)
            ),
            "v: expected dtype float16 or bfloat16, got torch.float32",
        ),
        (
            lambda: checks.check_tensor("v", torch.zeros(2), device=torch.device("meta")),
            "v: expected device meta, got cpu",
        ),
        (
            lambda: checks.check_tensor("q", torch.zeros(4, 4).t(), unit_last_stride=True),
            r"q: expected stride 1 on the last \(head\) dim, got strides \(1, 4\)",
        ),
        (
            lambda: checks.check_head_dim("q", 300),
            r"q: expected head dim D in \[16, 256\], got 300",
        ),
        (lambda: checks.check_gqa(6, 4), "k: expected a head count dividing q's 6 heads"),
        (
            lambda: checks.check_lengths("context_lens", torch.tensor([1, 9]), count=2, max_len=5),
            r"context_lens: expected values in \[0, 5\], got min 1 max 9",
        ),
        (
            lambda: checks.check_lengths("context_lens", torch.tensor([1]), count=2, max_len=5),
            "context_lens: expected shape",
        ),
        (lambda: checks.check_scale(float("inf"), 64), "scale: expected a finite positive float"),
        (
            lambda: checks.check_same_device(a=torch.zeros(1), b=torch.zeros(1, device="meta")),
            "b: expected device cpu",
        ),
    ],
)
def test_check_messages(call, message):
    with pytest.raises(InputError, match=message):
        call()


@pytest.mark.parametrize("value", [2.7, 2.0, "3", True, False, None, torch.tensor(2)], ids=repr)
def test_check_int_rejects_what_is_not_an_integer(value):
    with pytest.raises(InputError, match=r"^n: expected an int in \[0, 5\], got "):
        checks.check_int("n", value, lo=0, hi=5)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: checks.check_int("n", -1), r"n: expected a non-negative int, got -1$"),
        (lambda: checks.check_int("n", 6, hi=5), r"n: expected an int in \[0, 5\], got 6$"),
        (lambda: checks.check_positive_int("k", 0), r"k: expected a positive int, got 0$"),
        (lambda: checks.check_positive_int("k", True), r"k: expected a positive int, got True$"),
        (lambda: checks.check_int("n", 1.5, lo=None), r"n: expected an int, got 1.5$"),
    ],
)
def test_check_int_messages(call, message):
    with pytest.raises(InputError, match=message):
        call()


def test_check_int_takes_python_and_numpy_integers():
    np = pytest.importorskip("numpy")  # not a dependency of core: skipped where it is absent
    with pytest.raises(InputError, match=r"^n: expected an int in \[0, 5\], got "):
        checks.check_int("n", np.float64(2.0), lo=0, hi=5)
    for value in (3, np.int64(3), np.int32(3), np.uint8(3)):
        got = checks.check_int("n", value, lo=0, hi=5)
        assert got == 3 and type(got) is int
    assert checks.check_positive_int("k", np.int64(2)) == 2


def test_checks_pass_good_input():
    t = torch.zeros(2, 3, 4)
    assert (
        checks.check_tensor(
            "q", t, ndim=3, shape=(2, None, 4), dtypes=(torch.float32,), device="cpu"
        )
        is t
    )
    assert checks.check_gqa(8, 2) == 4
    assert checks.check_scale(None, 64) == 0.125
    assert issubclass(InputError, ValueError)


def test_rel_error_and_bounds():
    ref = torch.tensor([1.0, -2.0, float("-inf")])
    assert testing.rel_error(ref, ref) == 0.0
    assert testing.rel_error(torch.tensor([1.0, -2.0, 0.0]), ref) == float("inf")  # inf must match
    assert testing.rel_error(torch.tensor([float("nan"), -2.0, float("-inf")]), ref) == float("inf")
    noisy = ref + torch.tensor([1e-3, 0.0, 0.0])
    testing.assert_rel_close(noisy, ref, dtype=torch.float16)
    with pytest.raises(AssertionError, match="relative error"):
        testing.assert_rel_close(noisy, ref, dtype=torch.float32)
    assert (
        testing.REL_TOL[torch.float32] < testing.REL_TOL["tf32"] < testing.REL_TOL[torch.bfloat16]
    )


def test_nan_poisoned_empty_poisons_and_restores():
    real = torch.empty
    # conftest already poisons; the helper nests and restores the outer state
    with testing.nan_poisoned_empty():
        assert torch.isnan(torch.empty(3)).all()
        assert torch.isnan(torch.empty_like(torch.zeros(2))).all()
        assert torch.isnan(torch.zeros(1).new_empty(2)).all()
        assert torch.empty(2, dtype=torch.int64).dtype == torch.int64
    assert torch.empty is real


@pytest.mark.parametrize("shape", testing.AWKWARD_SHAPES, ids=str)
def test_random_qkv_layouts(shape):
    q, k, v = testing.random_qkv(shape, layout="blhd", dtype=torch.float16)
    assert q.shape == (shape.B, shape.H, shape.Lq, shape.D) and q.dtype == torch.float16
    assert k.shape == v.shape == (shape.B, shape.H_kv, shape.Lk, shape.D)
    with pytest.raises(ValueError, match="layout"):
        testing.random_qkv(shape, layout="bdhl")


@pytest.mark.gpu
def test_gpu_device_offsets_checked_once_until_written():
    cu = torch.tensor([0, 3, 7], device="cuda")
    first = checks.check_cu_seqlens("cu", cu, total=7, device=cu.device)
    assert checks.check_cu_seqlens("cu", cu, total=7, device=cu.device) is first
    cu[1] = 9  # now decreasing: the write is seen and refused
    with pytest.raises(InputError, match="cu: expected non-decreasing offsets"):
        checks.check_cu_seqlens("cu", cu, total=7, device=cu.device)
