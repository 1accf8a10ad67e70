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


def windows(clips: list[np.ndarray], length: int) -> list[np.ndarray]:
    """Non-overlapping windows of ``length`` frames of every clip (a long video gives several)."""
    return [c[i: i + length] for c in clips for i in range(0, len(c) - length + 1, length)]


def as_batch(clips: list[np.ndarray]) -> torch.Tensor:
    """Clips ``[(T, H, W, 3) uint8]`` of one shape -> ``(N, T, 3, H, W)`` float in [0, 1]."""
    return torch.cat([to_video(c) for c in clips])


def score_set(clips: list[np.ndarray], reference: list[np.ndarray], train: list[np.ndarray] | None = None,
              names: list[str] | None = None, flow_preset: str = "medium", max_length: int = 32) -> dict:
    """The fidelity gate (:func:`tcplug.metrics.gate.evaluate`) of generated ``clips`` against
    ``reference`` clips (every other reference window is held out as the data floor's clips), and
    ``train`` clips for memorisation; all ``[(T, H, W, 3) uint8]`` of one frame size.

    Every clip is cut into windows of the same length (the shortest clip's, at most ``max_length``
    frames). Metrics named in ``names`` whose class sets ``gate_band`` join the gate."""
    from tcplug.metrics.gate import ClipSet, evaluate, metric_bands
    from tcplug.metrics.suite import MetricSuite, build_metrics

    length = min(max_length, *(len(c) for c in clips), *(len(c) for c in reference))
    cand, ref = windows(clips, length), windows(reference, length)
    held, rest = ref[0::2], ref[1::2]
    if len(held) < 2 or len(rest) < 2:
        raise TcplugError(f"the fidelity gate needs at least 4 reference clips of {length} frames (half of them "
                          f"held out as the data floor), the reference has {len(ref)}: give a folder of videos, "
                          "shards, or a longer video")
    named = build_metrics(names) if names else {}
    extra = {name: named[name] for name in metric_bands(named)}  # third-party metrics with a gate band
    rest_video = as_batch(rest)
    figures, floor = {}, {}
    if extra:
        for side, videos in ((figures, cand), (floor, held)):
            suite = MetricSuite({k: type(m)() for k, m in extra.items()}, flow_preset)
            suite.update_reference(rest_video)
            suite.update(as_batch(videos))
            side.update(suite.compute())
    train_video = None
    if train is not None:
        train_windows = windows(train, length)
        if not train_windows:
            raise TcplugError(f"the training clips hold no clip of at least {length} frames")
        train_video = as_batch(train_windows)
    report = evaluate(ClipSet(as_batch(cand), flow_preset=flow_preset), ClipSet(as_batch(held), flow_preset=flow_preset),
                      ClipSet(rest_video, flow_preset=flow_preset), train_video, extra=figures, extra_floor=floor,
                      extra_bands=metric_bands(extra))
    return {"length": length, "reference_clips": len(rest), "heldout_clips": len(held), **report}
