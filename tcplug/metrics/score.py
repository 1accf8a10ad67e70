"""The core of ``tcplug score``: temporal metrics of video files, with estimated flow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tcplug.errors import TcplugError
from tcplug.metrics.flow import DISFlow
from tcplug.metrics.temporal import Flicker, TemporalVarianceScore, WarpingError


def load_frames(path: str | Path, size: int | None = None, max_frames: int | None = None) -> np.ndarray:
    """Frames ``(T, H, W, 3)`` uint8 from a video file (mp4, gif, webm, ...) or a ``.npy``.

    ``size`` resizes every frame to ``size x size`` (area interpolation).
    """
    from tcplug.video import read_video

    path = Path(path)
    if path.suffix.lower() == ".npy":
        if not path.is_file():
            raise TcplugError(f"{path}: no such file")
        try:
            frames = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise TcplugError(f"{path}: cannot read .npy ({exc})") from None
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise TcplugError(f"{path}: expected a (T, H, W, 3) array, got shape {frames.shape}")
        if frames.dtype != np.uint8:
            frames = np.clip(frames.astype(np.float64) * (255 if frames.max() <= 1.0 else 1), 0, 255).astype(np.uint8)
        if max_frames:
            frames = frames[:max_frames]
    else:
        frames = read_video(path, max_frames=max_frames)
    if size:
        import cv2

        frames = np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in frames])
    return frames


def score_frames(frames: np.ndarray, flow_preset: str = "medium", progress: bool = False) -> dict:
    """TVS (%), warping error and flicker of one clip ``(T, H, W, 3)`` uint8."""
    if len(frames) < 2:
        raise TcplugError(f"need at least 2 frames, got {len(frames)}")
    estimator = DISFlow(flow_preset)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(frames) - 1, desc="flow", unit="pair", leave=False)
    fwd, bwd = estimator(frames, progress=(lambda: bar.update(1)) if bar else None)
    if bar:
        bar.close()
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).float()[None] / 255.0
    out = {}
    for key, metric in (("tvs", TemporalVarianceScore()), ("warp_error", WarpingError()), ("flicker", Flicker())):
        metric.update(video, fwd[None], bwd[None])
        out[key] = float(metric.compute())
    return out
