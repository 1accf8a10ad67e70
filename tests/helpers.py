"""Importable helpers for subprocess tests (callbacks must be importable by DDP children)."""

import json
import os

import lightning.pytorch as pl


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
    from tcplug.data.shards import ALL_KEYS, collate, decode_clip, encode_sample

    samples = [decode_clip(encode_sample(f"c{i}", make_clip(seed, i, frames, size, shapes, gravity)), ALL_KEYS)
               for i in range(n)]
    for s in samples:
        s.pop("__url__", None)
    return collate(samples)
