"""Drift of long videos: figures per chunk against frame index, and one summary per video.

Adjacent-frame metrics are blind to slow drift: a video can keep TVS flat while its background
fades, its objects shrink or stop moving. :func:`chunk_figures` cuts each video into chunks of
``chunk`` frames and measures, per chunk, with the same weight-free tools as the fidelity gate
(DIS flow, gradient energy; no learned network):

===========================  =========================================================================
figure                       per chunk
===========================  =========================================================================
``tvs``                      TVS (%) over the chunk's frame pairs (no pair across a chunk boundary,
                             nor across a cut when ``cuts`` are given)
``motion``                   mean flow magnitude, pixels per frame
``sharpness``                spatial gradient energy
``motion_ratio``             ``motion`` over the reference clips' (with a reference)
``sharpness_ratio``          ``sharpness`` over the reference clips' (with a reference)
``dynamics_distance``        standardized MMD of the chunks' motion statistics
                             (:func:`~tcplug.metrics.gate.clip_dynamics`) against the reference
                             clips' (with a reference; the set is chunk ``k`` of every video scored)
``background_colour``        mean absolute RGB difference (0-255) of the chunk's temporal-median
                             frame against the first chunk's, on pixels static in both
``background_texture``       gradient energy of the median frame on those pixels over the first
                             chunk's
``object_colour``            RGB distance (0-255) of the mean colour of moving pixels (flow > 0.5 px)
                             from the first chunk's
``object_size``              share of moving pixels over the first chunk's
``trajectory_error``         object centroids against the true positions, pixels (when each video's
                             object state over its whole length is known: the synthetic world
                             simulated as long as the video)
``object_size_true``         per object, pixels of its colour over its count in the first chunk
                             (with the state), mean over objects
===========================  =========================================================================

:func:`summary` gives one figure per video and name: the relative degradation of the last quarter
of the chunks against the first chunk (as BlockVid's Video Drift Error), ``last / first`` for
figures that are ratios or distances and ``last`` alone for figures measured against the first
chunk (0 or 1 there by construction). :func:`plot` draws every figure against frame index (PNG).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch

from tcplug.errors import TcplugError

#: the order figures are printed and plotted in
ORDER = ("tvs", "motion_ratio", "sharpness_ratio", "dynamics_distance", "trajectory_error", "background_colour",
         "background_texture", "object_colour", "object_size", "object_size_true", "motion", "sharpness")
#: figures measured against the first chunk (0, or 1 for ratios, at the first chunk itself)
AGAINST_FIRST = ("background_colour", "background_texture", "object_colour", "object_size", "object_size_true")
STATIC_PX, MOVING_PX = 0.25, 0.5


def _flows(frames: np.ndarray, flow_preset: str) -> tuple[torch.Tensor, torch.Tensor]:
    from tcplug.flow import DISFlow

    fwd, bwd = DISFlow(flow_preset)(frames)
    return fwd, bwd


def _per_chunk(frames: np.ndarray, fwd: torch.Tensor, bwd: torch.Tensor, chunk: int,
               state: dict | None, cuts: torch.Tensor | None = None) -> tuple[list[dict], list[torch.Tensor]]:
    """The figures of each chunk of one video ``(T, H, W, 3)`` uint8 (flows over all its pairs),
    and each chunk's motion statistics ``(12,)``; ``cuts`` ``(T-1,)`` bool: pairs left out, and
    the first chunk of each shot is the one later chunks of that shot are measured against."""
    from tcplug.metrics.fidelity import colour_centroids, gradient_energy
    from tcplug.metrics.gate import clip_dynamics
    from tcplug.metrics.shots import shot_index
    from tcplug.metrics.temporal import TemporalVarianceScore

    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255  # (T, 3, H, W)
    rows, dyn = [], []
    first: dict = {}
    colours = [o["colour"] for o in state["objects"]] if state else []
    cuts = torch.zeros(len(frames) - 1, dtype=torch.bool) if cuts is None else torch.as_tensor(cuts).bool().reshape(-1)
    if len(cuts) != len(frames) - 1:
        raise TcplugError(f"cuts for a video of {len(frames)} frames must have {len(frames) - 1} pairs, got {len(cuts)}")
    shot_of = shot_index(cuts[None])[0]  # (T,)
    for start in range(0, len(frames) - 1, chunk):
        stop = min(start + chunk, len(frames))
        if stop - start < 2:
            break
        keep = ~cuts[start:stop - 1]  # the chunk's pairs within a shot
        if not keep.any():  # every pair crosses a cut: nothing to measure
            rows.append({"start": start, "frames": stop - start})
            dyn.append(None)
            continue
        if first and int(shot_of[start]) != first["shot"]:  # a new shot: its own first chunk
            first = {}
        v, f, b = video[start:stop], fwd[start:stop - 1], bwd[start:stop - 1]
        tvs = TemporalVarianceScore()
        tvs.update(v[None], (f[None], b[None]), {"cuts": cuts[start:stop - 1][None]})
        mag = f[keep].norm(dim=1)  # (P, H, W): pairs within a shot
        static = (mag < STATIC_PX).all(0)
        moving = mag > MOVING_PX
        median = v.median(0).values  # (3, H, W)
        row = {"start": start, "frames": stop - start, "tvs": float(tvs.compute()), "motion": float(mag.mean()),
               "sharpness": float(gradient_energy(v[None]).mean())}
        moving_px = v[1:][keep].permute(1, 0, 2, 3)[:, moving]  # (3, n) colours of moving pixels
        if not first:
            first = {"shot": int(shot_of[start]), "static": static, "median": median,
                     "object_colour": moving_px.mean(1) if moving_px.numel() else None,
                     "object_size": float(moving.float().mean())}
        both = static & first["static"]
        if both.any():
            row["background_colour"] = float((median - first["median"]).abs()[:, both].mean() * 255)
            grad_now = _grad(median)[both].mean()
            grad_first = _grad(first["median"])[both].mean()
            row["background_texture"] = float(grad_now / grad_first) if grad_first > 0 else math.nan
        else:
            row["background_colour"] = row["background_texture"] = math.nan
        oc = moving_px.mean(1) if moving_px.numel() else None
        row["object_colour"] = float((oc - first["object_colour"]).norm() * 255) \
            if oc is not None and first["object_colour"] is not None else math.nan
        row["object_size"] = float(moving.float().mean()) / first["object_size"] if first["object_size"] > 0 else math.nan
        if state:
            errs, counts = [], []
            for t in range(start, min(stop, len(state["position"]))):
                cents = colour_centroids(v[t - start], colours)
                for i, cent in enumerate(cents):
                    if cent is not None:
                        errs.append(float((cent - torch.tensor(state["position"][t][i])).norm()))
                px = v[t - start].float() * 255
                counts.append([float((((px - torch.tensor(c, dtype=px.dtype).view(3, 1, 1)) ** 2).sum(0).sqrt()
                                       < 40).sum()) for c in colours])
            row["trajectory_error"] = float(np.mean(errs)) if errs else math.nan
            size = np.mean(counts, 0) if counts else np.full(len(colours), math.nan)
            if "sizes" not in first:
                first["sizes"] = size
            with np.errstate(divide="ignore", invalid="ignore"):
                rel = size / first["sizes"]
            rel = rel[np.isfinite(rel)]
            row["object_size_true"] = float(rel.mean()) if rel.size else math.nan
        rows.append(row)
        seg = int(keep.long().cumprod(0).sum()) + 1  # the chunk's frames up to its first cut
        dyn.append(clip_dynamics(v[None, :seg], f[None, :seg - 1])[0] if seg >= 2 else None)
    return rows, dyn


def _grad(frame: torch.Tensor) -> torch.Tensor:
    """Per-pixel squared gradient magnitude ``(H, W)`` of a frame ``(3, H, W)`` (zero-padded edges)."""
    dx = torch.zeros_like(frame)
    dy = torch.zeros_like(frame)
    dx[:, :, :-1] = frame[:, :, 1:] - frame[:, :, :-1]
    dy[:, :-1] = frame[:, 1:] - frame[:, :-1]
    return (dx**2 + dy**2).mean(0)


def chunk_figures(videos: list[np.ndarray], chunk: int, reference: list[np.ndarray] | None = None,
                  states: list[dict | None] | None = None, flow_preset: str = "medium",
                  progress: bool = False, cuts: list | None = None) -> dict:
    """Per-chunk figures of ``videos`` ``[(T, H, W, 3) uint8]`` (one frame size), chunks of
    ``chunk`` frames; ``reference`` clips of that size add the ratios and the dynamics distance;
    ``states`` (each video's object state over its whole length, or None) add the figures against
    the truth. ``cuts`` (per video ``(T-1,)``, 1 where frames ``n, n+1`` lie in different shots, or
    None) leaves the pairs across a cut out of every flow-based figure, and measures the figures
    against the first chunk against the first chunk *of the same shot* (a cut is not drift; align
    ``chunk`` with the shots for chunks of one shot).

    Returns ``{"chunk", "starts" (chunk start frames), "figures": {name: (videos, chunks) array}}``
    (chunks a video does not reach are NaN)."""
    from tcplug.metrics.fidelity import gradient_energy
    from tcplug.metrics.gate import clip_dynamics, standardized_mmd

    if chunk < 2:
        raise TcplugError(f"a chunk needs at least 2 frames, got {chunk}")
    if not videos:
        raise TcplugError("no videos to measure")
    states = states or [None] * len(videos)
    cuts = cuts or [None] * len(videos)
    per_video, dyn = [], []
    it = zip(videos, states, cuts)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=len(videos), desc="drift", unit="video", leave=False)
    for frames, state, cut in it:
        if len(frames) < 2:
            raise TcplugError(f"a video of {len(frames)} frame(s): need at least 2")
        fwd, bwd = _flows(frames, flow_preset)
        rows, d = _per_chunk(frames, fwd, bwd, chunk, state, cut)
        per_video.append(rows)
        dyn.append(d)
    n_chunks = max(len(r) for r in per_video)
    starts = [i * chunk for i in range(n_chunks)]
    names = sorted({k for rows in per_video for row in rows for k in row} - {"start", "frames"})
    figures = {k: np.full((len(videos), n_chunks), np.nan) for k in names}
    for v, rows in enumerate(per_video):
        for c, row in enumerate(rows):
            for k in names:
                figures[k][v, c] = row.get(k, np.nan)
    if reference is not None:
        ref_motion, ref_sharp, ref_dyn = [], [], []
        for clip in reference:
            if len(clip) < 2:
                continue
            f, _ = _flows(clip, flow_preset)
            v = torch.from_numpy(np.ascontiguousarray(clip)).permute(0, 3, 1, 2).float()[None] / 255
            ref_motion.append(float(f.norm(dim=1).mean()))
            ref_sharp.append(float(gradient_energy(v).mean()))
            ref_dyn.append(clip_dynamics(v[:, :chunk], f[None, :chunk - 1])[0])
        if len(ref_dyn) < 2:
            raise TcplugError("the reference needs at least 2 clips of 2 frames or more")
        figures["motion_ratio"] = figures["motion"] / float(np.mean(ref_motion))
        figures["sharpness_ratio"] = figures["sharpness"] / float(np.mean(ref_sharp))
        ref = torch.stack(ref_dyn)
        dist = np.full((1, n_chunks), np.nan)
        for c in range(n_chunks):
            at = [d[c] for d in dyn if c < len(d) and d[c] is not None]
            if at:
                dist[0, c] = standardized_mmd(torch.stack(at), ref, ref)
        figures["dynamics_distance"] = np.repeat(dist, len(videos), 0)
    return {"chunk": chunk, "starts": starts, "figures": figures}


def ordered(names) -> list[str]:
    """``names`` in :data:`ORDER` (others after it, sorted)."""
    return [n for n in ORDER if n in names] + sorted(n for n in names if n not in ORDER)


def to_json(report: dict) -> dict:
    """A report with its arrays as lists (NaN as None) and its summary, for ``json.dumps``."""
    def clean(a):
        return [[None if not np.isfinite(x) else round(float(x), 6) for x in row] for row in np.atleast_2d(a)]

    return {"chunk": report["chunk"], "starts": list(report["starts"]),
            "figures": {k: clean(report["figures"][k]) for k in ordered(report["figures"])},
            "summary": {k: clean(v[None])[0] for k, v in sorted(summary(report).items(),
                                                                 key=lambda kv: ordered(report["figures"]).index(kv[0]))}}


def summary(report: dict, tail: float = 0.25) -> dict[str, np.ndarray]:
    """Per video and figure: the last ``tail`` share of its chunks against its first chunk
    (``last / first``; for figures against the first chunk, ``last``). Shape ``(videos,)`` each."""
    out = {}
    for name, values in report["figures"].items():
        n = values.shape[1]
        k = max(1, int(math.ceil(n * tail)))
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a figure a video never had: NaN
            last = np.nanmean(values[:, n - k:], 1) if n > 1 else np.full(len(values), np.nan)
            out[name] = last if name in AGAINST_FIRST else last / values[:, 0]
    return out


def plot(report: dict, path: str | Path, title: str = "", floor: dict | None = None) -> Path:
    """Every figure of ``report`` (its mean over videos, with the range when there are several)
    against frame index, one panel each, to a PNG; ``floor`` (the same report of data videos)
    is drawn dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = report["figures"]
    names = [n for n in ordered(figs) if np.isfinite(figs[n]).any()]
    x = np.asarray(report["starts"]) + report["chunk"] / 2
    cols = 3
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        v = figs[name]
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(v, 0)
            lo, hi = np.nanmin(v, 0), np.nanmax(v, 0)
        ax.plot(x, mean, marker=".", label="video" if floor is None else "generated")
        if v.shape[0] > 1:
            ax.fill_between(x, lo, hi, alpha=0.2)
        if floor is not None and name in floor["figures"]:
            fv = floor["figures"][name]
            fx = np.asarray(floor["starts"]) + floor["chunk"] / 2
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                ax.plot(fx, np.nanmean(fv, 0), "--", color="gray", label="data")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("frame", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    if floor is not None and names:
        axes.flat[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


__all__ = ["AGAINST_FIRST", "ORDER", "chunk_figures", "ordered", "plot", "summary", "to_json"]
