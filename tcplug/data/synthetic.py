"""A small synthetic world: moving shapes over a textured static background.

Each clip is generated from ``(seed, index)`` alone, so it is reproducible anywhere (every
DDP rank, every worker) without files. Shapes move at constant velocity and bounce off the
walls; they are drawn back to front, so nearer shapes occlude farther ones.

Output of :func:`make_clip`: ``frames`` uint8 ``(T, H, W, 3)`` and ``static`` uint8
``(H, W)`` (1 where no shape ever covers the pixel during the clip).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

PALETTE = np.array(
    [[230, 60, 50], [40, 160, 80], [50, 90, 220], [240, 200, 40], [200, 70, 200], [40, 200, 210]],
    dtype=np.float32,
)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth static texture ``(H, W, 3)`` in [0, 255] from a few random sinusoids."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(60, 140, size=3).astype(np.float32)
    tex = np.zeros((size, size, 3), np.float32)
    for _ in range(3):
        fx, fy = rng.uniform(1, 4, size=2)
        phase = rng.uniform(0, 2 * np.pi)
        amp = rng.uniform(10, 25, size=3)
        tex += amp * np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)[..., None]
    return np.clip(base + tex, 0, 255)


def make_clip(seed: int, index: int, frames: int = 8, size: int = 32, num_shapes: int = 2) -> dict[str, np.ndarray]:
    """Generate clip ``index`` of the world seeded by ``seed``."""
    rng = np.random.default_rng([seed, index])
    canvas_bg = _background(rng, size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    radius = rng.uniform(0.12, 0.22, num_shapes) * size
    pos = rng.uniform(radius[:, None], size - radius[:, None], (num_shapes, 2)).astype(np.float32)
    vel = rng.uniform(-0.06, 0.06, (num_shapes, 2)).astype(np.float32) * size
    kind = rng.integers(0, 2, num_shapes)  # 0 circle, 1 square
    colour = PALETTE[rng.integers(0, len(PALETTE), num_shapes)]
    order = np.argsort(rng.uniform(size=num_shapes))  # far to near
    out = np.empty((frames, size, size, 3), np.uint8)
    covered = np.zeros((size, size), bool)
    for t in range(frames):
        img = canvas_bg.copy()
        for i in order:
            dx, dy = xx - pos[i, 0], yy - pos[i, 1]
            if kind[i] == 0:
                m = dx * dx + dy * dy <= radius[i] ** 2
            else:
                m = (np.abs(dx) <= radius[i]) & (np.abs(dy) <= radius[i])
            img[m] = colour[i]
            covered |= m
        out[t] = img.round().astype(np.uint8)
        pos += vel
        for d in range(2):  # bounce off the walls
            lo, hi = radius, size - radius
            under, over = pos[:, d] < lo, pos[:, d] > hi
            pos[under, d] = 2 * lo[under] - pos[under, d]
            pos[over, d] = 2 * hi[over] - pos[over, d]
            vel[under | over, d] *= -1
    return {"frames": out, "static": (~covered).astype(np.uint8)}


class SyntheticClips(Dataset):
    """``num_clips`` clips of the synthetic world, as training samples.

    A sample is ``{"video": (T, 3, H, W) float in [-1, 1], "static": (1, H, W) float}``.
    """

    def __init__(self, num_clips: int, frames: int = 8, size: int = 32, num_shapes: int = 2, seed: int = 0) -> None:
        self.num_clips, self.frames, self.size, self.num_shapes, self.seed = num_clips, frames, size, num_shapes, seed

    def __len__(self) -> int:
        return self.num_clips

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        clip = make_clip(self.seed, index, self.frames, self.size, self.num_shapes)
        video = torch.from_numpy(clip["frames"]).permute(0, 3, 1, 2).float() / 127.5 - 1
        return {"video": video, "static": torch.from_numpy(clip["static"]).float()[None]}
