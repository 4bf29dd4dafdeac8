"""Running a predictor call's stages: eagerly, or captured as CUDA graphs at the first call
with given inputs and replayed at the later ones."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable

import torch

from tabattn_core.graphs import capture

__all__ = ["Captured", "CapturedCalls", "Stages", "run_eagerly"]

# Stages of a predictor call: [(run, repeats)] in order, and the tensor holding the result.
Stages = tuple[list[tuple[Callable[[], None], int]], torch.Tensor]
StagesOf = Callable[[dict[str, torch.Tensor]], Stages]


def run_eagerly(inputs: dict[str, torch.Tensor], stages: StagesOf) -> torch.Tensor:
    steps, result = stages(inputs)
    for run, repeats in steps:
        for _ in range(repeats):
            run()
    return result


class Captured:
    """A predictor call's stages captured as CUDA graphs, one per stage, with static copies
    of its inputs: `replay(inputs)` copies new inputs of the same shapes in, replays each
    stage's graph its number of times and returns a copy of the result."""

    def __init__(self, key: tuple, inputs: dict[str, torch.Tensor], stages: StagesOf):
        self.key = key
        self.inputs = {name: t.clone() for name, t in inputs.items()}
        # The stage closures hold what the graphs read and write between stages (the
        # prefilled context K/V): kept alive with the graphs.
        self.steps, self.result = stages(self.inputs)
        # Each stage warmed up once outside its capture (autotuning, compilation).
        self.graphs = [
            (capture(run, device=self.result.device), repeats)
            for run, repeats in self.steps
            if repeats > 0
        ]

    def replay(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        torch._foreach_copy_(list(self.inputs.values()), [inputs[name] for name in self.inputs])
        for graph, repeats in self.graphs:
            for _ in range(repeats):
                graph.replay()
        return self.result.clone()


class CapturedCalls:
    """A predictor's CUDA graphs: per method, those of the latest key (input shapes and what
    else the graphs depend on), and the (method, key) pairs whose capture CUDA refused.
    Threads sharing it take turns."""

    def __init__(self) -> None:
        self._graphs: dict[str, Captured] = {}
        self._eager: set[tuple] = set()
        self._lock = threading.Lock()

    def run(
        self, method: str, key: tuple, inputs: dict[str, torch.Tensor], stages: StagesOf
    ) -> torch.Tensor:
        """`stages(inputs)` from the graphs captured for (method, key), capturing them at the
        first call (the old key's graphs freed first). A capture that CUDA refuses is
        reported once (a warning naming the error) and that call, and later calls with this
        key, run eagerly."""
        if (method, key) not in self._eager:
            with self._lock:
                captured = self._graphs.get(method)
                if captured is None or captured.key != key:
                    self._graphs.pop(method, None)  # free the old graphs before capturing
                    try:
                        captured = self._graphs[method] = Captured(key, inputs, stages)
                    except RuntimeError as exc:
                        self._eager.add((method, key))
                        warnings.warn(
                            f"ARTabPFNPredictor.{method}: CUDA-graph capture failed ({exc}); "
                            "calls with these input shapes run eagerly",
                            RuntimeWarning,
                            stacklevel=4,
                        )
                if (method, key) not in self._eager:
                    return captured.replay(inputs)
        return run_eagerly(inputs, stages)

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(self._graphs)

    def clear(self) -> None:
        with self._lock:
            self._graphs.clear()
            self._eager.clear()
