"""Drift of long videos: one checkpoint streamed several ways, measured per chunk to 64x its clip length.

For each streaming mode and sampling seed, streams ``--videos`` videos of ``--frames`` frames
(default 512 = 64 x the 8-frame training clip = 32 s at 16 fps), each conditioned on the initial
state and caption of a held-out clip of the synthetic world (seed 4242: no clip the model trained or
validated on), and measures them chunk by chunk (:mod:`tcplug.metrics.drift`) against 64 short
held-out clips of the world (the reference for the ratios and the dynamics distance), with the truth
simulated as long as the video (trajectory error, each object's size). **The data floor** is that
simulated truth, measured the same way. Modes:

- ``same_step``: today's streaming (earlier frames at the same sampler step: streamed = all at once);
- ``clean``: clean-context autoregression (a K/V cache of the finished frames);
- ``clean_noisy``: the same with the finished frames committed at timestep ``--context-noise``
  (noise-augmented context);
- ``keyframes`` (asked for with ``--modes``): not streamed: keyframes every ``--stride`` latent
  frames sampled together first, then the in-betweens between clean keyframes
  (:func:`tcplug.diffusion.keyframes.keyframes_first`; its memory grows with the video);
- ``--versus LABEL=CKPT``: another checkpoint (another recipe: a component that needs training,
  such as compressed history) streamed in the first of ``--modes``, a row ``LABEL`` paired against
  ``same_step`` on the same states, captions, seeds and noise (two trainings: paired over videos and
  noise, not over training seeds).

Reported per mode, at 1x, 4x, 16x and 64x the clip length (the chunk at frame 0, 3c, 15c, 63c): each
figure's mean over videos and seeds with a bootstrap interval; per video the drift summary (the last
quarter of the chunks against the first); paired differences against ``same_step`` (same states,
captions, seeds and noise); frames per second; and peak memory of one video at each length.
Writes ``drift.json``, ``drift.md``, a plot ``drift.png`` and strips of the first and last frames.

Each (mode, seed) is an independent job (``--executor``: here, submitit's local executor or SLURM,
:mod:`_sweep`); its videos land in ``OUT/runs`` and are gathered and resumed the same way whatever
ran them.

Usage:
  python benchmarks/drift.py --ckpt runs/full/version_0/checkpoints/last.ckpt --out drift_out
  python benchmarks/drift.py --ckpt CKPT --out drift_out --executor slurm --slurm slurm_partition=gpu timeout_min=120
  python benchmarks/drift.py --ckpt CKPT --out drift_out --modes same_step --versus history=OTHER_CKPT
  python benchmarks/drift.py --smoke      # random weights, tiny; no claims
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
import _sweep  # noqa: E402
from _mem import peak_mib  # noqa: E402
from _models import load_model  # noqa: E402

MODES = {"same_step": ("same_step", 0.0), "clean": ("clean", 0.0), "clean_noisy": ("clean", None),
         "keyframes": ("keyframes", 0.0)}
STREAMED = ["same_step", "clean", "clean_noisy"]  # the default --modes
#: figures compared between modes, per video (the summary), and what "better" means
PAIRED = {"motion_ratio": "closer to the data's", "trajectory_error": "lower", "object_size_true": "closer to 1",
          "background_colour": "lower", "dynamics_distance": "lower"}


def world(n: int, frames: int, size: int, data_cfg: dict, seed: int = 4242) -> list[dict]:
    from tcplug.data.synthetic import make_clip

    return [make_clip(seed, i, frames, size, int(data_cfg.get("num_shapes", 2)), float(data_cfg.get("gravity", 0)),
                      world=data_cfg.get("world", "simple")) for i in range(n)]


def to_u8(video: torch.Tensor) -> np.ndarray:
    """``(T, 3, H, W)`` in [-1, 1] -> ``(T, H, W, 3)`` uint8."""
    return ((video.permute(0, 2, 3, 1).float().numpy() + 1) * 127.5 + 0.5).clip(0, 255).astype(np.uint8)


def stream_videos(model, frames: int, size: int, chunk: int, batch: dict, seed: int, steps, mode, noise,
                  stride: int = 4):
    """``(videos uint8 list, seconds)`` of one streamed batch (``keyframes``: sampled keyframes
    first at ``stride`` latent frames, then the in-betweens, :func:`tcplug.diffusion.keyframes_first`)."""
    ctx, t_ctx = MODES[mode]
    t_ctx = noise if t_ctx is None else t_ctx
    n = len(batch["state"])
    t0 = time.perf_counter()
    if ctx == "keyframes":
        from tcplug.diffusion.keyframes import keyframes_first

        video = keyframes_first(model.diffusion, n, frames, size, size, stride, steps or model.sample_steps, seed=seed,
                                batch=batch)[0]
    else:
        video = torch.cat(list(model.stream(frames, size, size, chunk, steps=steps, seed=seed, num=n, batch=batch,
                                            context=ctx, context_timestep=t_ctx)), 1)
    wall = time.perf_counter() - t0
    return [to_u8(v) for v in video], wall


def stream_job(ckpt: str | None, smoke: bool, mode: str, seed: int, frames: int, batch: dict, steps, noise,
               path: Path, stride: int = 4) -> str:
    """One (mode, seed): load the model, stream the batch's videos, keep them at ``path`` (written
    whole or not at all). What every executor runs (``_sweep.run_jobs``). A ``--versus`` row's mode
    is ``LABEL:MODE`` (its own checkpoint, streamed in ``MODE``)."""
    model, chunk, size = load_model(ckpt, smoke)
    v, wall = stream_videos(model, frames, size, chunk, batch, seed, steps, mode.split(":")[-1], noise, stride)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, videos=np.stack(v), wall=wall)
    tmp.replace(path)
    return f"{mode} seed {seed}: streamed in {wall:.1f} s"


def finite(obj):
    """``obj`` with every NaN/inf float as None (strict JSON)."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def mean_ci(values: np.ndarray, rng, boot: int = 1000) -> tuple[float, list[float]]:
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), [float("nan"), float("nan")]
    means = [float(np.mean(rng.choice(v, v.size))) for _ in range(boot)]
    return float(v.mean()), [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def strip(videos: list[np.ndarray], frames: list[int], path: Path, clips: int = 3) -> None:
    from PIL import Image

    rows = [np.concatenate([v[f] for f in frames], 1) for v in videos[:clips]]
    img = np.concatenate(rows, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).resize((img.shape[1] * 3, img.shape[0] * 3), Image.NEAREST).save(path)


SHOWN = ("dynamics_distance", "motion_ratio", "sharpness_ratio", "tvs", "trajectory_error", "object_size_true",
         "background_colour", "object_colour")


def _f(v, ci=None) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    text = f"{v:.3g}"
    if ci and ci[0] is not None and np.isfinite(ci[0]):
        text += f" [{ci[0]:.3g}, {ci[1]:.3g}]"
    return text


def markdown(result: dict) -> str:
    """The tables of docs/benchmarks.md from a result (``drift.json``)."""
    at = result["at"]
    lengths = list(next(iter(at["data"].values())))
    lines = [f"{result['frames']} frames ({result['frames'] // result['chunk']}x the {result['chunk']}-frame clip), "
             f"{result['videos']} videos x {len(result['seeds'])} sampling seeds per mode, {result['steps']} sampler "
             f"steps; data = the world simulated as long as the video, measured the same way. Mean [95 % bootstrap "
             "interval] over videos and seeds (the dynamics distance is one figure per seed: the set of chunks).", "",
             "| mode | figure | " + " | ".join(lengths) + " |", "|---|---|" + "---|" * len(lengths)]
    for mode in at:
        for name in SHOWN:
            if name in at[mode]:
                cells = [_f(*at[mode][name][k]) for k in lengths]
                lines.append(f"| {mode} | {name} | " + " | ".join(cells) + " |")
    lines += ["", "Drift summary per video (the last quarter of the chunks against the first: a ratio for "
              "distances and ratios, the value itself for figures measured against the first chunk):", "",
              "| mode | " + " | ".join(SHOWN) + " |", "|---|" + "---|" * len(SHOWN)]
    for mode, figs in result["summary"].items():
        lines.append(f"| {mode} | " + " | ".join(_f(*figs[n]) if n in figs else "–" for n in SHOWN) + " |")
    if result.get("paired_vs_same_step"):
        lines += ["", "Paired against `same_step` (same states, captions, seeds and noise), per video: the "
                  "summary's distance from the data's (motion ratio), from 1 (object size) or the value (the "
                  "others), this mode minus same_step: below 0 = flatter:", "",
                  "| mode | " + " | ".join(PAIRED) + " |", "|---|" + "---|" * len(PAIRED)]
        for mode, figs in result["paired_vs_same_step"].items():
            lines.append(f"| {mode} | " + " | ".join(_f(*figs[n]) if n in figs else "–" for n in PAIRED) + " |")
    lines += ["", "Frames per second (all videos of a batch): " + ", ".join(f"{m} {v}" for m, v in result["fps"].items())
              + f". Peak memory of one video (MiB, torch's allocations, {result.get('memory_steps')} sampler steps): "
              + "; ".join(f"{m}: " + ", ".join(f"{k} {v}" for k, v in d.items()) + f" (ratio {result['memory_ratio'][m]})"
                          for m, d in result["peak_mib"].items()) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    from tcplug.metrics import drift

    p = argparse.ArgumentParser()
    p.add_argument("--ckpt")
    p.add_argument("--out", default=None)
    p.add_argument("--frames", type=int, default=None, help="video length (default 64x the clip length)")
    p.add_argument("--videos", type=int, default=16)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--modes", default=",".join(STREAMED),
                   help=f"of {', '.join(MODES)} (keyframes: keyframes first, then in-betweens; not streamed)")
    p.add_argument("--stride", type=int, default=4, help="keyframes' stride in latent frames")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--context-noise", type=float, default=50.0, help="clean_noisy's commit timestep")
    p.add_argument("--memory-lengths", default="1,64", help="multiples of the clip length for peak memory")
    p.add_argument("--memory-steps", type=int, default=2,
                   help="sampler steps of the memory runs (the CPU profiler's events grow with every op: a 64x run "
                   "at 10+ steps does not fit in 24 GB; the ratio is what the runs compare)")
    p.add_argument("--executor", choices=_sweep.EXECUTORS, default="local",
                   help="where the (mode, seed) streams run: here, submitit's local executor, or SLURM (submitit)")
    p.add_argument("--slurm", nargs="*", default=[], metavar="KEY=VALUE",
                   help="submitit's SLURM parameters, e.g. slurm_partition=gpu gpus_per_node=1 timeout_min=120")
    p.add_argument("--versus", nargs="*", default=[], metavar="LABEL=CKPT",
                   help="other checkpoints (e.g. another recipe) streamed in the first of --modes on the same "
                   "states, captions, seeds and noise, as rows LABEL, paired against same_step (LABEL= without a "
                   "path: --ckpt again, a check of the pairing: its differences are 0)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--render", default=None, metavar="DRIFT_JSON", help="print the markdown tables of a result")
    args = p.parse_args()
    if args.render:
        print(markdown(json.loads(Path(args.render).read_text())))
        return
    if args.smoke:
        args.videos, args.seeds, args.steps, args.memory_lengths = 2, "0", 2, "1,4"
    if not args.ckpt and not args.smoke:
        p.error("--ckpt is required (or --smoke)")
    model, chunk, size = load_model(args.ckpt, args.smoke)
    data_cfg = model.recipe.get("data", {}) if args.ckpt else {}
    frames = args.frames or chunk * (8 if args.smoke else 64)
    seeds = [int(s) for s in args.seeds.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    versus = dict(kv.split("=", 1) for kv in args.versus)
    if any(not label or ":" in label or label in MODES or label == "data" for label in versus):
        p.error("--versus takes LABEL=CKPT, LABEL not a mode name and without ':'")
    ckpts = {m: args.ckpt for m in modes} | {label: ckpt_b or args.ckpt for label, ckpt_b in versus.items()}
    job_mode = {m: m for m in modes} | {label: f"{label}:{modes[0]}" for label in versus}
    modes += list(versus)
    out = Path(args.out) if args.out else None
    clips = world(args.videos, frames, size, data_cfg)
    batch = {"state": [c["state"] for c in clips], "txt": [c["txt"] for c in clips]}
    states = [c["state"] for c in clips]
    reference = [c["frames"] for c in world(8 if args.smoke else 64, chunk, size, data_cfg, seed=4343)]
    floor = drift.chunk_figures([c["frames"] for c in clips], chunk, reference, states)
    rng = np.random.default_rng(0)
    tmp = tempfile.TemporaryDirectory()
    runs = (out if out is not None else Path(tmp.name)) / "runs"
    ckpts = {m: str(Path(c).resolve()) if c else None for m, c in ckpts.items()}
    # ---- stream what is missing: one job per (mode, seed), through --executor; resumable: a
    # finished (mode, seed) is kept (its videos do not depend on where it ran)
    jobs = [(stream_job, (ckpts[mode], args.smoke, job_mode[mode], seed, frames, batch, args.steps, args.context_noise,
                          runs / f"{mode}-s{seed}.npz", args.stride))
            for mode in modes for seed in seeds if not (runs / f"{mode}-s{seed}.npz").is_file()]
    for line in _sweep.run_jobs(jobs, args.executor, runs.parent / "sweep",
                                slurm=dict(kv.split("=", 1) for kv in args.slurm)):
        print(line, file=sys.stderr)
    reports, fps, per_video = {}, {}, {}
    for mode in modes:
        vids, walls = [], []
        mode_reports = []
        for seed in seeds:
            z = np.load(runs / f"{mode}-s{seed}.npz")
            v, wall = list(z["videos"]), float(z["wall"])
            walls.append(wall)
            mode_reports.append(drift.chunk_figures(v, chunk, reference, states))
            if seed == seeds[0]:
                vids = v
        fps[mode] = round(len(seeds) * len(batch["state"]) * frames / sum(walls), 1)
        reports[mode] = {"chunk": chunk, "starts": mode_reports[0]["starts"],
                         "figures": {k: np.concatenate([r["figures"][k] for r in mode_reports])
                                     for k in mode_reports[0]["figures"]}}
        per_video[mode] = drift.summary(reports[mode])
        if out is not None:
            strip(vids, list(range(chunk)), out / "img" / f"drift-{mode}-first.png")
            strip(vids, list(range(frames - chunk, frames)), out / "img" / f"drift-{mode}-last.png")
    if out is not None:
        strip([c["frames"] for c in clips], list(range(frames - chunk, frames)), out / "img" / "drift-data-last.png")
    at = {f"{m}x": m - 1 for m in (1, 4, 16, 64) if (m - 1) < len(floor["starts"])}
    table = {}
    for mode in ["data", *modes]:
        rep = floor if mode == "data" else reports[mode]
        table[mode] = {name: {k: mean_ci(rep["figures"][name][:, c], rng) for k, c in at.items()}
                       for name in drift.ordered(rep["figures"])}
    floor_summary = drift.summary(floor)
    paired = {}
    base = per_video.get("same_step")
    for mode in modes:
        if mode == "same_step" or base is None:
            continue
        paired[mode] = {}
        for name, better in PAIRED.items():
            a, b = per_video[mode].get(name), base.get(name)
            if a is None or b is None:
                continue
            if better == "closer to the data's":
                target = np.nanmean(floor_summary[name])
                a, b = np.abs(np.log(a / target)), np.abs(np.log(b / target))
            elif better == "closer to 1":
                a, b = np.abs(np.log(a)), np.abs(np.log(b))
            paired[mode][name] = mean_ci(a - b, rng)  # below 0: flatter than same_step
    memory = {}
    one = {"state": batch["state"][:1], "txt": batch["txt"][:1]}
    for mult in [int(x) for x in args.memory_lengths.split(",")]:
        for mode in ("same_step", "clean"):
            def run(mult=mult, mode=mode):
                for _ in model.stream(chunk * mult, size, size, chunk, steps=args.memory_steps, seed=0, num=1, batch=one,
                                      context=MODES[mode][0]):
                    pass
            memory.setdefault(mode, {})[f"{mult}x"] = peak_mib(run)
    result = {"bench": "drift", "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores",
              "date": datetime.date.today().isoformat(), "ckpt": bool(args.ckpt), "frames": frames, "chunk": chunk,
              "videos": len(batch["state"]), "seeds": seeds, "steps": args.steps or model.sample_steps,
              "memory_steps": args.memory_steps,
              "context_noise": args.context_noise, "fps": fps, "peak_mib": memory,
              "memory_ratio": {m: round(v[max(v, key=lambda k: int(k[:-1]))] / v["1x"], 3) for m, v in memory.items()},
              "at": table, "summary": {m: {k: mean_ci(v, rng) for k, v in s.items()} for m, s in
                                       {"data": floor_summary, **per_video}.items()},
              "paired_vs_same_step": paired,
              "per_video": {m: {k: [float(x) for x in v] for k, v in s.items()} for m, s in per_video.items()}}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "drift.json").write_text(json.dumps(finite(result), indent=1))
        (out / "drift.md").write_text(markdown(finite(result)))
        drift.plot(reports[modes[0]], out / "drift.png", f"{modes[0]}: {frames} frames, per chunk of {chunk}",
                   floor=floor)
        for mode in modes[1:]:
            drift.plot(reports[mode], out / f"drift-{mode}.png", f"{mode}: {frames} frames, per chunk of {chunk}",
                       floor=floor)
    print(json.dumps(finite({k: v for k, v in result.items() if k not in ("at", "per_video")})))
    tmp.cleanup()


if __name__ == "__main__":
    main()
