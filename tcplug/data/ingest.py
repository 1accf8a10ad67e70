"""Real videos -> clips in the shard format, with estimated flow and occlusion masks."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from tcplug.errors import TcplugError


def _square(frames: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop to a square and resize to ``size`` (area interpolation)."""
    import cv2

    _, h, w, _ = frames.shape
    s = min(h, w)
    y0, x0 = (h - s) // 2, (w - s) // 2
    return np.stack([cv2.resize(f[y0:y0 + s, x0:x0 + s], (size, size), interpolation=cv2.INTER_AREA) for f in frames])


def clips_from_video(path: str | Path, frames: int, size: int, stride: int = 1, flow_preset: str = "medium") -> Iterator[dict]:
    """Non-overlapping clips of ``frames`` frames (every ``stride``-th source frame) with
    DIS forward/backward flow, the forward-backward occlusion mask (1 = occluded) and the cuts
    (``cuts``, ``(T-1,)``, 1 where a pair crosses a hard cut: :func:`~tcplug.flow.detect_cuts`,
    weight-free; such a pair is all occluded: its flow means nothing)."""
    from tcplug.flow import DISFlow, detect_cuts, valid_mask
    from tcplug.video import read_video

    video = read_video(path)[::stride]
    if len(video) < frames:
        raise TcplugError(f"{path}: {len(video)} frames after stride {stride}, need at least {frames}")
    video = _square(video, size)
    est = DISFlow(flow_preset)
    for start in range(0, len(video) - frames + 1, frames):
        clip = video[start:start + frames]
        fwd, bwd = est(clip)
        occ = 1 - valid_mask(fwd, bwd)[:, 0]
        video_t = torch.from_numpy(np.ascontiguousarray(clip)).permute(0, 3, 1, 2)[None].float() / 255
        cuts = detect_cuts(video_t, (fwd[None], bwd[None]))[0]
        occ[cuts] = 1
        yield {
            "frames": clip,
            "flow": fwd.permute(0, 2, 3, 1).numpy().astype(np.float32),
            "flow_bwd": bwd.permute(0, 2, 3, 1).numpy().astype(np.float32),
            "occ": occ.to(torch.uint8).numpy(),
            "cuts": cuts.to(torch.uint8).numpy(),
            "txt": Path(path).stem.replace("_", " "),
            "_meta": {"source": Path(path).name, "start_frame": start * stride, "stride": stride},
        }


def ingest(videos: list[str], out: str | Path, frames: int, size: int, stride: int = 1, shard_size: int = 64,
           video_format: str = "npy", progress: bool = True, mode: str = "new") -> tuple[int, list[str]]:
    """Ingest videos into ``out``; returns ``(clips written, error lines)``.

    A file that cannot be read is reported and skipped; the others are still ingested. ``mode``:
    see :func:`~tcplug.data.shards.write_shards` (a folder with shards is refused unless asked).
    """
    from tqdm.auto import tqdm

    from tcplug.data.shards import check_out_folder

    if frames < 2 or size < 8 or stride < 1 or shard_size < 1:
        raise TcplugError(f"need --frames >= 2, --size >= 8, --stride >= 1 and --shard-size >= 1 (got frames {frames}, "
                          f"size {size}, stride {stride}, shard size {shard_size})")
    check_out_folder(out, mode)  # before any video is read

    from tcplug.data.shards import encode_sample, write_shards

    errors: list[str] = []
    count = 0

    def samples():
        nonlocal count
        for path in tqdm(videos, desc="ingest", unit="video", disable=not progress):
            try:
                for i, clip in enumerate(clips_from_video(path, frames, size, stride)):
                    meta = clip.pop("_meta")
                    count += 1
                    yield encode_sample(f"{Path(path).stem.replace('.', '_')}_{i:05d}", clip, video_format, meta)
            except TcplugError as exc:
                errors.append(str(exc))
                print(f"tcplug data ingest: error: {exc}", file=sys.stderr)

    write_shards(out, samples(), prefix="clips", maxcount=shard_size, mode=mode)
    return count, errors
