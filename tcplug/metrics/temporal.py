"""Temporal metrics as torchmetrics Metrics: TVS, warping error, flicker.

All take ``update(video, fwd_flow=None, bwd_flow=None, mask=None)``:

- ``video``: ``(B, T, C, H, W)`` float in ``[0, 1]`` (use :func:`to_unit` for ``[-1, 1]``).
- ``fwd_flow`` / ``bwd_flow``: ``(B, T-1, 2, H, W)`` in pixels (ground truth when the data has
  it). When absent, both are estimated with OpenCV DIS (:class:`~tcplug.metrics.flow.DISFlow`).
- ``mask``: optional ``(B, 1, H, W)`` region of interest (e.g. the static background); it
  multiplies the occlusion mask.

Every metric is a mean over consecutive frame pairs of all clips seen. States are sums,
reduced by torchmetrics across DDP ranks, so 1 and N processes agree.

Definitions (Lai et al. 2018; VBench): with ``W(V_{n+1})`` frame ``n+1`` warped back to ``n`` by
the forward flow and ``M`` the non-occlusion mask of :func:`~tcplug.metrics.flow.valid_mask`,

- TVS (%) = 100 * mean_n  sum(M |V_n - W(V_{n+1})|) / sum(M)   (channel mean)
- warping error = mean_n  sum(M ||V_n - W(V_{n+1})||^2) / sum(M)   (channel sum)
- flicker = mean_n (255 - MAE(u8 V_n, u8 V_{n+1})) / 255   (within ``mask`` if given; higher
  is steadier, 1 = no change)
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from tcplug.metrics.flow import DISFlow, valid_mask, warp


def to_unit(video: Tensor) -> Tensor:
    """``[-1, 1]`` -> ``[0, 1]``."""
    return (video.float() + 1) / 2


def _check(video: Tensor) -> None:
    if video.dim() != 5:
        raise ValueError(f"video must be (B, T, C, H, W), got {tuple(video.shape)}")
    if video.shape[1] < 2:
        raise ValueError("temporal metrics need at least 2 frames")


def _flows(video: Tensor, fwd: Tensor | None, bwd: Tensor | None, estimator: DISFlow) -> tuple[Tensor, Tensor]:
    if fwd is not None and bwd is not None:
        return fwd.float(), bwd.float()
    fw, bw = [], []
    for clip in video:
        frames = (clip.permute(0, 2, 3, 1).clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()
        f, b = estimator(frames)
        fw.append(f)
        bw.append(b)
    return torch.stack(fw).to(video.device), torch.stack(bw).to(video.device)


def pair_errors(video: Tensor, fwd: Tensor | None = None, bwd: Tensor | None = None, mask: Tensor | None = None,
                estimator: DISFlow | None = None) -> tuple[Tensor, Tensor]:
    """Per-pair masked L1 (channel mean) and squared L2 (channel sum), each ``(B, T-1)``."""
    _check(video)
    video = video.float()
    b, t, c, h, w = video.shape
    fwd, bwd = _flows(video, fwd, bwd, estimator or DISFlow())
    cur = video[:, :-1].reshape(-1, c, h, w)
    nxt = video[:, 1:].reshape(-1, c, h, w)
    f = fwd.reshape(-1, 2, h, w)
    warped, _ = warp(nxt, f)
    m = valid_mask(f, bwd.reshape(-1, 2, h, w))
    if mask is not None:
        m = m * mask.float().repeat_interleave(t - 1, dim=0)
    denom = m.sum(dim=(1, 2, 3)).clamp_min(1.0)
    diff = cur - warped
    l1 = (m * diff.abs().mean(1, keepdim=True)).sum(dim=(1, 2, 3)) / denom
    l2 = (m * (diff**2).sum(1, keepdim=True)).sum(dim=(1, 2, 3)) / denom
    return l1.view(b, t - 1), l2.view(b, t - 1)


class _PairMean(Metric):
    """Mean of a per-pair value over all frame pairs seen (summed across ranks)."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, flow_preset: str = "medium", **kwargs) -> None:
        super().__init__(**kwargs)
        self.estimator = DISFlow(flow_preset)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("pairs", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _values(self, video, fwd, bwd, mask) -> Tensor:
        raise NotImplementedError

    def update(self, video: Tensor, fwd_flow: Tensor | None = None, bwd_flow: Tensor | None = None,
               mask: Tensor | None = None) -> None:
        values = self._values(video, fwd_flow, bwd_flow, mask)
        self.total += values.double().sum()
        self.pairs += values.numel()

    def compute(self) -> Tensor:
        return (self.total / self.pairs.clamp_min(1)).float()


class TemporalVarianceScore(_PairMean):
    """TVS in percent: how much each pixel changes beyond what motion explains."""

    def _values(self, video, fwd, bwd, mask):
        return 100.0 * pair_errors(video, fwd, bwd, mask, self.estimator)[0]


class WarpingError(_PairMean):
    """Warping error (Lai et al. 2018): occlusion-masked squared difference after warping."""

    def _values(self, video, fwd, bwd, mask):
        return pair_errors(video, fwd, bwd, mask, self.estimator)[1]


class Flicker(_PairMean):
    """VBench temporal flickering: mean of ``(255 - MAE) / 255`` over consecutive uint8 frames.

    Higher is steadier (1.0 = identical frames). With ``mask`` (e.g. the static background),
    the MAE is taken over the masked pixels only. Flow is not used.
    """

    higher_is_better = True

    def _values(self, video, fwd, bwd, mask):
        _check(video)
        u8 = (video.float().clamp(0, 1) * 255 + 0.5).floor()
        diff = (u8[:, 1:] - u8[:, :-1]).abs().mean(2, keepdim=True)  # (B, T-1, 1, H, W)
        if mask is None:
            mae = diff.mean(dim=(2, 3, 4))
        else:
            m = mask.float()[:, None]  # (B, 1, 1, H, W)
            mae = (diff * m).sum(dim=(2, 3, 4)) / m.sum(dim=(2, 3, 4)).clamp_min(1.0)
        return (255.0 - mae) / 255.0
