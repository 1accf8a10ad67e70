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


class PeakAlloc(pl.Callback):
    """Writes torch's own CPU allocation peak during training step ``step + 1`` (0-based
    ``step``, default the second: the optimizer state exists by then) to ``out``:
    ``{"above_start_gib": ..., "live_gib": ...}``, the peak above what was allocated when the
    step began (``_mem.trace_peak``: activations, gradients, temporaries) and what the
    parameters, their gradients and the optimizer state held at that start. Their sum is
    torch's allocation peak, the figure ``tcplug plan`` estimates (no allocator, no library
    buffers). Profiling makes that step several times slower; do not time it."""

    def __init__(self, out: str = "alloc.json", step: int = 1) -> None:
        self.out, self.step, self.prof, self.live = out, step, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import torch
        from torch.profiler import ProfilerActivity, profile

        if batch_idx != self.step:
            return
        tensors = {id(p): p for p in pl_module.parameters()}
        tensors.update({id(p.grad): p.grad for p in pl_module.parameters() if p.grad is not None})
        for opt in trainer.optimizers:
            for state in opt.state.values():
                tensors.update({id(v): v for v in state.values() if torch.is_tensor(v)})
        self.live = sum(t.numel() * t.element_size() for t in tensors.values())
        self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.prof.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from _mem import trace_peak

        if batch_idx != self.step or self.prof is None:
            return
        self.prof.__exit__(None, None, None)
        with open(self.out, "w") as f:
            json.dump({"above_start_gib": trace_peak(self.prof) / 2**30, "live_gib": self.live / 2**30}, f)
        self.prof = None
