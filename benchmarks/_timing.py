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


class PeakRSS(pl.Callback):
    """Writes the process's peak resident memory (KiB) during training steps 2..N to ``out``: the
    peak is reset (``/proc/self/clear_refs``) after the first step, so what building the model and
    the first step's one-time work (a lazy cast of the weights) took is not counted."""

    def __init__(self, out: str = "rss.json") -> None:
        self.out = out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def on_train_end(self, trainer, pl_module) -> None:
        with open("/proc/self/status") as f:
            hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        with open(self.out, "w") as f:
            json.dump({"steady_kib": hwm}, f)


class PeakCUDA(pl.Callback):
    """Writes ``{"peak_gib": ...}`` to ``out``: ``torch.cuda.max_memory_allocated`` over training
    steps 2..N (reset after the first step); None on a CPU."""

    def __init__(self, out: str = "peak.json") -> None:
        self.out = out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import torch

        if batch_idx == 0 and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_train_end(self, trainer, pl_module) -> None:
        import torch

        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        with open(self.out, "w") as f:
            json.dump({"peak_gib": peak}, f)
