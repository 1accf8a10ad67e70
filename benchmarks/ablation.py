"""The coherence ablation: recipes trained over several seeds, many sampled clips, bootstrap
intervals, motion and fidelity beside TVS, and control rows scored by the same code.

For every recipe and seed, `tcplug fit` trains on the built-in synthetic world with the same
budget; the final weights (the EMA weights when the recipe averages them) sample ``--clips``
clips conditioned on the first ``--clips`` validation clips. Every clip is scored with DIS
flow (the same estimator for generated and data clips) against a **reference set** of other
clips of the same world: TVS, warping error, coverage, motion ratio, sharpness ratio, frame
distance, background flicker on the static region, and the object-trajectory error.

Control rows, scored by the same code on the validation clips themselves (no learning):
``data`` (the floor), ``frozen`` (frame 0 repeated), ``blurred`` (Gaussian, 9 px),
``independent frames`` (frame t of clip i taken from clip i+t), and ``independent frames +
oracle copy`` (the same, with frame 0 copied into the data's static region).

Intervals: 95 % bootstrap over seeds and clips (hierarchical: seeds with replacement, then
clips within each). A recipe **improves** on ``baseline`` only when the interval of its TVS
difference excludes 0 (below), **and** its motion ratio stays within ``--motion-tol`` of
baseline's or of 1 (or comes closer to 1 from baseline's side), **and** its sharpness ratio
likewise within ``--sharpness-tol`` (blur lowers TVS: the blurred control scores like the
data), **and** its frame distance is at most ``--distance-tol`` times baseline's.
Recipes that read an oracle input (the data's all-frame static mask, per-frame ground-truth
maps) are marked. A strip of sample frames per recipe goes to ``--img`` (default docs/img).

Writes ``ablation.json``, ``ablation.md`` and the strips; ``--update-docs`` replaces the table
between the ablation markers of README.md and docs/benchmarks.md. Prints one JSON line.

Each finished (recipe, seed) keeps its per-clip scores in ``--out/runs/`` (keyed by the recipe's
text, the overlays, the steps and the clips), so a stopped ablation run again resumes where it
stopped; ``--fresh`` ignores them. The key does not see the code: after changing a component,
delete that recipe's files there (or use ``--fresh``). ``--keep OLD.json`` carries the rows of recipes not run now
over from an earlier ablation of the same seeds and clips (their footnote says so).

Usage:
  python benchmarks/ablation.py                          # every recipe, 3 seeds, 32 clips
  python benchmarks/ablation.py --recipes baseline full --seeds 0 1 2 --steps 1200
  python benchmarks/ablation.py --smoke                  # tiny sizes, seconds
  python benchmarks/ablation.py --out abl --recipes full --keep abl/ablation.json  # rerun one row
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["baseline", "cross_frame", "flow_warp", "perceptual_temporal", "adversarial", "two_tier", "video_ldm",
           "experts", "world_model", "captions", "motion_lock", "full"]
SMOKE = ["--config", str(ROOT / "recipes" / "presets" / "cpu-smoke.yaml")]
CONTROLS = ["data", "frozen", "blurred", "independent frames", "independent frames + oracle copy"]
METRICS = ["tvs", "warp_error", "coverage", "motion_ratio", "sharpness_ratio", "frame_distance", "bg_flicker",
           "trajectory_error"]


# ----- scoring -------------------------------------------------------------------------------
def per_clip(video: torch.Tensor, batch: dict) -> dict:
    """Per-clip values of clips ``(N, T, 3, H, W)`` in [0, 1] (DIS flow), and frame features."""
    from tcplug.metrics import estimate_flows, frame_features, gradient_energy, pair_errors
    from tcplug.metrics.fidelity import TrajectoryError
    from tcplug.metrics.temporal import Flicker

    rows: dict[str, list] = {k: [] for k in METRICS if k != "frame_distance"}  # a set-level metric
    feats = []
    for i in range(video.shape[0]):
        clip = video[i: i + 1]
        fwd, bwd = estimate_flows(clip)
        l1, l2, cov = pair_errors(clip, fwd, bwd)
        rows["tvs"].append(float(100 * np.nanmean(l1.numpy())) if not torch.isnan(l1).all() else float("nan"))
        rows["warp_error"].append(float(np.nanmean(l2.numpy())) if not torch.isnan(l2).all() else float("nan"))
        rows["coverage"].append(float(cov.mean()))
        rows["motion_ratio"].append(float(fwd.norm(dim=2).mean()))
        rows["sharpness_ratio"].append(float(gradient_energy(clip).mean()))
        feats.append(frame_features(clip[0]).numpy())
        static = batch.get("static")
        if static is not None:
            f = Flicker(region="static")
            f.update(clip, batch={"static": static[i: i + 1]})
            rows["bg_flicker"].append(float(f.compute()))
        else:
            rows["bg_flicker"].append(float("nan"))
        state = batch.get("state")
        if state is not None:
            m = TrajectoryError()
            m.update(clip, batch={"state": [state[i]]})
            rows["trajectory_error"].append(float(m.compute()))
        else:
            rows["trajectory_error"].append(float("nan"))
    return {"values": {k: np.array(v) for k, v in rows.items()}, "features": np.stack(feats)}


def aggregate(groups: list[dict], ref: dict, idx: list[np.ndarray] | None = None) -> dict:
    """Metrics of seed groups (each a :func:`per_clip` result), clips ``idx`` per group."""
    from tcplug.metrics import mmd

    idx = idx or [np.arange(len(g["features"])) for g in groups]
    vals = {k: np.concatenate([g["values"][k][i] for g, i in zip(groups, idx)]) for k in groups[0]["values"]}
    out = {}
    for k in ("tvs", "warp_error", "coverage", "bg_flicker", "trajectory_error"):
        v = vals[k][~np.isnan(vals[k])]
        out[k] = float(v.mean()) if len(v) else float("nan")
    out["motion_ratio"] = float(vals["motion_ratio"].mean() / ref["values"]["motion_ratio"].mean())
    out["sharpness_ratio"] = float(vals["sharpness_ratio"].mean() / ref["values"]["sharpness_ratio"].mean())
    feats = np.concatenate([g["features"][i].reshape(-1, g["features"].shape[-1]) for g, i in zip(groups, idx)])
    out["frame_distance"] = float(mmd(torch.from_numpy(feats), torch.from_numpy(ref["features"].reshape(
        -1, ref["features"].shape[-1]))))
    return out


def bootstrap(groups: list[dict], ref: dict, n: int, rng: np.random.Generator) -> list[dict]:
    """``n`` hierarchical resamples (seeds, then clips within each seed) of :func:`aggregate`."""
    out = []
    for _ in range(n):
        pick = rng.integers(0, len(groups), len(groups))
        gs = [groups[p] for p in pick]
        idx = [rng.integers(0, len(g["features"]), len(g["features"])) for g in gs]
        out.append(aggregate(gs, ref, idx))
    return out


def interval(values: list[float]) -> list[float]:
    v = np.array([x for x in values if not np.isnan(x)])
    if len(v) == 0:
        return [float("nan"), float("nan")]
    return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]


# ----- data, controls, training, sampling ------------------------------------------------------
def data_clips(data_cfg: dict, n: int) -> dict:
    """The first ``n`` validation clips of the recipe's data (as the module's batches carry them)."""
    from tcplug.data import VideoDataModule
    from tcplug.data.shards import collate

    dm = VideoDataModule(**{**data_cfg, "val_clips": n})
    dm.prepare_data()
    dm.setup("validate")
    return collate(list(dm._val_set())[:n])


def reference_clips(data_cfg: dict, n: int, seed: int = 777) -> torch.Tensor:
    """``n`` clips of the same world from another seed: the reference set, ``(N, T, 3, H, W)`` [0, 1]."""
    from tcplug.data.synthetic import make_clip

    frames, size = int(data_cfg.get("frames", 8)), int(data_cfg.get("size", 32))
    clips = [make_clip(seed, i, frames, size, int(data_cfg.get("num_shapes", 2)), float(data_cfg.get("gravity", 0)),
                       world=data_cfg.get("world", "simple"))["frames"] for i in range(n)]
    return torch.from_numpy(np.stack(clips)).permute(0, 1, 4, 2, 3).float() / 255


def controls(batch: dict) -> dict[str, torch.Tensor]:
    import cv2

    data = (batch["video"].float() + 1) / 2
    n, t = data.shape[:2]
    arr = data.permute(0, 1, 3, 4, 2).numpy()
    blurred = torch.from_numpy(np.stack([[cv2.GaussianBlur(f, (9, 9), 0) for f in c] for c in arr])).permute(0, 1, 4, 2, 3)
    indep = torch.stack([data[(i + torch.arange(t)) % n, torch.arange(t)] for i in range(n)])
    static = batch["static"].float()[:, None]  # (N, 1, 1, H, W)
    oracle = static * data[:, :1] + (1 - static) * indep
    return {"data": data, "frozen": data[:, :1].expand_as(data).contiguous(), "blurred": blurred,
            "independent frames": indep, "independent frames + oracle copy": oracle}


def recipe_config(recipe: str, extra: list[str], work: Path) -> dict:
    import yaml

    cmd = [sys.executable, "-m", "tcplug", "fit", "--config", str(ROOT / "recipes" / f"{recipe}.yaml"), *extra,
           "--print_config"]
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{recipe}: {proc.stderr.strip()[-500:]}")
    return yaml.safe_load(proc.stdout)


def train(recipe: str, extra: list[str], work: Path, steps: int | None, seed: int) -> tuple[Path | None, dict]:
    name = f"{recipe}-s{seed}"
    cmd = [sys.executable, "-m", "tcplug", "fit", "--config", str(ROOT / "recipes" / f"{recipe}.yaml"), *extra,
           f"--seed_everything={seed}", "--trainer.enable_progress_bar=false", "--model.num_val_samples=2",
           f"--trainer.logger.init_args.save_dir={work / 'runs'}", f"--trainer.logger.init_args.name={name}"]
    if steps:
        cmd += [f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={steps}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        return None, {"error": proc.stderr.strip().splitlines()[-1][-300:], "wall_s": round(wall, 1)}
    run = sorted((work / "runs" / name).glob("version_*"))[-1]
    ckpt = next(run.rglob("last.ckpt"))
    return ckpt, {"wall_s": round(wall, 1)}


def load(ckpt: Path):
    """The trained module of a run's checkpoint (its EMA weights when the recipe averages them)."""
    from tcplug.module import TCPlugModule

    return TCPlugModule.from_checkpoint(str(ckpt))


def sample(model, batch: dict, seed: int) -> tuple[torch.Tensor, bool]:
    """Clips ``(N, T, 3, H, W)`` in [0, 1] from ``model`` conditioned on ``batch`` (its pixels
    withheld), and whether the model reads an oracle input."""
    n, t, _, h, w = batch["video"].shape
    cond = {k: v for k, v in batch.items() if k != "video"}
    out = []
    for i in range(0, n, 8):  # a few clips at a time: bounded memory
        part = {k: (v[i: i + 8] if torch.is_tensor(v) or isinstance(v, list) else v) for k, v in cond.items()}
        m = min(8, n - i)
        out.append(model.generate(m, t, h, w, seed=seed * 1000 + i, batch=part))
    oracle = any(getattr(c, "oracle", False) for c in model.modules())
    return (torch.cat(out).float() + 1) / 2, oracle


def strip(video: torch.Tensor, path: Path, clips: int = 3) -> None:
    """Rows of clips, frames left to right, 3x nearest-neighbour upscaled PNG."""
    from PIL import Image

    v = (video[:clips].clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 1, 3, 4, 2).numpy()
    img = np.concatenate([np.concatenate(list(c), axis=1) for c in v], axis=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).resize((img.shape[1] * 3, img.shape[0] * 3), Image.NEAREST).save(path)


def run_key(recipe: str, extra: list[str], steps: int | None, clips: int) -> str:
    """What a cached (recipe, seed) result depends on: the recipe's text, overlays, steps, clips."""
    h = hashlib.sha256((ROOT / "recipes" / f"{recipe}.yaml").read_bytes())
    for a in extra:
        h.update(Path(a).read_bytes() if a.endswith(".yaml") and Path(a).is_file() else a.encode())
    h.update(f"{steps}|{clips}".encode())
    return h.hexdigest()[:16]


def load_run(path: Path, key: str) -> dict | None:
    if not path.is_file():
        return None
    z = np.load(path, allow_pickle=False)
    if str(z["key"]) != key:
        return None
    return {"values": {k[2:]: z[k] for k in z.files if k.startswith("v_")}, "features": z["features"],
            "wall_s": float(z["wall_s"]), "oracle": bool(z["oracle"])}


def save_run(path: Path, key: str, group: dict, wall: float, oracle: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, key=key, features=group["features"], wall_s=wall, oracle=oracle,
             **{f"v_{k}": v for k, v in group["values"].items()})
    tmp.replace(path)


# ----- the table -----------------------------------------------------------------------------
def near_data(value: float, base: float, tol: float) -> bool:
    """A ratio (1 = like the data) kept: within ``tol`` of baseline's or of 1, or closer to 1 than
    baseline's from the same side (a frozen clip's motion 0 is not "closer" to 1 than 2.3)."""
    return (abs(value - base) <= tol or abs(value - 1) <= tol
            or (abs(value - 1) <= abs(base - 1) and (value - 1) * (base - 1) >= 0))


def verdict(row: dict, base: dict | None, args) -> str:
    if row["kind"] == "control":
        return "control"
    if row["recipe"] == "baseline" or base is None:
        return "reference"
    lo, hi = row["tvs_diff_ci"]
    better = hi < 0
    # a baseline of independent frames "moves" far too much: coming closer to the data's motion
    # (ratio 1) is no defect, falling to the other side (a frozen clip's 0) is
    motion_ok = near_data(row["motion_ratio"], base["motion_ratio"], args.motion_tol)
    dist_ok = row["frame_distance"] <= args.distance_tol * base["frame_distance"]
    # blur lowers TVS (the blurred control scores like the data); sharpness must stay near baseline's or 1
    sharp_ok = near_data(row["sharpness_ratio"], base["sharpness_ratio"], args.sharpness_tol)
    if better and motion_ok and dist_ok and sharp_ok:
        return "improves"
    why = []
    if not better:
        why.append("TVS interval overlaps 0" if lo < 0 else "TVS worse")
    if not motion_ok:
        why.append("motion off")
    if not dist_ok:
        why.append("frames farther from data")
    if not sharp_ok:
        why.append("blurred" if row["sharpness_ratio"] < base["sharpness_ratio"] else "sharpness off")
    return "does not improve (" + ", ".join(why) + ")"


def goals(rows: list[dict]) -> list[str]:
    """The issue's goals, checked on the measured rows."""
    by = {r["recipe"]: r for r in rows if "error" not in r}
    out = []
    full, data = by.get("full"), by.get("data")
    if full and data:
        tvs_ok = full["tvs"] <= 1.5 * data["tvs"]
        motion_ok = 0.8 <= full["motion_ratio"] <= 1.25
        dist_ok = full["frame_distance"] <= 2 * data["frame_distance"]
        out.append(f"`full` TVS within 1.5x the DIS data floor: {'met' if tvs_ok else 'not met'} "
                   f"({full['tvs']:.2f} % vs 1.5 x {data['tvs']:.2f} = {1.5 * data['tvs']:.2f} %); motion ratio in "
                   f"[0.8, 1.25]: {'met' if motion_ok else 'not met'} ({full['motion_ratio']:.2f}); frame distance "
                   f"within 2x data-vs-data: {'met' if dist_ok else 'not met'} ({full['frame_distance']:.3f} vs "
                   f"2 x {data['frame_distance']:.3f})")
    recipes = [r for r in rows if r["kind"] == "recipe" and r["recipe"] != "baseline" and "error" not in r]
    if recipes and "baseline" in by:
        better = [r["recipe"] for r in recipes if r.get("verdict") == "improves"]
        out.append(f"every technique better than `baseline` under the rule: "
                   f"{'met' if len(better) == len(recipes) else 'not met'} ({len(better)} of {len(recipes)} "
                   f"improve{': ' + ', '.join(better) if better else ''})")
    return out


def fmt(v, f=".2f"):
    return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, f)


def shown_args(args: str) -> str:
    """The command line as shown under the table: without where its files went."""
    out, skip = [], False
    for a in args.split():
        if skip:
            skip = False
        elif a in ("--out", "--img"):
            skip = True
        elif a == "--keep":
            out.append("--keep EARLIER/ablation.json")
            skip = True
        elif not a.startswith(("--out=", "--img=", "--keep=")) and a != "--update-docs":
            out.append(a)
    return " ".join(out)


def markdown(rows: list[dict], meta: dict) -> str:
    head = ("| row | TVS % [95 % CI] | Δ TVS vs baseline [95 % CI] | motion ratio | sharpness ratio | frame distance | "
            "coverage | bg flicker | trajectory err px | oracle | verdict |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['recipe']} | failed: {r['error']} | | | | | | | | | |")
            continue
        ci = r.get("ci", {})
        tv = f"{fmt(r['tvs'])} [{fmt(ci.get('tvs', [None])[0])}, {fmt(ci.get('tvs', [None, None])[1])}]"
        diff = (f"{fmt(r['tvs_diff'])} [{fmt(r['tvs_diff_ci'][0])}, {fmt(r['tvs_diff_ci'][1])}]"
                if r.get("tvs_diff") is not None else "")
        name = r["recipe"] if r["kind"] == "recipe" else f"*{r['recipe']}* (control)"
        if r.get("kept_from"):
            name += f" ({r['kept_from']})"
        lines.append(f"| {name} | {tv} | {diff} | {fmt(r['motion_ratio'])} | {fmt(r['sharpness_ratio'])} | "
                     f"{fmt(r['frame_distance'], '.3f')} | {fmt(r['coverage'])} | {fmt(r['bg_flicker'], '.3f')} | "
                     f"{fmt(r['trajectory_error'], '.1f')} | {'yes' if r.get('oracle') else ''} | {r['verdict']} |")
    partial = " Partial: the run was stopped before every recipe finished." if meta.get("partial") else ""
    kept = sorted({r["kept_from"] for r in rows if r.get("kept_from")})
    if kept:
        partial += (f" Rows marked with a date ({', '.join(kept)}) were measured then (same seeds, clips and "
                    "scoring; Δ TVS against that run's baseline of the same seeds) and carried over with --keep.")
    steps = f"{meta['steps']} steps per recipe" if isinstance(meta["steps"], int) else "each recipe's own max_steps"
    wall = f"{meta['wall_min']} min in all" if not kept else \
        f"{meta['wall_min']} min for this invocation (runs it found finished under --out are not timed again)"
    foot = (f"\n_Generated by `python benchmarks/ablation.py {shown_args(meta['args'])}` on {meta['machine']}, "
            f"{meta['date']}: {steps}, seeds {meta['seeds']}, {meta['clips']} sampled clips per seed, "
            f"reference: {meta['reference']} other clips of the same world; {wall}. "
            "All rows scored with DIS flow. TVS, warping error, frame distance, trajectory error: lower is better; "
            "motion and sharpness ratios: 1 = like the reference; coverage: share of pixels the flow check kept. "
            f"\"improves\" = the Δ TVS interval is below 0, the motion ratio within ±{meta['motion_tol']} of baseline's "
            f"or of 1, or closer to 1 than baseline's from the same side, the sharpness ratio likewise "
            f"(±{meta['sharpness_tol']}), "
            f"and the frame distance ≤ {meta['distance_tol']}× baseline's. Oracle = reads an input that encodes the future "
            f"(all-frame static mask, per-frame ground-truth maps).{partial}_\n")
    checked = "".join(f"\n- {g}" for g in goals(rows))
    return head + "\n".join(lines) + "\n" + foot + ("\nGoals:" + checked + "\n" if checked else "")


def update_docs(table: str, files: list[Path], marker: str = "ablation") -> None:
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    for f in files:
        text = f.read_text()
        if start not in text or end not in text:
            raise SystemExit(f"{f}: no {start} ... {end} markers")
        head, rest = text.split(start, 1)
        f.write_text(head + start + "\n" + table + end + rest.split(end, 1)[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=None, help="default: every recipe (smoke: baseline and full)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds")
    p.add_argument("--clips", type=int, default=32, help="clips sampled per recipe and seed")
    p.add_argument("--reference", type=int, default=64, help="reference clips (another seed of the same world)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: each recipe's max_steps)")
    p.add_argument("--boot", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--motion-tol", type=float, default=0.2, help="largest |motion ratio - baseline's| to improve")
    p.add_argument("--distance-tol", type=float, default=1.25, help="largest frame distance / baseline's to improve")
    p.add_argument("--sharpness-tol", type=float, default=0.4,
                   help="largest |sharpness ratio - baseline's| (or - 1) to improve")
    p.add_argument("--config", action="append", default=[], help="extra --config overlay for every recipe")
    p.add_argument("--out", default=None, help="folder for the table and JSON (default: a temporary one)")
    p.add_argument("--img", default=str(ROOT / "docs" / "img" / "ablation"), help="folder for the sample strips")
    p.add_argument("--update-docs", action="store_true", help="write the table into README.md and docs/benchmarks.md")
    p.add_argument("--render", action="store_true", help="train nothing: rebuild the table (and with --update-docs "
                   "the docs) from --out/ablation.json")
    p.add_argument("--keep", default=None, help="an earlier ablation.json: carry over the rows of recipes not run now")
    p.add_argument("--fresh", action="store_true", help="retrain every (recipe, seed), ignoring --out/runs/")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    t_start = time.perf_counter()
    if args.render:
        saved = json.loads((Path(args.out) / "ablation.json").read_text())
        saved["meta"].setdefault("sharpness_tol", args.sharpness_tol)  # tables made before the rule had it
        finish(saved["rows"], saved["meta"], Path(args.out), args)
        return
    if args.smoke:
        args.recipes = args.recipes or ["baseline", "full"]
        args.seeds, args.clips, args.reference, args.boot = args.seeds[:2], 2, 4, 20
        args.steps = 2
    args.recipes = args.recipes or RECIPES
    extra = [a for c in args.config for a in ("--config", str(Path(c).resolve()))] + (SMOKE if args.smoke else [])
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        out = Path(args.out).resolve() if args.out else work / "out"
        out.mkdir(parents=True, exist_ok=True)
        cfg = recipe_config("baseline", extra, work)
        batch = data_clips(cfg["data"], args.clips)
        ref_video = reference_clips(cfg["data"], args.reference)
        ref = per_clip(ref_video, {})
        control_rows = []
        for cname, video in controls(batch).items():
            g = per_clip(video, batch)
            row = {"recipe": cname, "kind": "control", "oracle": cname.endswith("oracle copy"), **aggregate([g], ref)}
            boot = bootstrap([g], ref, args.boot, rng)
            row["ci"] = {k: interval([b[k] for b in boot]) for k in METRICS}
            control_rows.append(row)
            if not args.smoke:
                strip(video, Path(args.img) / f"control-{cname.replace(' + ', '-').replace(' ', '-')}.png")
        rows: list[dict] = []
        base_boot = None
        for name in args.recipes:
            groups, walls, oracle, err = [], [], False, None
            key = run_key(name, extra, args.steps, args.clips)
            for seed in args.seeds:
                cached = None if args.fresh else load_run(out / "runs" / f"{name}-s{seed}.npz", key)
                if cached is not None:
                    groups.append(cached)
                    walls.append(cached["wall_s"])
                    oracle = cached["oracle"]
                    print(f"{name} seed {seed}: from {out / 'runs'}", file=sys.stderr)
                    continue
                ckpt, info = train(name, extra, work, args.steps, seed)
                if ckpt is None:
                    err = info["error"]
                    break
                video, oracle = sample(load(ckpt), batch, seed)
                walls.append(info["wall_s"])
                groups.append(per_clip(video, batch))
                save_run(out / "runs" / f"{name}-s{seed}.npz", key, groups[-1], info["wall_s"], oracle)
                if seed == args.seeds[0] and not args.smoke:
                    strip(video, Path(args.img) / f"{name}.png")
            if err is not None:
                rows.append({"recipe": name, "kind": "recipe", "error": err})
                print(f"{name}: failed: {err}", file=sys.stderr)
                continue
            row = {"recipe": name, "kind": "recipe", "oracle": oracle, "train_wall_s": walls, **aggregate(groups, ref)}
            boot = bootstrap(groups, ref, args.boot, rng)
            row["ci"] = {k: interval([b[k] for b in boot]) for k in METRICS}
            if name == "baseline":
                base_boot = boot
            if base_boot is not None:
                rows_base = next(r for r in rows + [row] if r["recipe"] == "baseline")
                row["tvs_diff"] = row["tvs"] - rows_base["tvs"] if name != "baseline" else None
                if name != "baseline":
                    row["tvs_diff_ci"] = interval([b["tvs"] - bb["tvs"] for b, bb in zip(boot, base_boot)])
            rows.append(row)
            print(f"{name}: {json.dumps({k: v for k, v in row.items() if k != 'ci'})}", file=sys.stderr)
            shown = merge_kept(rows, json.loads(Path(args.keep).read_text()), args) if args.keep else rows
            partial = {"meta": {**meta_of(args, t_start), "partial": True}, "rows": shown + control_rows}
            (out / "ablation.json").write_text(json.dumps(partial, indent=1))  # --render shows what finished
        if args.keep:
            rows = merge_kept(rows, json.loads(Path(args.keep).read_text()), args)
        rows += control_rows
        finish(rows, meta_of(args, t_start), out, args)


def merge_kept(rows: list[dict], old: dict, args) -> list[dict]:
    """``rows`` plus the recipe rows of an earlier ablation for recipes not run now, in RECIPES order."""
    om = old["meta"]
    if om["seeds"] != args.seeds or om["clips"] != args.clips or om["reference"] != args.reference:
        raise SystemExit(f"--keep {args.keep}: seeds/clips/reference differ from this run's")
    have = {r["recipe"] for r in rows}
    kept = [{**r, "kept_from": r.get("kept_from", om["date"])} for r in old["rows"]  # keep the first date
            if r["kind"] == "recipe" and r["recipe"] not in have and "error" not in r]
    order = {n: i for i, n in enumerate(RECIPES)}
    return sorted(rows + kept, key=lambda r: order.get(r["recipe"], len(order)))


def meta_of(args, t_start: float) -> dict:
    return {"machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores",
            "date": datetime.date.today().isoformat(), "steps": args.steps or "each recipe's", "seeds": args.seeds,
            "clips": args.clips, "reference": args.reference, "motion_tol": args.motion_tol,
            "distance_tol": args.distance_tol, "sharpness_tol": args.sharpness_tol,
            "wall_min": round((time.perf_counter() - t_start) / 60, 1),
            "args": " ".join(a for a in sys.argv[1:] if a != "--update-docs")}


def finish(rows: list[dict], meta: dict, out: Path, args) -> None:
    base = next((r for r in rows if r["recipe"] == "baseline" and "error" not in r), None)
    for r in rows:
        if "error" not in r:
            r["verdict"] = verdict(r, base, argparse.Namespace(
                motion_tol=meta["motion_tol"], distance_tol=meta["distance_tol"], sharpness_tol=meta["sharpness_tol"]))
    table = markdown(rows, meta)
    (out / "ablation.md").write_text(table)
    (out / "ablation.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if args.update_docs:
        update_docs(table, [ROOT / "docs" / "benchmarks.md", ROOT / "README.md"])
    print(json.dumps({"bench": "ablation", **meta, "out": str(out) if args.out else None,
                      "rows": [{k: v for k, v in r.items() if k not in ("ci",)} for r in rows]}))


if __name__ == "__main__":
    main()
