"""Control clips: fakes that a coherence figure alone calls good, built from data clips.

Every function takes data clips ``(N, T, 3, H, W)`` float in ``[0, 1]`` and returns fakes of the
same shape. The fidelity gate (:mod:`tcplug.metrics.gate`) must fail each one with its reason; the
ablation scores them beside the recipes with the same code.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def frozen(data: Tensor) -> Tensor:
    """Frame 0 repeated: TVS 0, no motion."""
    return data[:, :1].expand_as(data).contiguous()


def freezes_late(data: Tensor, at: float = 0.5) -> Tensor:
    """Each clip as it is until ``at`` of its length, then its last frame there held: real motion
    that stops (a generator that runs out of motion)."""
    t = data.shape[1]
    k = max(1, int(round(at * t)))
    return torch.cat([data[:, :k], data[:, k - 1: k].expand(-1, t - k, *data.shape[2:])], 1).contiguous()


def gray(data: Tensor) -> Tensor:
    """Uniform mid-gray: TVS 0, nothing of the data."""
    return torch.full_like(data, 0.5)


def blurred(data: Tensor, k: int = 9) -> Tensor:
    """Gaussian blur of every frame (``k`` pixels): coherence improves, detail is gone."""
    import cv2

    arr = data.permute(0, 1, 3, 4, 2).contiguous().numpy()
    out = np.stack([[cv2.GaussianBlur(f, (k, k), 0) for f in clip] for clip in arr])
    return torch.from_numpy(out).permute(0, 1, 4, 2, 3).contiguous()


def shuffled(data: Tensor, seed: int = 0) -> Tensor:
    """Each clip's own frames in a random order (the same content, broken time)."""
    g = torch.Generator().manual_seed(seed)
    t = data.shape[1]
    out = []
    for clip in data:
        perm = torch.randperm(t, generator=g)
        while t > 2 and bool((perm == torch.arange(t)).all()):
            perm = torch.randperm(t, generator=g)
        out.append(clip[perm])
    return torch.stack(out)


def independent(data: Tensor) -> Tensor:
    """Frame ``t`` of clip ``i`` taken from clip ``i + t``: every frame real, no two of one clip."""
    n, t = data.shape[:2]
    return torch.stack([data[(i + torch.arange(t)) % n, torch.arange(t)] for i in range(n)])


def _shifted(frame: Tensor, dx: float, dy: float) -> Tensor:
    """``frame`` ``(3, H, W)`` moved by ``(dx, dy)`` pixels (bilinear, edges reflected)."""
    import cv2

    img = frame.permute(1, 2, 0).contiguous().numpy()
    m = np.float32([[1, 0, dx], [0, 1, dy]])
    out = cv2.warpAffine(img, m, (img.shape[1], img.shape[0]), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REFLECT)
    return torch.from_numpy(out).permute(2, 0, 1)


def still_pan(data: Tensor, speed: float = 0.3, seed: int = 0) -> Tensor:
    """A still frame of each clip (frame 0) moved by a slow camera pan: ``speed`` pixels per frame
    (sub-pixel by default) in a random direction per clip. No object moves."""
    rng = np.random.default_rng(seed)
    out = []
    for clip in data:
        a = rng.uniform(0, 2 * np.pi)
        vx, vy = speed * np.cos(a), speed * np.sin(a)
        out.append(torch.stack([_shifted(clip[0], vx * t, vy * t) for t in range(clip.shape[0])]))
    return torch.stack(out)


def jitter(data: Tensor, amplitude: float = 1.0, seed: int = 0) -> Tensor:
    """A still frame of each clip (frame 0) shaken in place: every frame moved by a random offset of
    up to ``amplitude`` pixels (camera shake, no drift). No object moves."""
    rng = np.random.default_rng(seed)
    out = []
    for clip in data:
        offs = rng.uniform(-amplitude, amplitude, size=(clip.shape[0], 2))
        offs[0] = 0
        out.append(torch.stack([_shifted(clip[0], float(dx), float(dy)) for dx, dy in offs]))
    return torch.stack(out)


#: every control by name
CONTROLS = {"frozen": frozen, "freezes_late": freezes_late, "gray": gray, "blurred": blurred, "shuffled": shuffled, "independent": independent,
            "still_pan": still_pan, "jitter": jitter}

__all__ = ["CONTROLS", "blurred", "freezes_late", "frozen", "gray", "independent", "jitter", "shuffled", "still_pan"]
