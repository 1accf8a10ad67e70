"""Optical flow helpers: classical estimation (OpenCV DIS), backward warping, occlusion, and
hard-cut detection (a frame pair that flow cannot explain).

Conventions: frames ``(T, C, H, W)`` float in ``[0, 1]``; flow ``(T-1, 2, H, W)`` in pixels,
channel 0 = x (columns), 1 = y (rows). Forward flow ``f`` maps frame ``n`` to ``n+1``
(pixel ``x`` of frame ``n`` is at ``x + f(x)`` in frame ``n+1``); backward flow ``b`` maps
``n+1`` to ``n``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def warp(x: Tensor, flow: Tensor) -> tuple[Tensor, Tensor]:
    """Sample ``x`` (N, C, H, W) at ``p + flow(p)`` (bilinear); also return the in-frame mask.

    Returns ``(warped (N, C, H, W), inside (N, 1, H, W) bool)``. With ``x`` = frame ``n+1`` and
    the forward flow of frame ``n``, ``warped`` is frame ``n+1`` brought back to frame ``n``.
    """
    n, _, h, w = x.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=x.device, dtype=flow.dtype),
                            torch.arange(w, device=x.device, dtype=flow.dtype), indexing="ij")
    px = xs + flow[:, 0]
    py = ys + flow[:, 1]
    inside = (px >= 0) & (px <= w - 1) & (py >= 0) & (py <= h - 1)
    grid = torch.stack([2 * px / max(w - 1, 1) - 1, 2 * py / max(h - 1, 1) - 1], dim=-1)
    out = F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=True)
    return out, inside[:, None]


def _grad_sq(flow: Tensor) -> Tensor:
    """Squared spatial gradient magnitude of a flow field (N, 2, H, W) -> (N, 1, H, W)."""
    dx = torch.zeros_like(flow)
    dy = torch.zeros_like(flow)
    dx[..., :, :-1] = flow[..., :, 1:] - flow[..., :, :-1]
    dy[..., :-1, :] = flow[..., 1:, :] - flow[..., :-1, :]
    return (dx**2 + dy**2).sum(1, keepdim=True)


def valid_mask(fwd: Tensor, bwd: Tensor) -> Tensor:
    """Non-occlusion mask in frame ``n``'s coordinates (Lai et al. 2018), ``(N, 1, H, W)`` float.

    A pixel is valid unless the forward-backward check fails,
    ``|f + b^|^2 > 0.01 (|f|^2 + |b^|^2) + 0.5`` with ``b^`` the backward flow warped by ``f``,
    or it lies on a motion boundary, ``|grad b^|^2 > 0.01 |b^|^2 + 0.002``, or ``f`` points
    outside the frame.
    """
    bwd_w, inside = warp(bwd, fwd)
    fb = ((fwd + bwd_w) ** 2).sum(1, keepdim=True)
    mag = (fwd**2).sum(1, keepdim=True) + (bwd_w**2).sum(1, keepdim=True)
    occluded = fb > 0.01 * mag + 0.5
    boundary = _grad_sq(bwd_w) > 0.01 * (bwd_w**2).sum(1, keepdim=True) + 0.002
    return (~occluded & ~boundary & inside).float()


def _gray_u8(frame: np.ndarray) -> np.ndarray:
    import cv2

    if frame.dtype != np.uint8:
        frame = np.clip(frame * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) if frame.ndim == 3 else frame


class DISFlow:
    """Classical optical flow with OpenCV's DIS estimator (no weights needed).

    ``__call__(frames (T, H, W, 3) uint8 or float [0, 1]) -> (fwd, bwd)``, each
    ``(T-1, 2, H, W)`` float32 tensors.
    """

    def __init__(self, preset: str = "medium") -> None:
        self.preset = preset

    def _estimator(self):
        import cv2

        presets = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST, "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
                   "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}
        return cv2.DISOpticalFlow_create(presets[self.preset])

    def pair(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Flow ``(H, W, 2)`` from gray uint8 frame ``a`` to ``b``."""
        return self._estimator().calc(a, b, None)

    def __call__(self, frames: np.ndarray, progress=None) -> tuple[Tensor, Tensor]:
        gray = [_gray_u8(f) for f in frames]
        est = self._estimator()
        fwd, bwd = [], []
        for i in range(len(gray) - 1):
            fwd.append(est.calc(gray[i], gray[i + 1], None))
            bwd.append(est.calc(gray[i + 1], gray[i], None))
            if progress is not None:
                progress()
        to_t = lambda fl: torch.from_numpy(np.stack(fl)).permute(0, 3, 1, 2).float()  # noqa: E731
        return to_t(fwd), to_t(bwd)


def estimate_flows(video: Tensor, estimator: DISFlow | None = None) -> tuple[Tensor, Tensor]:
    """Forward and backward DIS flow of clips ``(B, T, C, H, W)`` in ``[0, 1]``: each
    ``(B, T-1, 2, H, W)``."""
    estimator = estimator or DISFlow()
    fw, bw = [], []
    for clip in video:
        frames = (clip.permute(0, 2, 3, 1).clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()
        f, b = estimator(frames)
        fw.append(f)
        bw.append(b)
    return torch.stack(fw).to(video.device), torch.stack(bw).to(video.device)


def detect_cuts(video: Tensor, flows: tuple[Tensor, Tensor] | None = None, changed: float = 0.6,
                coverage: float = 0.6, level: float = 3 / 255) -> Tensor:
    """Hard cuts of clips ``(B, T, C, H, W)`` in ``[0, 1]``: ``(B, T-1)`` bool. A pair is a cut
    when most of its pixels change (over ``changed`` of them by more than ``level`` in some
    channel) and optical flow explains few of them (forward-backward consistent, :func:`valid_mask`,
    on under ``coverage`` of the pixels); weight-free (see :mod:`tcplug.metrics.shots`).
    ``flows``: the clips' ``(fwd, bwd)`` DIS flows, estimated when None."""
    if video.dim() != 5 or video.shape[1] < 2:
        raise ValueError(f"cut detection needs clips (B, T>=2, C, H, W), got {tuple(video.shape)}")
    video = video.float()
    b, t, c, h, w = video.shape
    fwd, bwd = flows if flows is not None else estimate_flows(video)
    kept = valid_mask(fwd.float().reshape(-1, 2, h, w), bwd.float().reshape(-1, 2, h, w)).mean(dim=(1, 2, 3))
    moved = ((video[:, 1:] - video[:, :-1]).abs().amax(2) > level).float().mean(dim=(2, 3))
    return (moved > changed) & (kept.view(b, t - 1).to(moved.device) < coverage)
