"""A callback for benchmarks: wall-clock time between consecutive training-batch starts."""

from __future__ import annotations

import json
import time

import lightning.pytorch as pl


class StepTimer(pl.Callback):
    """Writes the list of per-step times (seconds) to ``out`` at the end of training."""

    def __init__(self, out: str = "steps.json") -> None:
        self.out = out
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        self.starts.append(time.perf_counter())
        steps = [b - a for a, b in zip(self.starts, self.starts[1:])]
        with open(self.out, "w") as f:
            json.dump(steps, f)
