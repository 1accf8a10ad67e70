"""The LightningDataModule. With no shards configured it serves the built-in synthetic world."""

from __future__ import annotations

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from tcplug.data.synthetic import SyntheticClips
from tcplug.errors import TcplugError


class VideoDataModule(pl.LightningDataModule):
    """Clips ``(B, T, 3, H, W)`` in ``[-1, 1]`` for training and validation.

    Args:
        frames: frames per clip ``T``.
        size: frame height and width in pixels.
        batch_size: clips per batch (per process under DDP).
        train_clips: clips in one training epoch.
        val_clips: clips in the validation set (disjoint from the training clips).
        num_shapes: moving shapes per synthetic clip.
        num_workers: DataLoader worker processes.
        seed: seed of the synthetic world.
    """

    def __init__(
        self,
        frames: int = 8,
        size: int = 32,
        batch_size: int = 8,
        train_clips: int = 512,
        val_clips: int = 8,
        num_shapes: int = 2,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if frames < 2:
            raise TcplugError(f"data.frames must be >= 2 for temporal training, got {frames}")
        if size < 8 or size % 2:
            raise TcplugError(f"data.size must be an even number >= 8, got {size}")
        if batch_size < 1 or train_clips < 1 or val_clips < 1:
            raise TcplugError("data.batch_size, data.train_clips and data.val_clips must be >= 1")
        self.save_hyperparameters()
        self.frames, self.size, self.batch_size = frames, size, batch_size
        self.train_clips, self.val_clips, self.num_shapes = train_clips, val_clips, num_shapes
        self.num_workers, self.seed = num_workers, seed

    def train_dataloader(self) -> DataLoader:
        ds = SyntheticClips(self.train_clips, self.frames, self.size, self.num_shapes, self.seed)
        return DataLoader(ds, batch_size=self.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        # a different seed stream: validation clips never appear in training
        ds = SyntheticClips(self.val_clips, self.frames, self.size, self.num_shapes, self.seed + 1_000_003)
        return DataLoader(ds, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)

    test_dataloader = val_dataloader
    predict_dataloader = val_dataloader
