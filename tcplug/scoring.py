"""The core of ``tcplug score``: metrics of video files, with estimated flow, against a
reference set (a video, a folder of videos, or shards)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tcplug.errors import TcplugError

VIDEO_SUFFIXES = (".mp4", ".gif", ".webm", ".avi", ".mov", ".mkv", ".npy")


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
        frames = resize_frames(frames, size, size)
    return frames


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Frames ``(T, H, W, 3)`` uint8 resized to ``height x width`` (area interpolation)."""
    import cv2

    if frames.shape[1:3] == (height, width):
        return frames
    return np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA) for f in frames])


def to_video(frames: np.ndarray) -> torch.Tensor:
    """``(T, H, W, 3)`` uint8 -> ``(1, T, 3, H, W)`` float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()[None] / 255.0


def _shard_clips(ref: Path, max_frames: int | None):
    """Clips ``(T, H, W, 3)`` uint8 of every readable sample in the shards at ``ref``."""
    from tcplug.data.shards import decode_clip, iter_tar, list_shards

    for shard in list_shards(str(ref)):
        for raw, _ in iter_tar(shard):
            if raw is None:
                continue
            try:
                video = decode_clip(raw)["video"][:max_frames]  # (T, 3, H, W) in [-1, 1]
            except ValueError:
                continue
            yield ((video.permute(0, 2, 3, 1).numpy() + 1) * 127.5 + 0.5).clip(0, 255).astype(np.uint8)


def load_reference(ref: str | Path, max_frames: int | None = None, max_clips: int = 64) -> list[np.ndarray]:
    """Reference clips ``[(T, H, W, 3) uint8]`` (at least 2 frames each) from a video file, a
    folder of videos or ``.npy`` arrays, or webdataset shards (a folder of ``.tar`` or one tar)."""
    from itertools import islice

    ref = Path(ref)
    if ref.is_file() and ref.suffix.lower() == ".tar" or ref.is_dir() and any(ref.glob("*.tar")):
        clips = list(islice(_shard_clips(ref, max_frames), max_clips))
    elif ref.is_dir():
        files = sorted(p for p in ref.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
        clips = [load_frames(p, None, max_frames) for p in files[:max_clips]]
    elif ref.is_file():
        clips = [load_frames(ref, None, max_frames)]
    else:
        raise TcplugError(f"reference {ref}: no such file or folder")
    if not clips:
        raise TcplugError(f"reference {ref}: no readable clips (videos, .npy arrays or .tar shards)")
    return [c for c in clips if len(c) >= 2]


def reference_suite(names: list[str] | None, reference: list[np.ndarray] | None, flow_preset: str = "medium"):
    """A :class:`~tcplug.metrics.suite.MetricSuite` already fed with the reference clips."""
    from tcplug.metrics.suite import MetricSuite, build_metrics

    suite = MetricSuite(build_metrics(names), flow_preset)
    needing = [n for n, m in suite.metrics.items() if m.needs_reference]
    if reference is None and needing:
        raise TcplugError(f"metrics {', '.join(needing)} compare with reference footage: give --reference REF "
                          "(a video, a folder of videos, or shards), or pick other --metrics")
    for clip in reference or []:
        suite.update_reference(to_video(clip))
    return suite


def score_frames(frames: np.ndarray, flow_preset: str = "medium", progress: bool = False, suite=None) -> dict:
    """Metrics of one clip ``(T, H, W, 3)`` uint8: TVS (%), warping error, flicker, coverage by
    default; with ``suite`` (from :func:`reference_suite`), its metrics against its reference."""
    from tcplug.metrics.suite import NO_REFERENCE_METRICS, MetricSuite, build_metrics

    if len(frames) < 2:
        raise TcplugError(f"need at least 2 frames, got {len(frames)}")
    suite = suite.fork() if suite is not None else MetricSuite(
        build_metrics(NO_REFERENCE_METRICS), flow_preset)
    video = to_video(frames)
    flows = None
    if suite.needs_flow:
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(frames) - 1, desc="flow", unit="pair", leave=False)
        fwd, bwd = suite.estimator(frames, progress=(lambda: bar.update(1)) if bar else None)
        if bar:
            bar.close()
        flows = (fwd[None], bwd[None])
    suite.update(video, flows=flows)
    return suite.compute()
