"""Temporal metrics as :class:`~tcplug.metrics.base.VideoMetric` s: TVS, warping error, flicker, coverage.

All take ``update(video, flows=None, batch=None)`` (the metric kind's contract):

- ``video``: ``(B, T, C, H, W)`` float in ``[0, 1]`` (use :func:`to_unit` for ``[-1, 1]``).
- ``flows``: ``(fwd, bwd)``, each ``(B, T-1, 2, H, W)`` in pixels (ground truth when the data
  has it). When absent, both are estimated with OpenCV DIS (:class:`~tcplug.flow.DISFlow`).
- ``batch``: with ``region="static"``, ``batch["static"]`` ``(B, 1, H, W)`` is the region of
  interest (the static background); it multiplies the occlusion mask.

Every metric is a mean over consecutive frame pairs of all clips seen. States are sums,
reduced by torchmetrics across DDP ranks, so 1 and N processes agree.

Definitions (Lai et al. 2018; VBench): with ``W(V_{n+1})`` frame ``n+1`` warped back to ``n`` by
the forward flow and ``M`` the non-occlusion mask of :func:`~tcplug.flow.valid_mask`,

- TVS (%) = 100 * mean_n  sum(M |V_n - W(V_{n+1})|) / sum(M)   (channel mean)
- warping error = mean_n  sum(M ||V_n - W(V_{n+1})||^2) / sum(M)   (channel sum)
- coverage = mean_n  mean(M): the share of pixels the flow check kept
- flicker = mean_n (255 - MAE(u8 V_n, u8 V_{n+1})) / 255   (within the region if given; higher
  is steadier, 1 = no change)

A pair across a cut (``batch["cuts"]``, or detected with ``cuts="detect"``: see
:mod:`tcplug.metrics.shots`) is not flicker: it is left out of every metric here and counted in the
``cut_pairs`` state.

A pair whose mask keeps no pixel at all (everything occluded or inconsistent: exactly the
incoherent pairs) has no TVS or warping error: it is left out of the mean and counted in the
``empty_pairs`` state, never scored 0. Its coverage (0) is counted.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from tcplug.errors import TcplugError
from tcplug.flow import DISFlow, estimate_flows, valid_mask, warp
from tcplug.metrics.base import VideoMetric


def to_unit(video: Tensor) -> Tensor:
    """``[-1, 1]`` -> ``[0, 1]``."""
    return (video.float() + 1) / 2


def _check(video: Tensor) -> None:
    if video.dim() != 5:
        raise TcplugError(f"video must be (B, T, C, H, W), got {tuple(video.shape)}")
    if video.shape[1] < 2:
        raise TcplugError("temporal metrics need at least 2 frames")


def pair_errors(video: Tensor, fwd: Tensor | None = None, bwd: Tensor | None = None, mask: Tensor | None = None,
                estimator: DISFlow | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair masked L1 (channel mean), squared L2 (channel sum) and coverage, each ``(B, T-1)``.

    L1 and L2 are NaN for a pair whose mask keeps no pixel; coverage is the kept share of
    the pixels (of ``mask``'s pixels when a region is given).
    """
    _check(video)
    video = video.float()
    b, t, c, h, w = video.shape
    if fwd is None or bwd is None:
        fwd, bwd = estimate_flows(video, estimator)
    fwd, bwd = fwd.float().to(video.device), bwd.float().to(video.device)
    cur = video[:, :-1].reshape(-1, c, h, w)
    nxt = video[:, 1:].reshape(-1, c, h, w)
    f = fwd.reshape(-1, 2, h, w)
    warped, _ = warp(nxt, f)
    m = valid_mask(f, bwd.reshape(-1, 2, h, w))
    area = torch.full((m.shape[0],), float(h * w), device=m.device)
    if mask is not None:
        region = mask.float().to(m.device).repeat_interleave(t - 1, dim=0)
        m = m * region
        area = region.sum(dim=(1, 2, 3))
    kept = m.sum(dim=(1, 2, 3))
    denom = torch.where(kept > 0, kept, torch.full_like(kept, float("nan")))
    diff = cur - warped
    l1 = (m * diff.abs().mean(1, keepdim=True)).sum(dim=(1, 2, 3)) / denom
    l2 = (m * (diff**2).sum(1, keepdim=True)).sum(dim=(1, 2, 3)) / denom
    coverage = kept / area.clamp_min(1.0)
    return l1.view(b, t - 1), l2.view(b, t - 1), coverage.view(b, t - 1)


class _PairMean(VideoMetric):
    """Mean of a per-pair value over all frame pairs seen (summed across ranks); pairs whose
    value is NaN (nothing to measure) are left out and counted in ``empty_pairs``.

    Args:
        region: ``all`` pixels, or the ``static`` region (``batch["static"]``) only.
        flow_preset: DIS preset used when no flows are given.
        cuts: which pairs cross a cut and are left out: ``given`` (``batch["cuts"]``, none when
            absent), ``detect`` (:func:`~tcplug.flow.detect_cuts`) or ``none``.
    """

    higher_is_better = False
    needs_flow = True

    def __init__(self, region: Literal["all", "static"] = "all", flow_preset: str = "medium",
                 cuts: Literal["given", "detect", "none"] = "given", **kwargs) -> None:
        super().__init__(**kwargs)
        if cuts not in ("given", "detect", "none"):
            raise TcplugError(f"cuts must be given, detect or none, got {cuts!r}")
        self.region, self.cuts = region, cuts
        self.estimator = DISFlow(flow_preset)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("pairs", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("empty_pairs", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("cut_pairs", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _mask(self, batch: dict | None) -> Tensor | None:
        return None if self.region == "all" else (batch or {}).get("static")

    def _values(self, video: Tensor, flows, mask: Tensor | None) -> Tensor:
        raise NotImplementedError

    def update(self, video: Tensor, flows: tuple[Tensor, Tensor] | None = None, batch: dict | None = None) -> None:
        """Clips without a static mask are skipped by ``region="static"`` (NaN if none had one)."""
        mask = self._mask(batch)
        if self.region == "static" and mask is None:
            return
        from tcplug.metrics.shots import cut_mask

        values = self._values(video, flows, mask).reshape(-1)
        cut = cut_mask(batch, video, self.cuts, flows)
        cut = torch.zeros_like(values, dtype=torch.bool) if cut is None else cut.reshape(-1).to(values.device)
        ok = ~torch.isnan(values) & ~cut
        self.total += values[ok].double().sum()
        self.pairs += int(ok.sum())
        self.empty_pairs += int((torch.isnan(values) & ~cut).sum())
        self.cut_pairs += int(cut.sum())

    def compute(self) -> Tensor:
        if int(self.pairs) == 0:
            return torch.tensor(float("nan"))
        return (self.total / self.pairs).float()


def _split(flows):
    return (None, None) if flows is None else flows


class TemporalVarianceScore(_PairMean):
    """TVS in percent: how much each pixel changes beyond what motion explains."""

    def _values(self, video, flows, mask):
        return 100.0 * pair_errors(video, *_split(flows), mask, self.estimator)[0]


class WarpingError(_PairMean):
    """Warping error (Lai et al. 2018): occlusion-masked squared difference after warping."""

    def _values(self, video, flows, mask):
        return pair_errors(video, *_split(flows), mask, self.estimator)[1]


class Coverage(_PairMean):
    """The share of pixels the flow check kept, mean over pairs (1 = every pixel's motion is
    consistent forward and backward). Low coverage means TVS and warping error were measured
    on few pixels: the others are exactly the incoherent ones."""

    higher_is_better = True

    def _values(self, video, flows, mask):
        return pair_errors(video, *_split(flows), mask, self.estimator)[2]


class Flicker(_PairMean):
    """VBench temporal flickering: mean of ``(255 - MAE) / 255`` over consecutive uint8 frames.

    Higher is steadier (1.0 = identical frames). With ``region="static"`` the MAE is taken over
    the static mask's pixels only (``bg_flicker``). Flow is not used.
    """

    higher_is_better = True
    needs_flow = False

    def _values(self, video, flows, mask):
        _check(video)
        u8 = (video.float().clamp(0, 1) * 255 + 0.5).floor()
        diff = (u8[:, 1:] - u8[:, :-1]).abs().mean(2, keepdim=True)  # (B, T-1, 1, H, W)
        if mask is None:
            mae = diff.mean(dim=(2, 3, 4))
        else:
            m = mask.float().to(diff.device)[:, None]  # (B, 1, 1, H, W)
            area = m.sum(dim=(2, 3, 4))
            mae = (diff * m).sum(dim=(2, 3, 4)) / torch.where(area > 0, area, torch.full_like(area, float("nan")))
        return (255.0 - mae) / 255.0


class BackgroundFlicker(Flicker):
    """:class:`Flicker` on the data's static region (``batch["static"]``): how still the
    background stays."""

    def __init__(self, flow_preset: str = "medium", cuts: Literal["given", "detect", "none"] = "given",
                 **kwargs) -> None:
        super().__init__(region="static", flow_preset=flow_preset, cuts=cuts, **kwargs)
