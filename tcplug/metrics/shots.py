"""Metrics that know shots: cut detection, cut accuracy, identity across shots.

A cut is not flicker: the temporal metrics (:mod:`tcplug.metrics.temporal`) leave out the frame
pairs that cross one, counting them in ``cut_pairs``. Where the cuts are is given by the data
(``batch["cuts"]``, ``(B, T-1)``, 1 where frames ``n, n+1`` lie in different shots: the multi-shot
world, :mod:`tcplug.data.shots`, or shots asked of a sampler) or detected (``cuts="detect"``, real
footage without boundaries). Detection is never automatic: a detector reads exactly the incoherent
pairs (a frame-shuffled control) as cuts, and would excuse them.

:func:`detect_cuts` is weight-free: a pair is a cut when most of its pixels change (more than
``changed`` = 60 % of them by more than 3 levels of 255 in some channel) **and** the optical flow
between the two frames explains few of them (forward-backward consistent on less than ``coverage``
= 60 % of the pixels, DIS flow as the temporal metrics use). Motion within a shot changes many
pixels of real footage (noise, a moving camera) but keeps its flow consistent; objects jumping about
a still camera (a frame-shuffled control) leave the background unchanged; a camera change does
both. Measured on the multi-shot world (80 clips, 3 sizes and both difficulties): balanced accuracy
0.987; no cut found in 450 pairs of frame-shuffled one-camera clips, nor within the two real clips of
``tests/data/cuts``.

- :class:`CutAccuracy`: balanced accuracy of the detected cuts against the asked ones (the mean of
  the share of asked cuts found and of the share of other pairs left uncut); 1 = cuts exactly
  where asked.
- :class:`CrossShotIdentity`: each object's appearance in shot ``k`` against shot 1, ``1 - |c_k -
  c_1| / sqrt(3)`` with ``c`` its mean RGB colour over the pixels the data's object masks give
  (``batch["ids"]`` ``(B, T, H, W)``, -1 = background: ground truth on the synthetic world, where a
  generated clip is judged where its objects should be); without masks, the shot's colour
  histogram (8 bins a channel, 512 joint) against shot 1's, by histogram intersection (a scene's
  appearance, weight-free, for real video). Kept by the number of shots in between
  (:meth:`CrossShotIdentity.by_distance`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tcplug.flow import detect_cuts
from tcplug.metrics.base import VideoMetric

MAX_SHOTS = 32


def cut_mask(batch: dict | None, video: Tensor, mode: str = "given",
             flows: tuple[Tensor, Tensor] | None = None) -> Tensor | None:
    """The pairs to leave out, ``(B, T-1)`` bool, or None: ``given`` reads ``batch["cuts"]``
    (None when the data has none); ``detect`` runs :func:`detect_cuts`; ``none`` keeps every pair."""
    if mode == "none":
        return None
    if mode == "detect":
        return detect_cuts(video, flows)
    cuts = (batch or {}).get("cuts")
    if cuts is None:
        return None
    cuts = torch.as_tensor(cuts, device=video.device).bool()
    return cuts.view(video.shape[0], video.shape[1] - 1)


def shot_index(cuts: Tensor) -> Tensor:
    """``(B, T-1)`` cuts -> ``(B, T)`` shot number of each frame (0 for the first shot)."""
    return torch.cat([torch.zeros_like(cuts[:, :1], dtype=torch.long), cuts.long().cumsum(1)], dim=1)


class CutAccuracy(VideoMetric):
    """Balanced accuracy of the detected cuts against ``batch["cuts"]`` (see the module
    docstring); clips without ``cuts`` are skipped. Target 1."""

    higher_is_better = True
    needs_flow = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("found", "asked", "kept", "others"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, video: Tensor, flows=None, batch: dict | None = None) -> None:
        asked = cut_mask(batch, video, "given")
        if asked is None:
            return
        found = detect_cuts(video, flows).to(asked.device)
        self.found += int((found & asked).sum())
        self.asked += int(asked.sum())
        self.kept += int((~found & ~asked).sum())
        self.others += int((~asked).sum())

    def compute(self) -> Tensor:
        parts = [self.found / self.asked] if int(self.asked) else []
        parts += [self.kept / self.others] if int(self.others) else []
        return torch.stack(parts).float().mean() if parts else torch.tensor(float("nan"))


class CrossShotIdentity(VideoMetric):
    """Appearance in each later shot against the first (see the module docstring); the shots come
    from ``batch["cuts"]`` (or are detected with ``cuts="detect"``). Target 1.

    Args:
        cuts: ``given`` or ``detect``.
        min_pixels: an object shown on fewer pixels in a shot is not judged there.
    """

    higher_is_better = True

    def __init__(self, cuts: str = "given", min_pixels: int = 4, **kwargs) -> None:
        super().__init__(**kwargs)
        self.cuts, self.min_pixels = cuts, min_pixels
        self.add_state("total", default=torch.zeros(MAX_SHOTS, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(MAX_SHOTS, dtype=torch.long), dist_reduce_fx="sum")

    def _add(self, distance: int, value: float) -> None:
        d = min(distance, MAX_SHOTS - 1)
        self.total[d] += value
        self.count[d] += 1

    def update(self, video: Tensor, flows=None, batch: dict | None = None) -> None:
        cuts = cut_mask(batch, video, self.cuts, flows)
        if cuts is None or not cuts.any():
            return
        shots = shot_index(cuts)
        ids = (batch or {}).get("ids")
        video = video.float().clamp(0, 1)
        for i in range(video.shape[0]):
            n = int(shots[i, -1]) + 1
            if ids is None:
                self._scene(video[i], shots[i], n)
            else:
                self._objects(video[i], torch.as_tensor(ids[i], device=video.device), shots[i], n)

    def _objects(self, clip: Tensor, ids: Tensor, shots: Tensor, n: int) -> None:
        pixels = clip.permute(0, 2, 3, 1)  # (T, H, W, 3)
        for obj in [int(o) for o in ids.unique() if o >= 0]:
            colours = []
            for k in range(n):
                m = (ids == obj) & (shots == k)[:, None, None]
                colours.append(pixels[m].mean(0) if int(m.sum()) >= self.min_pixels else None)
            if colours[0] is None:
                continue
            for k in range(1, n):
                if colours[k] is not None:
                    self._add(k, 1.0 - float((colours[k] - colours[0]).norm()) / 3**0.5)

    def _scene(self, clip: Tensor, shots: Tensor, n: int) -> None:
        q = (clip * (8 - 1e-4)).long()  # (T, 3, H, W)
        code = (q[:, 0] * 64 + q[:, 1] * 8 + q[:, 2]).flatten(1)  # (T, H*W)
        hists = []
        for k in range(n):
            h = torch.bincount(code[shots == k].flatten(), minlength=512).double()
            hists.append(h / h.sum())
        for k in range(1, n):
            self._add(k, float(torch.minimum(hists[k], hists[0]).sum()))

    def by_distance(self) -> dict[int, float]:
        """Mean identity by the number of shots between (1 = the shot after the first)."""
        return {d: float(self.total[d] / self.count[d]) for d in range(1, MAX_SHOTS) if int(self.count[d])}

    def compute(self) -> Tensor:
        if int(self.count.sum()) == 0:
            return torch.tensor(float("nan"))
        return (self.total.sum() / self.count.sum()).float()
