"""Video I/O with PyAV, and a TensorBoard animated-GIF summary.

Frames are ``uint8`` arrays ``(T, H, W, 3)``; tensors are ``(T, 3, H, W)`` in ``[-1, 1]``.
"""

from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image
from torch import Tensor

from tcplug.errors import TcplugError


def to_uint8(video: Tensor) -> np.ndarray:
    """``(T, 3, H, W)`` in ``[-1, 1]`` -> ``(T, H, W, 3)`` uint8."""
    x = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


class VideoWriter:
    """Incremental H.264 mp4 writer: ``write(frames (t, H, W, 3) uint8)`` any number of times.

    Odd frame sizes are padded to even (yuv420p). Use as a context manager.
    """

    def __init__(self, path: str | Path, fps: int = 8, crf: int = 18) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fps, self.crf = fps, crf
        self._container = None
        self._stream = None
        self.frames = 0

    def write(self, frames: np.ndarray) -> None:
        _, h, w, _ = frames.shape
        ph, pw = h + h % 2, w + w % 2
        if (ph, pw) != (h, w):
            frames = np.pad(frames, ((0, 0), (0, ph - h), (0, pw - w), (0, 0)), mode="edge")
        if self._container is None:
            self._container = av.open(str(self.path), mode="w")
            self._stream = self._container.add_stream("libx264", rate=self.fps)
            self._stream.width, self._stream.height, self._stream.pix_fmt = pw, ph, "yuv420p"
            self._stream.options = {"crf": str(self.crf)}
        for frame in frames:
            for packet in self._stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                self._container.mux(packet)
            self.frames += 1

    def close(self) -> None:
        if self._container is not None:
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._container.close()
            self._container = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_video(frames: np.ndarray, path: str | Path, fps: int = 8, crf: int = 18) -> Path:
    """Encode ``(T, H, W, 3)`` uint8 frames as H.264 mp4 (odd sizes are padded to even)."""
    with VideoWriter(path, fps, crf) as writer:
        writer.write(frames)
    return Path(path)


def read_video(path: str | Path, max_frames: int | None = None) -> np.ndarray:
    """Decode a video file (mp4, webm, gif, ...) to ``(T, H, W, 3)`` uint8."""
    path = Path(path)
    if not path.is_file():
        raise TcplugError(f"{path}: no such file")
    frames = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise TcplugError(f"{path}: no video stream")
            for frame in container.decode(video=0):
                frames.append(frame.to_ndarray(format="rgb24"))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except av.error.FFmpegError as exc:
        raise TcplugError(f"{path}: cannot decode video ({exc})") from None
    if not frames:
        raise TcplugError(f"{path}: no decodable frames")
    return np.stack(frames)


def gif_bytes(frames: np.ndarray, fps: int = 8) -> bytes:
    """Animated GIF of ``(T, H, W, 3)`` uint8 frames."""
    images = [Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return buf.getvalue()


def add_video_gif(writer, tag: str, frames: np.ndarray, step: int, fps: int = 8) -> None:
    """Log frames to a TensorBoard ``SummaryWriter`` as an animated image (no moviepy needed),
    in the writer's own event file."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    from tcplug.compat import tensorboard_file_writer

    t, h, w, c = frames.shape
    image = Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=gif_bytes(frames, fps))
    tensorboard_file_writer(writer).add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), global_step=step)


def read_mask(path: str | Path, size: tuple[int, int] | None = None) -> Tensor:
    """A grayscale mask image as ``(1, 1, H, W)`` floats in ``[0, 1]`` (white = 1), area-resized
    to ``size`` ``(H, W)`` if given. Raises :class:`TcplugError` if it cannot be read."""
    try:
        img = np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0
    except Exception as exc:
        raise TcplugError(f"cannot read mask image {path}: {exc}") from None
    mask = torch.from_numpy(img)[None, None]
    if size is not None:
        mask = torch.nn.functional.interpolate(mask, size=tuple(size), mode="area")
    return mask

