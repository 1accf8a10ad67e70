"""Importable helpers for subprocess tests (callbacks must be importable by DDP children)."""

import json
import os

import lightning.pytorch as pl

from tcplug.checkpoint import AtomicCheckpointIO


class RecordBatches(pl.Callback):
    """Writes, per rank, the shards its training batches came from and how many batches it ran."""

    def __init__(self, out_dir: str = "."):
        self.out_dir = out_dir
        self.urls: set[str] = set()
        self.batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches += 1
        self.urls.update(batch.get("__url__", []))

    def on_train_end(self, trainer, pl_module):
        path = os.path.join(self.out_dir, f"rank{trainer.global_rank}.json")
        with open(path, "w") as f:
            json.dump({"rank": trainer.global_rank, "world": trainer.world_size, "batches": self.batches,
                       "urls": sorted(self.urls)}, f)


from tcplug import LossTerm  # noqa: E402


class NanAfter(LossTerm):
    """A loss term that turns NaN from a given training step on (for the fault tests)."""

    def __init__(self, weight: float = 1.0, step: int = 3):
        super().__init__(weight)
        self.step = step

    def forward(self, ctx):
        value = (ctx.pred * 0).mean()
        return value + float("nan") if ctx.step >= self.step else value


def synthetic_batch(n: int = 2, frames: int = 4, size: int = 16, seed: int = 0, shapes: int = 2, gravity: float = 0):
    """A collated batch of synthetic-world clips with every ground-truth key, as training sees it."""
    from tcplug.data import make_clip
    from tcplug.data.schema import SHOTS
    from tcplug.data.shards import ALL_KEYS, PRECOMPUTED_KEYS, collate, decode_clip, encode_sample

    keys = [k for k in ALL_KEYS if k not in PRECOMPUTED_KEYS and k not in {s.name for s in SHOTS}]
    samples = [decode_clip(encode_sample(f"c{i}", make_clip(seed, i, frames, size, shapes, gravity)), keys)
               for i in range(n)]
    for s in samples:
        s.pop("__url__", None)
    return collate(samples)


class KillAt(pl.Callback):
    """Sends its own process ``signal`` (default SIGKILL: no cleanup, like an OOM kill) when
    training reaches ``step``, once: at the start of that training step, or with
    ``during="validation"`` at the start of the first validation batch from that step on."""

    def __init__(self, step: int = 5, signal: str = "SIGKILL", during: str = "train"):
        self.step, self.signal, self.during, self.sent = step, signal, during, False

    def _maybe_kill(self, trainer, now: str):
        if now == self.during and trainer.global_step >= self.step and not self.sent:
            import signal

            self.sent = True
            if self.signal == "SIGINT":  # as Ctrl-C in a terminal: a parent (a test runner) may have
                signal.signal(signal.SIGINT, signal.default_int_handler)  # left SIGINT ignored
            os.kill(os.getpid(), getattr(signal, self.signal))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._maybe_kill(trainer, "train")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self._maybe_kill(trainer, "validation")


class DumpMetrics(pl.Callback):
    """Writes each rank's callback_metrics (after Lightning's reductions) to out_dir/metrics_rank<r>.json."""

    def __init__(self, out_dir: str = "."):
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module):
        values = {k: float(v) for k, v in trainer.callback_metrics.items()}
        with open(os.path.join(self.out_dir, f"metrics_rank{trainer.global_rank}.json"), "w") as f:
            json.dump(values, f)


class _FailsMidWrite(AtomicCheckpointIO):
    """Writes its first ``at - 1`` checkpoints, then half of the ``at``-th, and calls :meth:`fail`."""

    def __init__(self, at: int = 2):
        super().__init__()
        self.at, self.saves = at, 0

    def write_bytes(self, f, data):
        self.saves += 1
        if self.saves < self.at:
            return super().write_bytes(f, data)
        f.write(bytes(data[: len(data) // 2]))
        f.flush()
        self.fail()

    def fail(self):
        raise NotImplementedError


class KillMidWrite(_FailsMidWrite):
    """Writes half of its ``kill_at``-th checkpoint, then SIGKILLs the process."""

    def __init__(self, kill_at: int = 2):
        super().__init__(kill_at)

    def fail(self):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def fsdp_wrapped_classes(preset) -> set:
    """The module classes an FSDP overlay's ``auto_wrap_policy`` wraps (the strategy built as the
    CLI builds it; FSDP itself needs GPUs, so nothing is wrapped here)."""
    import warnings

    import yaml
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import FSDPStrategy

    parser = ArgumentParser()
    parser.add_argument("--strategy", type=FSDPStrategy)
    cfg = yaml.safe_load(open(preset).read())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        strategy = parser.instantiate_classes(parser.parse_object({"strategy": cfg["trainer"]["strategy"]})).strategy
    assert isinstance(strategy, FSDPStrategy)
    return set(strategy.kwargs["auto_wrap_policy"]._module_classes)


class FullDisk(_FailsMidWrite):
    """Its ``fail_at``-th checkpoint write fails half-way as on a full disk (ENOSPC)."""

    def __init__(self, fail_at: int = 2):
        super().__init__(fail_at)

    def fail(self):
        import errno

        raise OSError(errno.ENOSPC, "No space left on device")
