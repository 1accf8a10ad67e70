"""The coherence ablation, both ways: plus-one (base + X) and leave-one-out (full - X) for every
technique, paired intervals, the fidelity gate, and labels that say what each row knows.

Rows. **Plus-one**: ``baseline`` (base alone) and every technique recipe (base + X, configured as
in ``full``: ``recipes/X.yaml``). **Leave-one-out**: ``full`` and, for every technique in it,
``full - X``, composed by ``benchmarks/_recipes.py`` from the resolved ``full`` and base (with its
couplings: without the world model the lock reads the sample's first pass; the discriminator stays
while the perceptual or adversarial term is there); for the latent designs, which ``full`` does not
hold, ``full + X``. Every row trains with the same budget (base's) on the built-in synthetic
world, for each seed; its final EMA weights sample ``--clips`` clips conditioned on the first
``--clips`` validation clips, with the same noise seeds in every row.

Scoring (the same code for every row and control): DIS flow; TVS, warping error, coverage,
background flicker, motion on the static and on the moving region (the synthetic world's objects
are its palette colours: a pixel that takes an object colour in some frame is moving region), and
the **fidelity gate** (``tcplug.metrics.gate``) against the validation clips themselves as held-out
data (the floor), ``--reference`` clips of another seed as the reference, and ``--train`` training
clips for memorisation; conditioned rows are also judged on adherence (trajectory error against the
conditioning clip's state, caption colours found).

Intervals: 95 % bootstrap over seeds and clips (seeds with replacement, then clips within each).
Δ TVS is **paired**: both rows share training seeds, conditioning clips and noise seeds, so each
resample draws the same seeds and clips for both. Plus-one: Δ = (base + X) - base. Leave-one-out:
Δ = full - (full - X) (the technique's share in full; below 0 = it helps). A technique **improves**
in a direction only when its Δ interval is below 0 **and** the row with it passes the gate (which
includes adherence for conditioned rows).

Labels (what a row's components read at sampling, from their ``needs`` and ``oracle``): reads the
future (oracle) · exact simulator state (privileged) · caption · first-frame pixels (or the first n
frames' pixels: a continuation) · nothing.

Controls, scored by the same code (no learning): the validation clips themselves (data: the floor),
held-out data (clips of another seed that no row saw: they must pass), and fakes made from the
validation clips: frozen, frozen from half-way (freezes_late), gray, blurred, shuffled frames, independent frames, a still frame under a
slow pan, a jittering still frame, replayed training clips.

Each finished (row, seed) keeps its sampled clips in ``--out/runs/`` under a key of the row's
resolved config, the steps and clips **and the source code** it runs (every ``.py`` of ``tcplug/``
and of the built-in plugin packages its config names), so a stopped ablation resumes where it
stopped and a code change retrains;
``--fresh`` ignores them. Writes ``ablation.json``, ``ablation.md`` and a strip of sample frames per
row (``--img``); ``--update-docs`` replaces the tables between the ablation markers of README.md and
docs/benchmarks.md. Prints one JSON line.

Usage:
  python benchmarks/ablation.py --out abl                         # everything, 3 seeds, 32 clips
  python benchmarks/ablation.py --out abl --rows baseline full     # some rows (resumable)
  python benchmarks/ablation.py --out abl --render --update-docs   # tables from what finished
  python benchmarks/ablation.py --smoke                           # tiny sizes, seconds
  python benchmarks/ablation.py --out abl --executor slurm        # each (row, seed) a SLURM job (submitit)
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _recipes  # noqa: E402
import _sweep  # noqa: E402

ROOT = _recipes.ROOT
SMOKE = ROOT / "recipes" / "presets" / "cpu-smoke.yaml"
PLUS = ["baseline", *_recipes.TECHNIQUES]
LOO = ["full", *[f"full - {t}" for t in _recipes.IN_FULL], *[f"full + {t}" for t in _recipes.LATENT_DESIGNS]]
PER_CLIP = ["tvs", "warp_error", "coverage", "bg_flicker", "motion_static", "motion_moving"]


# ----- rows ----------------------------------------------------------------------------------
def technique_of(row: str) -> str | None:
    """``cross_frame`` for ``cross_frame``, ``full - cross_frame`` and ``full + two_tier`` alike."""
    if row in ("baseline", "full"):
        return None
    return row.split(" ", 2)[-1] if row.startswith("full ") else row


def row_config(row: str, work: Path, extra: list[Path], resolved: dict) -> Path:
    """The recipe file a row trains: a shipped recipe, or full -/+ X composed from the resolved
    base and full (with the overlays ``extra`` already applied)."""
    if not row.startswith("full "):
        return ROOT / "recipes" / f"{row}.yaml"
    tech = technique_of(row)
    techs = [t for t in _recipes.IN_FULL if t != tech] if " - " in row else [*_recipes.IN_FULL, tech]
    full = resolved["full"]
    if " + " in row:  # a latent design on top of full: full's settings with X's owned ones
        full = _recipes.unflatten({**_recipes.flatten(resolved["full"]),
                                   **{k: v for k, v in _recipes.flatten(resolved[tech]).items()
                                      if k in _recipes.TECHNIQUES[tech]}})
    cfg = _recipes.compose(resolved["baseline"], full, techs)
    return _recipes.write(cfg, work / "configs" / f"{row.replace(' ', '')}.yaml", row.replace(" ", ""))


def code_hash(packages: list[str] | None = None) -> str:
    """Every ``.py`` of the engine and of the built-in plugin ``packages`` (default: all of them):
    a change retrains."""
    folders = [ROOT / "tcplug"] + ([ROOT / "plugins" / p for p in packages] if packages is not None
                                   else [ROOT / "plugins"])
    h = hashlib.sha256()
    for p in sorted(f for d in folders if d.is_dir() for f in d.rglob("*.py")):
        h.update(str(p.relative_to(ROOT)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def packages_of(cfg) -> list[str]:
    """The built-in plugin packages a resolved config names (``class_path: tcplug_losses.Denoise``)."""
    found: set[str] = set()

    def walk(x):
        if isinstance(x, dict):
            cp = x.get("class_path")
            if isinstance(cp, str) and (ROOT / "plugins" / cp.split(".")[0]).is_dir():
                found.add(cp.split(".")[0])
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(cfg)
    return sorted(found)


def run_key(config: Path, extra: list[Path], steps: int | None, clips: int, code: str | None = None) -> str:
    """What a cached (row, seed) depends on: the row's resolved config, steps, clips, and the code
    it runs (the engine and the plugin packages its config names; ``code`` overrides)."""
    text = _recipes.resolve(config, *extra)
    text.pop("config", None)
    text["trainer"]["logger"]["init_args"]["name"] = None
    code = code if code is not None else code_hash(packages_of(text))
    h = hashlib.sha256(json.dumps(text, sort_keys=True, default=str).encode())
    h.update(f"{steps}|{clips}|{code}".encode())
    return h.hexdigest()[:16]


def train(name: str, config: Path, extra: list[Path], work: Path, steps: int | None, seed: int,
          in_process: bool = False):
    """``tcplug fit`` of one row and seed (``in_process``: in this process, for smoke runs); the
    last checkpoint, or None and the error."""
    import _inproc

    run = f"{name.replace(' ', '')}-s{seed}"
    cmd = ["fit", "--config", str(config), *[a for e in extra for a in ("--config", str(e))],
           f"--seed_everything={seed}", "--trainer.enable_progress_bar=false", "--model.num_val_samples=2",
           f"--trainer.logger.init_args.save_dir={work / 'runs'}", f"--trainer.logger.init_args.name={run}"]
    if steps:
        cmd += [f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={steps}"]
    t0 = time.perf_counter()
    proc = _inproc.tcplug(cmd, work, in_process)
    wall = time.perf_counter() - t0
    if proc.returncode:
        return None, {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][-300:], "wall_s": round(wall, 1)}
    folder = sorted((work / "runs" / run).glob("version_*"))[-1]
    return next(folder.rglob("last.ckpt")), {"wall_s": round(wall, 1)}


def row_job(name: str, config: Path, extra: list[Path], work: Path, steps: int | None, seed: int, batch: dict,
            key: str, path: Path, shown: str) -> str:
    """One (row, seed): train it, sample its clips, keep them at ``path`` (or the error beside
    it). What every executor runs (``_sweep.run_jobs``); returns what it did."""
    if (path.parent / f"{name.replace(' ', '')}.error").is_file():
        return f"{name} seed {seed}: skipped (the row failed)"
    ckpt, info = train(name, config, extra, work, steps, seed)
    if ckpt is None:
        (path.parent / f"{name.replace(' ', '')}.error").write_text(info["error"])
        print(f"{name}: failed: {info['error']}", file=sys.stderr)
        return f"{name}: failed"
    from tcplug.module import TCPlugModule

    model = TCPlugModule.from_checkpoint(str(ckpt))
    video = sample(model, batch, seed)
    tmp_path = path.with_suffix(".tmp.npz")
    np.savez(tmp_path, key=key, video=(video * 255 + 0.5).to(torch.uint8).numpy(), commit=commit(), args=shown,
             wall_s=info["wall_s"], knows=json.dumps(knows(model)), state_error=state_error(model, batch),
             state_report=json.dumps(state_report(model, batch)))
    tmp_path.replace(path)
    print(f"{name} seed {seed}: trained in {info['wall_s']} s", file=sys.stderr)
    return f"{name} seed {seed}: trained"


def knows(model) -> list[str]:
    """What a trained module's components read at sampling, as labels (see the module docstring)."""
    labels = []
    mods = list(model.modules())
    if any(getattr(m, "oracle", False) for m in mods):
        labels.append("oracle")
    needs = {k for m in mods for n in getattr(m, "needs", ()) or () for k in str(n).split("|")}
    if "state" in needs or "depth" in needs and "oracle" not in labels:
        labels.append("privileged")
    if needs & {"txt", "text_emb"}:
        labels.append("caption")
    if "first_frames" in needs:  # an image-to-video row, or a continuation of the first n frames
        seen = max((int(getattr(m, "frames_seen", 1)) for m in mods if "first_frames" in (getattr(m, "needs", ()) or ())),
                   default=1)
        labels.append("first-frame pixels" if seen == 1 else f"first {seen} frames' pixels")
    return labels or ["nothing"]


def state_error(model, batch: dict) -> float:
    """Pixels between the true first-frame object positions and a state estimator's (a world
    model that reads pixels, ``estimate_error``); NaN for rows without one."""
    errs = [float(m.estimate_error(batch)) for m in model.modules() if hasattr(m, "estimate_error")]
    return errs[0] if errs else float("nan")


def state_report(model, batch: dict) -> dict:
    """Every part of a state estimator's estimate against the truth (``estimate_report``: position,
    velocity, size, depth, colour, class, presence); empty for rows without one."""
    reports = [m.estimate_report(batch) for m in model.modules() if hasattr(m, "estimate_report")]
    return reports[0] if reports else {}


def sample(model, batch: dict, seed: int) -> torch.Tensor:
    """Clips ``(N, T, 3, H, W)`` in [0, 1] conditioned on ``batch`` (its pixels withheld); noise
    seeds ``seed * 1000 + i``: the same in every row."""
    n, t, _, h, w = batch["video"].shape
    cond = {k: v for k, v in batch.items() if k != "video"}
    cond["first_frames"] = batch["video"][:, :2]  # what an image-to-video row may read (others ignore it)
    out = []
    for i in range(0, n, 8):
        part = {k: (v[i: i + 8] if torch.is_tensor(v) or isinstance(v, list) else v) for k, v in cond.items()}
        out.append(model.generate(min(8, n - i), t, h, w, seed=seed * 1000 + i, batch=part))
    return ((torch.cat(out).float() + 1) / 2).clamp(0, 1)


# ----- data and controls -----------------------------------------------------------------------
def world_clips(data_cfg: dict, seed: int, n: int, start: int = 0) -> tuple[torch.Tensor, list]:
    """Clips ``(n, T, 3, H, W)`` in [0, 1] and states of the recipe's synthetic world."""
    from tcplug.data.synthetic import make_clip

    cs = [make_clip(seed, start + i, int(data_cfg.get("frames", 8)), int(data_cfg.get("size", 32)),
                    int(data_cfg.get("num_shapes", 2)), float(data_cfg.get("gravity", 0)),
                    world=data_cfg.get("world", "simple")) for i in range(n)]
    video = torch.from_numpy(np.stack([c["frames"] for c in cs])).permute(0, 1, 4, 2, 3).float() / 255
    return video, [c["state"] for c in cs]


def data_clips(data_cfg: dict, n: int) -> dict:
    """The first ``n`` validation clips of the recipe's data (as the module's batches carry them)."""
    from tcplug.data import VideoDataModule
    from tcplug.data.shards import collate

    dm = VideoDataModule(**{**data_cfg, "val_clips": n})
    dm.prepare_data()
    dm.setup("validate")
    return collate(list(dm._val_set())[:n])


def controls(data: torch.Tensor, train: torch.Tensor) -> dict[str, torch.Tensor]:
    from tcplug.metrics import controls as c

    return {"data": data, **{name: make(data) for name, make in c.CONTROLS.items()}, "replayed train": train[: len(data)]}


# ----- scoring -------------------------------------------------------------------------------
def object_region(video: torch.Tensor, tol: float = 40.0) -> torch.Tensor:
    """``(N, 1, H, W)``: pixels that take one of the synthetic world's object colours in some frame."""
    from tcplug.data.synthetic import COLOURS

    px = video.float() * 255  # (N, T, 3, H, W)
    hit = torch.zeros(video.shape[0], *video.shape[-2:], dtype=torch.bool)
    for rgb in COLOURS.values():
        d = ((px - torch.tensor(rgb, dtype=px.dtype).view(1, 1, 3, 1, 1)) ** 2).sum(2).sqrt()
        hit |= (d < tol).any(1)
    return hit[:, None].float()


def per_clip(video: torch.Tensor, batch: dict) -> dict[str, np.ndarray]:
    """Per-clip values ``{name: (N,)}`` of clips ``(N, T, 3, H, W)`` in [0, 1] (DIS flow)."""
    from tcplug.metrics import estimate_flows, pair_errors
    from tcplug.metrics.temporal import Flicker

    rows: dict[str, list] = {k: [] for k in PER_CLIP}
    moving = object_region(video)
    for i in range(video.shape[0]):
        clip = video[i: i + 1]
        fwd, bwd = estimate_flows(clip)
        l1, l2, cov = pair_errors(clip, fwd, bwd)
        rows["tvs"].append(float(100 * np.nanmean(l1.numpy())) if not torch.isnan(l1).all() else float("nan"))
        rows["warp_error"].append(float(np.nanmean(l2.numpy())) if not torch.isnan(l2).all() else float("nan"))
        rows["coverage"].append(float(cov.mean()))
        mag = fwd.norm(dim=2)[0]  # (T-1, H, W)
        m = moving[i, 0].bool()
        rows["motion_static"].append(float(mag[:, ~m].mean()) if (~m).any() else float("nan"))
        rows["motion_moving"].append(float(mag[:, m].mean()) if m.any() else float("nan"))
        static = batch.get("static")
        if static is not None:
            f = Flicker(region="static")
            f.update(clip, batch={"static": static[i: i + 1]})
            rows["bg_flicker"].append(float(f.compute()))
        else:
            rows["bg_flicker"].append(float("nan"))
    return {k: np.array(v) for k, v in rows.items()}


def mean_ci(groups: list[np.ndarray], boot: int, rng) -> tuple[float, list[float]]:
    """Mean over seeds and clips of per-(seed, clip) values ``[(N,)] * S`` and its hierarchical
    bootstrap interval (seeds with replacement, then clips within each)."""
    arr = np.stack(groups)  # (S, N)
    if np.isnan(arr).all():  # nothing measured (e.g. no object colour in any clip)
        return float("nan"), [float("nan")] * 2
    point = float(np.nanmean(arr))
    s, n = arr.shape
    vals = []
    for _ in range(boot):
        seeds = rng.integers(0, s, s)
        clips = rng.integers(0, n, (s, n))
        pick = arr[seeds[:, None], clips]
        vals.append(np.nanmean(pick) if not np.isnan(pick).all() else np.nan)
    vals = np.array(vals)
    vals = vals[~np.isnan(vals)]
    return point, ([float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))] if len(vals) else
                   [float("nan")] * 2)


def paired_delta(a: list[np.ndarray], b: list[np.ndarray], boot: int, rng) -> tuple[float, list[float]]:
    """Mean of ``a - b`` per (seed, clip) (the same seeds, clips and noise in both) and its paired
    hierarchical bootstrap interval."""
    return mean_ci([x - y for x, y in zip(a, b)], boot, rng)


def score_row(videos: list[torch.Tensor], batch: dict, floor, reference, train: torch.Tensor, conditioned: bool,
              boot: int, rng, states: list | None = None) -> dict:
    """Everything the table shows of one row: per-clip means with intervals, gate figures."""
    from tcplug.metrics.gate import ClipSet, evaluate

    per = [per_clip(v, batch) for v in videos]
    row = {"per_clip": {k: [p[k].tolist() for p in per] for k in PER_CLIP}}
    for k in PER_CLIP:
        row[k], ci = mean_ci([p[k] for p in per], boot, rng)
        row.setdefault("ci", {})[k] = ci
    states = states if states is not None else [s for _ in videos for s in batch["state"]] \
        if conditioned and batch.get("state") is not None else None
    cand = ClipSet(torch.cat(videos), states)
    report = evaluate(cand, floor if conditioned else floor.without_adherence(), reference, train=train)
    row["gate"] = report["gate"]
    row["figures"], row["floor"], row["intervals"] = report["figures"], report["floor"], report["intervals"]
    return row


# ----- verdicts and the tables ----------------------------------------------------------------
def verdict(delta_ci: list[float], gate: dict) -> str:
    """``improves`` only when the paired Δ TVS interval is below 0 and the row with the technique
    passes the gate (adherence included for conditioned rows); else why not."""
    why = []
    if not delta_ci[1] < 0:
        why.append("Δ TVS interval overlaps 0" if delta_ci[0] < 0 else "TVS worse")
    if not gate["pass"]:
        why.append("fails the gate: " + ", ".join(sorted({r.split(" (")[0] for r in gate["reasons"]})))
    return "improves" if not why else "does not improve (" + "; ".join(why) + ")"


def fmt(v, f=".2f"):
    return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, f)


def gate_cell(row: dict) -> str:
    g = row.get("gate")
    if g is None:
        return ""
    return "pass" if g["pass"] else "fail: " + ", ".join(sorted({r.split(" (")[0] for r in g["reasons"]}))


def table(rows: list[dict], names: list[str], delta_of: str) -> str:
    head = (f"| row | knows | TVS % [95 % CI] | paired Δ TVS {delta_of} [95 % CI] | motion ratio | sharpness ratio | "
            "frame dist. | dynamics dist. | motion px static / moving | traj. err px | gate | verdict | strip |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    by = {r["row"]: r for r in rows}
    lines = []
    for name in names:
        r = by.get(name)
        if r is None:
            lines.append(f"| {name} | | not run | | | | | | | | | | |")
            continue
        if "error" in r:
            lines.append(f"| {name} | | failed: {r['error']} | | | | | | | | | | |")
            continue
        f = r["figures"]
        ci = r["ci"]["tvs"]
        d = f"{fmt(r['delta'])} [{fmt(r['delta_ci'][0])}, {fmt(r['delta_ci'][1])}]" if r.get("delta") is not None else ""
        if name == "full" and d:
            d = f"vs baseline: {d}"
        strip = f"![{name}](img/ablation/{r['strip']})" if r.get("strip") else ""
        est = f" (state estimate {fmt(r['state_error'], '.1f')})" if r.get("state_error") is not None else ""
        lines.append(
            f"| {name} | {', '.join(r['knows'])} | {fmt(r['tvs'])} [{fmt(ci[0])}, {fmt(ci[1])}] | {d} | "
            f"{fmt(f.get('motion_ratio'))} | {fmt(f.get('sharpness_ratio'))} | {fmt(f.get('frame_distance'), '.3f')} | "
            f"{fmt(f.get('dynamics_distance'))} | {fmt(r['motion_static'])} / {fmt(r['motion_moving'])} | "
            f"{fmt(f.get('trajectory_error'), '.1f')}{est} | {gate_cell(r)} | {r.get('verdict', '')} | {strip} |")
    return head + "\n".join(lines) + "\n"


def control_table(rows: list[dict]) -> str:
    head = ("| control | TVS % | motion ratio | sharpness ratio | frame dist. | dynamics dist. | memorised | "
            "motion px static / moving | gate |\n|---|---|---|---|---|---|---|---|---|\n")
    out = []
    for r in rows:
        f = r["figures"]
        out.append(f"| *{r['row']}* | {fmt(r['tvs'])} | {fmt(f.get('motion_ratio'))} | {fmt(f.get('sharpness_ratio'))} | "
                   f"{fmt(f.get('frame_distance'), '.3f')} | {fmt(f.get('dynamics_distance'))} | "
                   f"{fmt(f.get('memorised'))} | {fmt(r['motion_static'])} / {fmt(r['motion_moving'])} | {gate_cell(r)} |")
    return head + "\n".join(out) + "\n"


def goals(rows: list[dict]) -> list[str]:
    """The issue's goals, checked on the measured rows."""
    by = {r["row"]: r for r in rows if "error" not in r}
    out = []
    full, data = by.get("full"), by.get("data")
    if full:
        out.append(f"`full` passes the gate: {'met' if full['gate']['pass'] else 'not met'} ({gate_cell(full)})")
    if full and data:
        ok = full["tvs"] <= 1.5 * data["tvs"]
        out.append(f"`full` TVS within 1.5x the DIS data floor: {'met' if ok else 'not met'} "
                   f"({full['tvs']:.2f} % vs 1.5 x {data['tvs']:.2f} = {1.5 * data['tvs']:.2f} %)")
    techs = [t for t in _recipes.TECHNIQUES if t in by or f"full - {t}" in by or f"full + {t}" in by]
    if techs:
        helped = [t for t in techs if any(by.get(n, {}).get("verdict") == "improves"
                                          for n in (t, f"full - {t}", f"full + {t}"))]
        out.append(f"every technique improves in plus-one or leave-one-out: "
                   f"{'met' if len(helped) == len(techs) else 'not met'} ({len(helped)} of {len(techs)} measured"
                   f"{': ' + ', '.join(helped) if helped else ''})")
    priv, pix = by.get("world_model"), by.get("world_model_pixels")
    if priv and pix:
        a, b = pix["figures"].get("trajectory_error"), priv["figures"].get("trajectory_error")
        ok = a is not None and b is not None and a <= 2 * b
        out.append(f"the pixel-estimated world model within 2x the privileged one's trajectory error: "
                   f"{'met' if ok else 'not met'} ({fmt(a, '.1f')} px vs 2 x {fmt(b, '.1f')} px; its state "
                   f"estimate is {fmt(pix.get('state_error'), '.1f')} px off at frame 0)")
    bad = [r["row"] for r in rows if r.get("verdict") == "improves" and not r["judged_gate"]["pass"]]
    out.append(f"no row improves while failing the gate: {'met' if not bad else 'not met: ' + ', '.join(bad)}")
    return out


def markdown(rows: list[dict], meta: dict) -> str:
    recipes = [r for r in rows if r["kind"] == "recipe"]
    ctrl = [r for r in rows if r["kind"] == "control"]
    done = {r["row"] for r in recipes}
    partial = (" Rows marked *not run* have not been measured yet (the ablation resumes where it stopped)."
               if any(n not in done for n in PLUS + LOO) else "")
    by = "".join(f" (rows trained by `python benchmarks/ablation.py {a}`)" for a in meta.get("trained_by", [])
                 if a != meta["args"])
    foot = (f"\n_Generated by `python benchmarks/ablation.py {meta['args']}`{by} on {meta['machine']}, {meta['date']}, "
            f"rows trained at commit {', '.join(meta.get('trained_at') or ['unknown'])}, scored at "
            f"{meta.get('commit', 'unknown')}: "
            f"{meta['steps']}, seeds {meta['seeds']}, {meta['clips']} sampled clips per seed, "
            f"{meta['reference']} reference clips of another seed, {meta['train']} training clips for memorisation; the "
            f"data floor is the {meta['clips']} validation clips conditioned on. TVS: lower is better; motion and "
            "sharpness ratios: 1 = like the reference; distances: compare with the data row. Δ intervals are paired "
            "(same seeds, clips and noise). \"improves\" = the Δ interval is below 0 and the row with the technique "
            "passes the fidelity gate (adherence included for conditioned rows). knows: what the row reads at "
            "sampling: oracle (the future), privileged (exact simulator state), caption, first-frame pixels, or "
            f"nothing.{partial}_\n")
    checked = "".join(f"\n- {g}" for g in goals(rows))
    return ("**Plus-one** (base + X; Δ = row − baseline)\n\n" + table(recipes, PLUS, "vs baseline")
            + "\n**Leave-one-out** (full − X; Δ = full − row: below 0 = X helps inside full; latent designs: "
            "full + X, Δ = row − full)\n\n" + table(recipes, LOO, "(X's share)")
            + "\n**Controls** (the validation clips, no learning; the data row is the floor)\n\n" + control_table(ctrl)
            + foot + ("\nGoals:" + checked + "\n"))


def update_docs(text: str, files: list[Path], marker: str = "ablation") -> None:
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    for f in files:
        body = f.read_text()
        if start not in body or end not in body:
            raise SystemExit(f"{f}: no {start} ... {end} markers")
        head, rest = body.split(start, 1)
        here = text if f.parent == ROOT / "docs" else text.replace("](img/", "](docs/img/")  # links from the root
        f.write_text(head + start + "\n" + here + end + rest.split(end, 1)[1])


def strip(video: torch.Tensor, path: Path, clips: int = 3) -> str:
    """Rows of clips, frames left to right, 3x nearest-neighbour upscaled PNG; its file name."""
    from PIL import Image

    v = (video[:clips].clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 1, 3, 4, 2).numpy()
    img = np.concatenate([np.concatenate(list(c), axis=1) for c in v], axis=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).resize((img.shape[1] * 3, img.shape[0] * 3), Image.NEAREST).save(path)
    return path.name


def commit() -> str:
    """The source tree's commit (with ``+changes`` when it has uncommitted ones), for the table."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "tcplug", "plugins", "recipes"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return rev + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def shown_args(argv: list[str]) -> str:
    """The command line as shown under the tables: without where its files went."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--out", "--img"):
            skip = True
        elif not a.startswith(("--out=", "--img=")) and a not in ("--update-docs", "--render"):
            out.append(a)
    return " ".join(out)


# ----- main ----------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=None, help="rows to run (names as in the tables; default: all)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--clips", type=int, default=32, help="clips sampled per row and seed")
    p.add_argument("--reference", type=int, default=64, help="reference clips (another seed of the same world)")
    p.add_argument("--train", type=int, default=256, help="training clips the memorisation check compares with")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: base's max_steps)")
    p.add_argument("--boot", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--config", action="append", default=[], help="extra --config overlay for every row")
    p.add_argument("--out", default=None, help="folder for runs, tables and JSON (default: a temporary one)")
    p.add_argument("--img", default=str(ROOT / "docs" / "img" / "ablation"), help="folder for the strips")
    p.add_argument("--update-docs", action="store_true", help="write the tables into README.md and docs/benchmarks.md")
    p.add_argument("--render", action="store_true", help="train nothing: score what finished under --out")
    p.add_argument("--fresh", action="store_true", help="retrain every (row, seed), ignoring --out/runs/")
    p.add_argument("--executor", choices=_sweep.EXECUTORS, default="local",
                   help="where the (row, seed) jobs run: here, submitit's local executor, or SLURM (submitit)")
    p.add_argument("--slurm", nargs="*", default=[], metavar="KEY=VALUE",
                   help="submitit's SLURM parameters, e.g. slurm_partition=gpu gpus_per_node=1 timeout_min=120")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    t_start = time.perf_counter()
    if args.smoke:
        args.rows = args.rows or ["baseline", "full", "full - cross_frame"]
        args.seeds, args.clips, args.reference, args.train, args.boot = args.seeds[:1], 2, 4, 8, 20
        args.steps = 2
    rows_wanted = args.rows or PLUS + LOO
    unknown = [r for r in rows_wanted if r not in PLUS + LOO]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}: rows are {PLUS + LOO}")
    extra = [Path(c).resolve() for c in args.config] + ([SMOKE] if args.smoke else [])
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        out = Path(args.out).resolve() if args.out else work / "out"
        (out / "runs").mkdir(parents=True, exist_ok=True)
        resolved = {"baseline": _recipes.resolve(ROOT / "recipes" / "baseline.yaml", *extra),
                    "full": _recipes.resolve(ROOT / "recipes" / "full.yaml", *extra)}
        for t in _recipes.LATENT_DESIGNS:
            if any(r == f"full + {t}" for r in rows_wanted):
                resolved[t] = _recipes.resolve(ROOT / "recipes" / f"{t}.yaml", *extra)
        data_cfg = resolved["baseline"]["data"]
        batch = data_clips(data_cfg, args.clips)
        data = ((batch["video"].float() + 1) / 2).clamp(0, 1)
        ref_video, _ = world_clips(data_cfg, 777, args.reference)
        train_video, _ = world_clips(data_cfg, int(data_cfg.get("seed", 0)), args.train)
        from tcplug.metrics.gate import ClipSet

        floor = ClipSet(data, batch.get("state"))
        reference = ClipSet(ref_video)
        # ---- train and sample what is missing: one job per (row, seed), through --executor
        jobs = []
        for name in ([] if args.render else rows_wanted):
            (out / "runs" / f"{name.replace(' ', '')}.error").unlink(missing_ok=True)  # a failed row is tried again
            config = row_config(name, work, extra, resolved)
            key = run_key(config, extra, args.steps, args.clips)
            for seed in args.seeds:
                path = out / "runs" / f"{name.replace(' ', '')}-s{seed}.npz"
                if not args.fresh and path.is_file() and str(np.load(path)["key"]) == key:
                    print(f"{name} seed {seed}: cached", file=sys.stderr)
                    continue
                jobs.append((row_job, (name, config, extra, work, args.steps, seed, batch, key, path,
                                       shown_args(sys.argv[1:]))))
        _sweep.run_jobs(jobs, args.executor, out / "sweep", slurm=dict(kv.split("=", 1) for kv in args.slurm))
        # ---- score every row that finished (all its seeds), and the controls
        rows: list[dict] = []
        groups: dict[str, list[np.ndarray]] = {}
        for name in PLUS + LOO:
            files = [out / "runs" / f"{name.replace(' ', '')}-s{s}.npz" for s in args.seeds]
            err = out / "runs" / f"{name.replace(' ', '')}.error"
            if err.is_file() and name in rows_wanted and not all(f.is_file() for f in files):
                rows.append({"row": name, "kind": "recipe", "error": err.read_text()})
                continue
            if not all(f.is_file() for f in files):
                continue
            z = [np.load(f) for f in files]
            videos = [torch.from_numpy(x["video"]).float() / 255 for x in z]
            labels = json.loads(str(z[0]["knows"]))
            conditioned = labels != ["nothing"] and labels != ["oracle"]
            row = {"row": name, "kind": "recipe", "knows": labels, "train_wall_s": [float(x["wall_s"]) for x in z],
                   "commit": sorted({str(x["commit"]) if "commit" in x.files else "unknown" for x in z}),
                   "trained_by": sorted({str(x["args"]) for x in z if "args" in x.files}),
                   "state_error": float(np.nanmean([float(x["state_error"]) for x in z]))
                   if "state_error" in z[0].files and not all(np.isnan(float(x["state_error"])) for x in z) else None,
                   "state_report": {k: float(np.mean([json.loads(str(x["state_report"]))[k] for x in z]))
                                    for k in json.loads(str(z[0]["state_report"]))}
                   if "state_report" in z[0].files else None,
                   **score_row(videos, batch, floor, reference, train_video, conditioned, args.boot, rng)}
            if name in PLUS or name == "full" or name.startswith("full + "):
                row["strip"] = strip(videos[0], Path(args.img) / f"{name.replace(' ', '')}.png") if not args.smoke \
                    else None
            groups[name] = [np.array(v) for v in row["per_clip"]["tvs"]]
            rows.append(row)
        by = {r["row"]: r for r in rows}
        for r in rows:
            name, ref_name = r["row"], None
            if "error" in r or name == "baseline":
                continue
            if name == "full":  # all the techniques together against none of them
                ref_name, a, b = "baseline", "full", "baseline"
            elif name in PLUS:
                ref_name, a, b = "baseline", name, "baseline"
            elif name.startswith("full - "):
                ref_name, a, b = "full", "full", name
            else:
                ref_name, a, b = "full", name, "full"
            if ref_name not in groups:
                continue
            r["delta"], r["delta_ci"] = paired_delta(groups[a], groups[b], args.boot, rng)
            with_x = by[a]  # the row that has the technique
            r["verdict"] = verdict(r["delta_ci"], with_x["gate"])
            r["judged_gate"] = {"row": a, "pass": with_x["gate"]["pass"]}
        other, other_states = world_clips(data_cfg, 4242, args.clips)  # clips no row saw or was judged against
        for cname, video in {"held-out data": other, **controls(data, train_video)}.items():
            conditioned = cname not in ("replayed train",)
            row = {"row": cname, "kind": "control",
                   **score_row([video], batch, floor, reference, train_video, conditioned, args.boot, rng,
                               states=other_states if cname == "held-out data" else None)}
            if not args.smoke:
                strip(video, Path(args.img) / f"control-{cname.replace(' ', '-')}.png")
            rows.append(row)
        meta = {"machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores",
                "date": datetime.date.today().isoformat(), "commit": commit(),
                "steps": f"{args.steps} steps per row" if args.steps else "base's budget (each row's max_steps)",
                "seeds": args.seeds, "clips": args.clips, "reference": args.reference, "train": args.train,
                "wall_min": round((time.perf_counter() - t_start) / 60, 1),
                "args": " ".join(filter(None, [shown_args(sys.argv[1:]), "--render" if args.render else ""]))}
        meta["trained_at"] = sorted({c for r in rows for c in r.get("commit", [])})
        meta["trained_by"] = sorted({c for r in rows for c in r.get("trained_by", [])})
        text = markdown(rows, meta)
        (out / "ablation.md").write_text(text)
        slim = [{k: v for k, v in r.items() if k != "per_clip"} for r in rows]
        (out / "ablation.json").write_text(json.dumps({"meta": meta, "rows": slim}, indent=1))
        if args.update_docs:
            update_docs(text, [ROOT / "docs" / "benchmarks.md", ROOT / "README.md"])
        print(json.dumps({"bench": "ablation", **meta, "out": str(out) if args.out else None,
                          "rows": [{k: v for k, v in r.items() if k not in ("ci", "intervals", "floor")} for r in slim]}))


if __name__ == "__main__":
    main()
