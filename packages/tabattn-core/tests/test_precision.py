"""`tabattn_core.precision`: the scoped float32 dot precision the kernel backends read."""

from __future__ import annotations

import threading

import pytest

from tabattn_core.checks import InputError
from tabattn_core.precision import (
    FP32_DOT_PRECISIONS,
    fp32_dot_precision,
    scoped_fp32_dot_precision,
)


def test_scopes_nest_and_restore():
    assert scoped_fp32_dot_precision() is None
    with fp32_dot_precision("bf16x3"):
        assert scoped_fp32_dot_precision() == "bf16x3"
        with fp32_dot_precision("tf32"):
            assert scoped_fp32_dot_precision() == "tf32"
        assert scoped_fp32_dot_precision() == "bf16x3"
    assert scoped_fp32_dot_precision() is None


def test_scope_restores_after_an_exception():
    with pytest.raises(RuntimeError), fp32_dot_precision("tf32"):
        raise RuntimeError("inside")
    assert scoped_fp32_dot_precision() is None


def test_scope_is_per_thread():
    seen = []
    with fp32_dot_precision("tf32"):
        thread = threading.Thread(target=lambda: seen.append(scoped_fp32_dot_precision()))
        thread.start()
        thread.join()
    assert seen == [None]


@pytest.mark.parametrize("mode", ["ieee", "bf16x6", "TF32", ""])
def test_unknown_mode_is_refused(mode):
    with (
        pytest.raises(InputError, match=r"mode: expected one of .*tf32x3"),
        fp32_dot_precision(mode),
    ):
        pass
    assert mode not in FP32_DOT_PRECISIONS
