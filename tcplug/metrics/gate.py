"""The fidelity gate: whether generated clips look and move like the data, anchored to the data.

A coherence figure (TVS, warping error) rewards clips that barely change: a frozen clip, a blurred
one, a still frame under a slow camera pan all score near 0. The gate is what a coherence verdict
must pass first. One code path serves ``tcplug score`` (its set line), validation (``val/gate``)
and the ablation.

Every figure is measured **the same way on held-out data clips** (the data floor) and judged
against it, never against a baseline:

=====================  =====================================================  ==================
figure                 what it measures (against the reference set)           passes when
=====================  =====================================================  ==================
``motion_ratio``       mean DIS flow magnitude over the reference's           within [0.8, 1.25]x
                                                                              the floor's
``sharpness_ratio``    spatial gradient energy over the reference's           within [0.67, 1.5]x
``frame_distance``     KID-kernel MMD of per-frame appearance features        <= 2x the floor's
``dynamics_distance``  KID-kernel MMD of per-clip motion statistics           <= 2x the floor's
                       (:func:`clip_dynamics`: how much of the frame moves,
                       how fast, global against local motion, how it is
                       spread and how steady it is over time)
``memorised``          share of clips nearer their nearest training clip      <= 0.25
                       than half the distance 95 % of held-out data clips
                       keep from theirs (:func:`nearest_distances`)
``trajectory_error``   conditioned clips: object centroids against the        <= max(2x, +2 px)
                       conditioning clip's true positions (pixels)            the floor's
``colour_found``       conditioned clips: share of object-frames where the    >= floor - 0.1
                       object's (caption's) colour is found
=====================  =====================================================  ==================

Set distances (MMD) depend on the number of clips (the estimate is biased upward for small sets):
the gate compares equal-sized sets, ``draws`` random subsets of the same size on both sides, and
reports the median with the 2.5-97.5 % range of the draws as the interval. A third-party metric
joins the gate by setting :attr:`~tcplug.metrics.base.VideoMetric.gate_band`.

Each failing figure adds a reason (``motion``, ``sharpness``, ``appearance``, ``dynamics``,
``memorisation``, ``adherence``, or the metric's name) to ``gate["reasons"]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from tcplug.metrics.fidelity import SetDistance

#: flow magnitudes (pixels per frame) above which a pixel counts as moving in :func:`clip_dynamics`
MOVING = (0.25, 1.0, 2.0)
#: names of the :func:`clip_dynamics` features, in order
DYNAMICS_FEATURES = ("moving_025", "moving_1", "moving_2", "speed", "speed_moving", "global", "local",
                     "global_share", "concentration", "steadiness", "change", "net_change")


def clip_dynamics(video: Tensor, fwd: Tensor) -> Tensor:
    """Per-clip motion statistics ``(B, 12)`` (:data:`DYNAMICS_FEATURES`) of clips
    ``(B, T, 3, H, W)`` in ``[0, 1]`` with forward flows ``(B, T-1, 2, H, W)`` in pixels:

    - ``moving_*``: share of pixels moving faster than 0.25, 1 and 2 px per frame;
    - ``speed``: mean flow magnitude; ``speed_moving``: mean magnitude of pixels moving > 1 px;
    - ``global``: magnitude of the median flow vector (a camera pan moves everything by it);
      ``local``: mean magnitude of flow minus that median (objects over a still background);
      ``global_share``: global / (global + local);
    - ``concentration``: share of the total flow magnitude carried by the fastest 10 % of pixels
      (objects: most of it; a pan or shimmer: about 10 %);
    - ``steadiness``: standard deviation over pairs of the per-pair mean magnitude over its mean;
    - ``change``: mean absolute frame difference; ``net_change``: mean |last - first| frame over
      the summed consecutive differences (drifting content: high; jitter in place: low).
    Every feature is averaged over the frame pairs (except ``steadiness`` and ``net_change``)."""
    x = video.float()
    f = fwd.float()
    mag = f.norm(dim=2)  # (B, P, H, W)
    b, p = mag.shape[:2]
    eps = 1e-6
    feats = [(mag > t).float().mean(dim=(2, 3)).mean(1) for t in MOVING]
    speed_pair = mag.mean(dim=(2, 3))  # (B, P)
    feats.append(speed_pair.mean(1))
    moving = (mag > 1.0).float()
    feats.append((mag * moving).sum(dim=(1, 2, 3)) / moving.sum(dim=(1, 2, 3)).clamp_min(1))
    med = f.flatten(3).median(dim=3).values  # (B, P, 2)
    glob = med.norm(dim=2)
    local = (f - med[..., None, None]).norm(dim=2).mean(dim=(2, 3))
    feats += [glob.mean(1), local.mean(1), (glob / (glob + local + eps)).mean(1)]
    flat = mag.flatten(2)
    k = max(1, flat.shape[2] // 10)
    top = flat.topk(k, dim=2).values.sum(2)
    feats.append((top / flat.sum(2).clamp_min(eps)).mean(1))
    feats.append(speed_pair.std(1, unbiased=False) / speed_pair.mean(1).clamp_min(1e-3) if p > 1
                 else torch.zeros(b, device=x.device))
    diffs = (x[:, 1:] - x[:, :-1]).abs().mean(dim=(2, 3, 4))  # (B, P)
    feats.append(diffs.mean(1))
    net = (x[:, -1] - x[:, 0]).abs().mean(dim=(1, 2, 3))
    feats.append(net / diffs.sum(1).clamp_min(eps))
    return torch.stack(feats, dim=1)


def standardized_mmd(a: Tensor, b: Tensor, ref: Tensor) -> float:
    """:func:`~tcplug.metrics.fidelity.mmd` between feature sets ``a`` and ``b`` ``(N, D)``, each
    feature first standardized by the mean and spread of ``ref`` (so no feature's units dominate)."""
    from tcplug.metrics.fidelity import mmd

    ref = ref.double()
    mu, sd = ref.mean(0), ref.std(0, unbiased=False)
    sd = torch.where(sd > 1e-8, sd, torch.ones_like(sd))
    return float(mmd((a.double() - mu) / sd, (b.double() - mu) / sd))


class DynamicsDistance(SetDistance):
    """Distance between the clips' motion statistics (:func:`clip_dynamics`) and the reference's:
    :func:`standardized_mmd`, lower is closer. A camera pan over a still frame reads far from
    objects moving over a still background; compare with the data's value measured the same way
    (with the same number of clips: the estimate is biased upward for small sets)."""

    needs_flow = True

    def clip_features(self, video: Tensor, flows=None) -> Tensor:
        from tcplug.metrics.temporal import _check, estimate_flows

        _check(video)
        fwd = flows[0] if flows is not None else estimate_flows(video)[0]
        return clip_dynamics(video, fwd)

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.tensor(standardized_mmd(a, b, b))


def nearest_distances(clips: Tensor, train: Tensor, size: int = 16, chunk: int = 256) -> Tensor:
    """Per-clip RMS pixel distance ``(N,)`` of clips ``(N, T, 3, H, W)`` in ``[0, 1]`` to their
    nearest clip in ``train`` ``(M, T', 3, H', W')``, both area-resized to ``size x size`` and cut
    to their common number of frames. A clip replayed from ``train`` reads 0."""

    def small(v: Tensor) -> Tensor:
        n, t = v.shape[:2]
        return F.adaptive_avg_pool2d(v.float().flatten(0, 1), size).reshape(n, t, -1)

    t = min(clips.shape[1], train.shape[1])
    a = small(clips[:, :t]).flatten(1)
    best = torch.full((a.shape[0],), float("inf"))
    for i in range(0, train.shape[0], chunk):
        b = small(train[i: i + chunk, :t]).flatten(1)
        best = torch.minimum(best, torch.cdist(a.double(), b.double()).min(1).values.float())
    return best / math.sqrt(a.shape[1])


@dataclass(frozen=True)
class Band:
    """A gate figure passes when ``lo * floor <= value <= hi * floor`` (``floor``: the held-out
    data's value measured the same way); ``reason`` names the failure."""

    lo: float
    hi: float
    reason: str


#: the built-in figures' bands (see the module docstring)
BANDS = {
    "motion_ratio": Band(0.8, 1.25, "motion"),
    "sharpness_ratio": Band(0.67, 1.5, "sharpness"),
    "frame_distance": Band(0.0, 2.0, "appearance"),
    "dynamics_distance": Band(0.0, 2.0, "dynamics"),
}
#: a clip is memorised when nearer its nearest training clip than this fraction of the distance
#: 95 % of held-out data clips keep from theirs
MEMORISED_NEAR = 0.5
#: largest share of memorised clips
MEMORISED_MAX = 0.25


def metric_bands(metrics: dict) -> dict[str, Band]:
    """Bands of the metrics ``{name: VideoMetric}`` that join the gate (their ``gate_band``)."""
    return {name: Band(*m.gate_band, reason=name) for name, m in metrics.items()
            if getattr(m, "gate_band", None) is not None and name not in BANDS}


def judge(values: dict[str, float], floor: dict[str, float], bands: dict[str, Band] | None = None) -> dict:
    """``{"pass": bool, "reasons": [...]}`` of figures ``values`` against the data ``floor``
    measured the same way (both ``{name: value}``; figures missing on either side are not judged).

    ``memorised`` fails above :data:`MEMORISED_MAX`; ``trajectory_error`` above
    ``max(2 x floor, floor + 2)``; ``colour_found`` below ``floor - 0.1``."""
    bands = {**BANDS, **(bands or {})}
    reasons = []
    for name, band in bands.items():
        v, f = values.get(name), floor.get(name)
        if v is None or f is None or _nan(v) or _nan(f):
            continue
        if not band.lo * f <= v <= band.hi * f:
            side = "low" if v < band.lo * f else "high"
            reasons.append(f"{band.reason} ({name} {v:.3g} {side}: data {f:.3g}, band "
                           f"[{band.lo:g}, {band.hi:g}]x)")
    m = values.get("memorised")
    if m is not None and not _nan(m) and m > MEMORISED_MAX:
        reasons.append(f"memorisation ({m:.0%} of clips within {MEMORISED_NEAR:g}x the distance to the nearest "
                       f"training clip that 95 % of held-out data clips keep; at most {MEMORISED_MAX:.0%})")
    te, tf = values.get("trajectory_error"), floor.get("trajectory_error")
    if te is not None and tf is not None and not _nan(te) and not _nan(tf) and te > max(2 * tf, tf + 2):
        reasons.append(f"adherence (trajectory_error {te:.2f} px: data {tf:.2f} px)")
    cf, cff = values.get("colour_found"), floor.get("colour_found")
    if cf is not None and cff is not None and not _nan(cf) and not _nan(cff) and cf < cff - 0.1:
        reasons.append(f"adherence (colour_found {cf:.2f}: data {cff:.2f})")
    return {"pass": not reasons, "reasons": reasons}


def _nan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)


class ClipSet:
    """Per-clip measurements of a set of clips ``(N, T, 3, H, W)`` in ``[0, 1]`` (DIS flow once per
    clip), from which :func:`evaluate` computes set figures on any subset.

    Args:
        video: the clips.
        states: per-clip object states (the synthetic world's ``state``) for adherence, or None.
        flow_preset: the DIS preset.
    """

    def __init__(self, video: Tensor, states: list | None = None, flow_preset: str = "medium") -> None:
        from tcplug.flow import DISFlow
        from tcplug.metrics.fidelity import frame_features, gradient_energy
        from tcplug.metrics.temporal import estimate_flows

        video = video.float().cpu()
        if video.dim() != 5 or video.shape[1] < 2:
            from tcplug.errors import TcplugError

            raise TcplugError(f"clips must be (N, T>=2, 3, H, W), got {tuple(video.shape)}")
        self.video = video
        estimator = DISFlow(flow_preset)
        speeds, sharp, frames, dyn = [], [], [], []
        for i in range(video.shape[0]):
            clip = video[i: i + 1]
            fwd, _ = estimate_flows(clip, estimator)
            speeds.append(float(fwd.norm(dim=2).mean()))
            sharp.append(float(gradient_energy(clip).mean()))
            frames.append(frame_features(clip[0]))
            dyn.append(clip_dynamics(clip, fwd)[0])
        self.speed = np.array(speeds)
        self.sharpness = np.array(sharp)
        self.frames = torch.stack(frames)  # (N, T, 47)
        self.dynamics = torch.stack(dyn)  # (N, 12)
        self.trajectory = self.colour = None
        if states is not None:
            self.trajectory, self.colour = _adherence(video, states)

    def __len__(self) -> int:
        return self.video.shape[0]

    def without_adherence(self) -> ClipSet:
        """The same measurements without the adherence figures (to judge unconditioned clips)."""
        import copy

        out = copy.copy(self)
        out.trajectory = out.colour = None
        return out


def _adherence(video: Tensor, states: list) -> tuple[np.ndarray, np.ndarray]:
    """Per clip: mean trajectory error (px, NaN if no object found) and the share of object-frames
    whose colour is found."""
    from tcplug.metrics.fidelity import TrajectoryError

    traj, found = [], []
    for clip, state in zip(video, states):
        if not state or "position" not in state:
            traj.append(float("nan"))
            found.append(float("nan"))
            continue
        m = TrajectoryError()
        m.update(clip[None], batch={"state": [state]})
        n = int(m.found) + int(m.missed)
        traj.append(float(m.compute()))
        found.append(int(m.found) / n if n else float("nan"))
    return np.array(traj), np.array(found)


def set_figures(cand: ClipSet, idx: np.ndarray, ref: ClipSet, train_nn: np.ndarray | None = None,
                memo_threshold: float | None = None) -> dict[str, float]:
    """The gate's figures of clips ``idx`` of ``cand`` against ``ref`` (see the module docstring)."""
    out = {
        "motion_ratio": float(cand.speed[idx].mean() / max(ref.speed.mean(), 1e-12)),
        "sharpness_ratio": float(cand.sharpness[idx].mean() / max(ref.sharpness.mean(), 1e-12)),
    }
    from tcplug.metrics.fidelity import mmd

    out["frame_distance"] = float(mmd(cand.frames[idx].flatten(0, 1), ref.frames.flatten(0, 1)))
    out["dynamics_distance"] = standardized_mmd(cand.dynamics[idx], ref.dynamics, ref.dynamics)
    if train_nn is not None and memo_threshold is not None:
        out["memorised"] = float((train_nn[idx] < memo_threshold).mean())
    for name, arr in (("trajectory_error", cand.trajectory), ("colour_found", cand.colour)):
        if arr is not None:
            v = arr[idx][~np.isnan(arr[idx])]
            out[name] = float(v.mean()) if len(v) else float("nan")
    return out


def evaluate(candidates: ClipSet, heldout: ClipSet, reference: ClipSet, train: Tensor | None = None,
             draws: int = 32, seed: int = 0, extra: dict[str, float] | None = None,
             extra_floor: dict[str, float] | None = None, extra_bands: dict[str, Band] | None = None) -> dict:
    """The gate of ``candidates`` (generated clips) with its data floor: ``heldout`` data clips (not
    in ``reference``, not in ``train``) measured the same way, both against ``reference``.

    Both sides are measured on ``draws`` random subsets of the same size (80 % of the smaller set),
    so set distances compare like with like. Returns ``{"figures": {name: median}, "intervals":
    {name: [lo, hi]}, "floor": {...}, "floor_intervals": {...}, "clips": n, "gate": {"pass",
    "reasons"}}``. ``train`` (clips ``(M, T, 3, H, W)``) adds ``memorised``; ``extra`` figures of
    third-party metrics (with their ``extra_floor`` and ``extra_bands``) join the judgement."""
    rng = np.random.default_rng(seed)
    smaller = min(len(candidates), len(heldout))
    size = smaller if smaller < 5 else int(0.8 * smaller)
    train_nn = held_nn = threshold = None
    if train is not None:
        train_nn = nearest_distances(candidates.video, train).numpy()
        held_nn = nearest_distances(heldout.video, train).numpy()
        threshold = MEMORISED_NEAR * float(np.percentile(held_nn, 5))

    def over_draws(cs: ClipSet, nn: np.ndarray | None) -> tuple[dict, dict]:
        runs = [set_figures(cs, np.sort(rng.choice(len(cs), size, replace=False)), reference, nn, threshold)
                for _ in range(draws)]
        med, ci = {}, {}
        for k in runs[0]:
            v = np.array([r[k] for r in runs])
            v = v[~np.isnan(v)]
            med[k] = float(np.median(v)) if len(v) else float("nan")
            ci[k] = [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if len(v) else [math.nan] * 2
        return med, ci

    figures, intervals = over_draws(candidates, train_nn)
    floor, floor_ci = over_draws(heldout, held_nn)
    figures.update(extra or {})
    floor.update(extra_floor or {})
    return {"clips": len(candidates), "draw_size": size, "figures": figures, "intervals": intervals,
            "floor": floor, "floor_intervals": floor_ci, "gate": judge(figures, floor, extra_bands)}


__all__ = ["BANDS", "DYNAMICS_FEATURES", "MEMORISED_MAX", "MEMORISED_NEAR", "MOVING", "Band", "ClipSet", "DynamicsDistance", "clip_dynamics", "evaluate",
           "judge", "metric_bands", "nearest_distances", "set_figures", "standardized_mmd"]
