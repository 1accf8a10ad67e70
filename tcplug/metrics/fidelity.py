"""Motion and fidelity companions of the temporal metrics: what TVS alone cannot see.

TVS and warping error reward clips that do not move (a frozen clip scores 0) or are blurred
or blank (a uniform gray clip scores 0). These metrics compare the clips with a **reference
set** (real clips of the same world, fed by ``update_reference``) and read near 1 (ratios)
or near the data-vs-data distance when the clips look and move like the reference:

- ``motion_ratio``: mean optical-flow magnitude of the clips over the reference's (same DIS
  estimator for both). A frozen clip reads ~0; a clip that moves twice as much reads ~2.
- ``sharpness_ratio``: spatial gradient energy of the clips over the reference's. A blurred
  clip reads well below 1, a gray one 0, added high-frequency noise above 1.
- ``frame_distance``: maximum mean discrepancy (biased estimate, square root) between
  per-frame weight-free features of the clips and of the reference, with KID's cubic
  polynomial kernel. Features (:func:`frame_features`): colour histograms, a histogram of
  gradient magnitudes, a 2x2 colour layout and local contrast. A gray clip reads far above
  real footage; real footage of the same scene reads near the data-vs-data distance (which is
  above 0 for finite samples: compare with it, measured with the same numbers of frames).
- ``trajectory_error``: on the synthetic world, where object positions are known
  (``batch["state"]``), the distance in pixels between each object's colour centroid in the
  clip and its true position; objects not found are counted in ``missed``, not scored.

States are sums or concatenated features, reduced across DDP processes by torchmetrics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.image.kid import poly_kernel

from tcplug.metrics.base import VideoMetric
from tcplug.metrics.temporal import _check, estimate_flows


def _ratio(num_sum: Tensor, num_n: Tensor, den_sum: Tensor, den_n: Tensor) -> Tensor:
    if int(num_n) == 0 or int(den_n) == 0:
        return torch.tensor(float("nan"))
    den = den_sum / den_n
    if float(den) == 0:
        return torch.tensor(float("nan"))
    return ((num_sum / num_n) / den).float()


class _Ratio(VideoMetric):
    """A per-clip quantity of the clips over the same quantity of the reference."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("value_sum", "ref_sum"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("value_n", "ref_n"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _values(self, video: Tensor, flows) -> Tensor:
        """One value per measured unit (pair or frame), any shape."""
        raise NotImplementedError

    #: values are per frame pair ``(B, T-1)``: the pairs across a cut (``batch["cuts"]``) are left out
    per_pair: bool = False

    def _kept(self, video, flows, batch) -> Tensor:
        v = self._values(video, flows)
        if self.per_pair:
            from tcplug.metrics.shots import cut_mask

            cut = cut_mask(batch, video, "given", flows)
            if cut is not None:
                return v[~cut.to(v.device)].double()
        return v.reshape(-1).double()

    def update(self, video, flows=None, batch=None) -> None:
        v = self._kept(video, flows, batch)
        self.value_sum += v.sum()
        self.value_n += v.numel()

    def update_reference(self, video, flows=None, batch=None) -> None:
        v = self._kept(video, flows, batch)
        self.ref_sum += v.sum()
        self.ref_n += v.numel()

    def compute(self) -> Tensor:
        return _ratio(self.value_sum, self.value_n, self.ref_sum, self.ref_n)


class MotionRatio(_Ratio):
    """Mean optical-flow magnitude (pixels per frame) of the clips over the reference's (pairs
    across a cut left out)."""

    needs_flow = True
    per_pair = True
    needs_reference = True

    def _values(self, video, flows):
        _check(video)
        fwd = flows[0] if flows is not None else estimate_flows(video)[0]
        return fwd.float().norm(dim=2).mean(dim=(2, 3))  # (B, T-1)


def gradient_energy(video: Tensor) -> Tensor:
    """Mean squared spatial gradient (finite differences, channel mean) per frame ``(B, T)``."""
    x = video.float()
    dx = x[..., :, 1:] - x[..., :, :-1]
    dy = x[..., 1:, :] - x[..., :-1, :]
    return (dx**2).mean(dim=(2, 3, 4)) + (dy**2).mean(dim=(2, 3, 4))


class SharpnessRatio(_Ratio):
    """Spatial gradient energy of the clips over the reference's (1 = as sharp as the data)."""

    needs_reference = True

    def _values(self, video, flows):
        if video.dim() != 5:
            _check(video)
        return gradient_energy(video)


_GRAD_EDGES = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64)


#: weights of the gradient-histogram and local-contrast groups: chosen on the synthetic world
#: so that a blurred clip and a frame average stand out from the data-vs-data distance as
#: well as a gray clip does (with equal weights the layout and colour groups, which vary a lot
#: between real clips, drown them)
TEXTURE_WEIGHT = 5.0


def frame_features(frames: Tensor) -> Tensor:
    """Weight-free features of frames ``(N, 3, H, W)`` in ``[0, 1]`` -> ``(N, 47)``.

    - colour histogram: 8 bins per channel, fractions (24);
    - histogram of gradient magnitudes of the gray image, 8 bins on a log scale, times
      :data:`TEXTURE_WEIGHT` (8);
    - colour layout: the frame average-pooled to 2x2 (12);
    - local contrast: per-channel standard deviation within cells of up to 8x8 pixels,
      averaged, times :data:`TEXTURE_WEIGHT` (3).
    """
    x = frames.float().clamp(0, 1)
    n, c, h, w = x.shape
    bins = (x * 8).long().clamp(max=7)
    colour = F.one_hot(bins, 8).float().mean(dim=(2, 3)).reshape(n, c * 8)
    gray = x.mean(1)
    gx = torch.zeros_like(gray)
    gy = torch.zeros_like(gray)
    gx[:, :, :-1] = gray[:, :, 1:] - gray[:, :, :-1]
    gy[:, :-1, :] = gray[:, 1:, :] - gray[:, :-1, :]
    mag = (gx**2 + gy**2).sqrt()
    gbin = torch.bucketize(mag, torch.tensor(_GRAD_EDGES, device=x.device))
    grad = F.one_hot(gbin, len(_GRAD_EDGES) + 1).float().mean(dim=(1, 2))
    layout = F.adaptive_avg_pool2d(x, 2).reshape(n, c * 4)
    k = max(1, min(8, h // 4, w // 4))
    mean = F.avg_pool2d(x, k)
    sq = F.avg_pool2d(x * x, k)
    contrast = (sq - mean * mean).clamp_min(0).sqrt().mean(dim=(2, 3))
    return torch.cat([colour, TEXTURE_WEIGHT * grad, layout, TEXTURE_WEIGHT * contrast], dim=1)


def mmd(a: Tensor, b: Tensor) -> Tensor:
    """Maximum mean discrepancy between feature sets ``(N, D)`` and ``(M, D)`` with KID's cubic
    polynomial kernel; biased (V-statistic) estimate, square root: >= 0."""
    a, b = a.double(), b.double()
    gamma = 1.0 / a.shape[1]
    m2 = (poly_kernel(a, a, 3, gamma).mean() + poly_kernel(b, b, 3, gamma).mean()
          - 2 * poly_kernel(a, b, 3, gamma).mean())
    return m2.clamp_min(0).sqrt().float()


class SetDistance(VideoMetric):
    """A distance between the distribution of features of the clips and of the reference's
    (lower is closer): features are stored per side (reduced across DDP processes by
    concatenation) and compared in :meth:`compute`. Subclasses give :meth:`features` and
    :meth:`distance`."""

    higher_is_better = False
    needs_reference = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("features", default=[], dist_reduce_fx="cat")
        self.add_state("ref_features", default=[], dist_reduce_fx="cat")

    def clip_features(self, video: Tensor, flows) -> Tensor:
        """Feature vectors ``(N, D)`` of clips ``(B, T, C, H, W)``."""
        raise NotImplementedError

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        """The distance between feature sets ``a`` (the clips) and ``b`` (the reference)."""
        raise NotImplementedError

    def update(self, video, flows=None, batch=None) -> None:
        self.features.append(self.clip_features(video, flows))

    def update_reference(self, video, flows=None, batch=None) -> None:
        self.ref_features.append(self.clip_features(video, flows))

    def compute(self) -> Tensor:
        def cat(x):
            return x if isinstance(x, Tensor) else (torch.cat(x) if len(x) else torch.zeros(0))

        a, b = cat(self.features), cat(self.ref_features)
        if a.numel() == 0 or b.numel() == 0:
            return torch.tensor(float("nan"))
        return self.distance(a, b)


class FrameDistance(SetDistance):
    """Distance between the frames' distribution and the reference's (see the module docstring):
    :func:`mmd` of :func:`frame_features`; lower is closer."""

    def clip_features(self, video: Tensor, flows=None) -> Tensor:
        if video.dim() != 5:  # one frame per clip is enough here
            _check(video)
        return frame_features(video.flatten(0, 1))

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        return mmd(a, b)


def colour_centroids(frame: Tensor, colours: list[list[int]], tol: float = 40.0) -> list[Tensor | None]:
    """Centroid ``(x, y)`` of the pixels of ``frame`` ``(3, H, W)`` in ``[0, 1]`` within ``tol``
    (0-255 units, Euclidean RGB) of each colour; None where no pixel matches."""
    px = frame.float() * 255
    out = []
    for colour in colours:
        c = torch.tensor(colour, dtype=px.dtype, device=px.device).view(3, 1, 1)
        m = ((px - c) ** 2).sum(0).sqrt() < tol
        if not bool(m.any()):
            out.append(None)
            continue
        ys, xs = m.nonzero(as_tuple=True)
        out.append(torch.stack([xs.float().mean(), ys.float().mean()]))
    return out


class TrajectoryError(VideoMetric):
    """Object-trajectory error in pixels, for clips whose object state is known.

    For every clip with ``batch["state"]`` (the synthetic world's ``state.json``: per-frame
    ``position`` and each object's ``colour``), every frame and every object whose colour no
    other object of the clip shares: the distance between the centroid of the pixels of that
    colour and the object's true position. An object with no pixel of its colour is counted
    in ``missed`` and not scored. Clips without state are skipped (the metric reads NaN when
    nothing was measured)."""

    higher_is_better = False

    def __init__(self, tolerance: float = 40.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.tolerance = tolerance
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("found", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("missed", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, video, flows=None, batch=None) -> None:
        states = (batch or {}).get("state")
        if states is None:
            return
        if isinstance(states, dict):
            states = [states]
        for clip, state in zip(video, states):
            if not state or "position" not in state:
                continue
            colours = [o["colour"] for o in state["objects"]]
            unique = [i for i, c in enumerate(colours) if colours.count(c) == 1]
            for t in range(min(len(clip), len(state["position"]))):
                cents = colour_centroids(clip[t], [colours[i] for i in unique], self.tolerance)
                for i, cent in zip(unique, cents):
                    if cent is None:
                        self.missed += 1
                        continue
                    true = torch.tensor(state["position"][t][i], dtype=torch.float32, device=cent.device)
                    self.total += float((cent - true).norm())
                    self.found += 1

    def compute(self) -> Tensor:
        if int(self.found) == 0:
            return torch.tensor(float("nan"))
        return (self.total / self.found).float()
