"""graphs.capture: argument checks before anything runs (CPU); on a GPU, the order of
warm-up, after_warmup and capture, and replays equal to eager calls."""

from __future__ import annotations

import pytest
import torch

from tabattn_core.checks import InputError
from tabattn_core.graphs import capture


def _never_called():
    raise AssertionError("fn ran before its arguments were checked")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"device": "cpu"}, r"^device: expected a CUDA device, got cpu$"),
        ({"device": "meta"}, r"^device: expected a CUDA device, got meta$"),
        ({"warmup": 0}, r"^warmup: expected a positive int, got 0$"),
        ({"warmup": 1.0}, r"^warmup: expected a positive int, got 1.0$"),
        ({"warmup": True}, r"^warmup: expected a positive int, got True$"),
        ({"after_warmup": 3}, r"^after_warmup: expected a callable or None, got 3$"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, message):
    with pytest.raises(InputError, match=message):
        capture(_never_called, **({"device": "cpu"} | kwargs))


def test_fn_must_be_callable():
    with pytest.raises(InputError, match=r"^fn: expected a callable, got Tensor$"):
        capture(torch.zeros(1), device="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_default_device_needs_cuda():
    with pytest.raises(InputError, match=r"^device: expected a CUDA device, got None"):
        capture(_never_called)


@pytest.mark.gpu
@pytest.mark.parametrize("warmup", [1, 3])
def test_gpu_capture_order_and_replay_equals_eager(warmup):
    x = torch.randn(37, 48, device="cuda")
    w = torch.randn(48, 60, device="cuda")
    calls = []

    def fn():
        calls.append(
            "capture"
            if torch.cuda.is_current_stream_capturing()
            else "side"
            if torch.cuda.current_stream() != torch.cuda.default_stream()
            else "main"
        )
        return torch.relu(x @ w).sum(0), x * 2

    captured = capture(fn, warmup=warmup, after_warmup=lambda: calls.append("after"))
    assert calls == ["side"] * warmup + ["after", "capture"]
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        got = captured.replay()
        assert got is captured.outputs
        eager = (torch.relu(x @ w).sum(0), x * 2)
        torch.testing.assert_close(got, eager)
    assert calls[-1] == "capture"  # replays run no Python


@pytest.mark.gpu
def test_gpu_outputs_are_rewritten_in_place():
    counter = torch.zeros((), device="cuda")

    def step():
        counter.add_(1)
        return counter * 10

    captured = capture(step, device=torch.device("cuda"), warmup=2)
    out = captured.outputs
    assert counter.item() == 2  # the warm-up calls ran; the captured one is only recorded
    for i in range(3, 6):
        captured.replay()
        assert counter.item() == i and out.item() == 10 * i
