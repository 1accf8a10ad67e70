"""The coherence ablation: train recipes with the same budget and seed, sample, tabulate.

Every recipe is trained by `tcplug fit` on the built-in synthetic world with the same number
of steps, seed and validation samples; the table reads each run's metrics.json (TVS of the
generated clips with estimated flow, the data floor, warping error, background flicker on
the data's static mask) and its TensorBoard events (TVS over training steps). Writes
`ablation.json`, `ablation.md`, `tvs.png` (per recipe) and `tvs_steps.png` into --out, and
with --update-docs replaces the table between the ablation markers of README.md and
docs/benchmarks.md. Prints one JSON line.

Usage:
  python benchmarks/ablation.py                       # CPU budget, every recipe
  python benchmarks/ablation.py --recipes baseline experts world_model motion_lock --steps 1000
  python benchmarks/ablation.py --budget gpu --config recipes/presets/gpu.yaml
  python benchmarks/ablation.py --smoke               # tiny sizes, seconds
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["baseline", "cross_frame", "flow_warp", "perceptual_temporal", "adversarial", "two_tier", "video_ldm",
           "experts", "world_model", "captions", "motion_lock", "full"]
BUDGETS = {"cpu": 600, "gpu": 20000}
SMOKE = ["--config", str(ROOT / "recipes" / "presets" / "cpu-smoke.yaml"), "--model.num_val_samples=2"]
GOAL_TVS = 1.2  # percent: the seed's headline for good 2026 models


def tvs_history(run: Path) -> list[tuple[int, float]]:
    """``(step, val/tvs)`` from a run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = []
    for ev in sorted(run.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(ev), size_guidance={"scalars": 0})
        acc.Reload()
        if "val/tvs" in acc.Tags().get("scalars", []):
            out += [(e.step, e.value) for e in acc.Scalars("val/tvs")]
    return sorted(out)


def train(recipe: str, extra: list[str], work: Path, steps: int, seed: int) -> dict:
    cmd = [sys.executable, "-m", "tcplug", "fit", "--config", str(ROOT / "recipes" / f"{recipe}.yaml"), *extra,
           f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={max(1, steps // 4)}",
           f"--seed_everything={seed}", f"--data.seed={seed}", "--trainer.enable_progress_bar=false",
           f"--trainer.logger.init_args.save_dir={work / 'runs'}", f"--trainer.logger.init_args.name={recipe}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        return {"recipe": recipe, "error": proc.stderr.strip().splitlines()[-1][-300:], "wall_s": round(wall, 1)}
    run = next((work / "runs" / recipe).glob("version_*"))
    m = json.loads((run / "metrics.json").read_text())["metrics"]
    return {"recipe": recipe, "tvs": m.get("val/tvs"), "tvs_data": m.get("val/tvs_data"),
            "warp_error": m.get("val/warp_error"), "bg_flicker": m.get("val/bg_flicker"), "wall_s": round(wall, 1),
            "history": tvs_history(run)}


def verdicts(rows: list[dict]) -> dict[str, str]:
    """The goals of the table, checked on the measured figures."""
    by = {r["recipe"]: r for r in rows if r.get("tvs") is not None}
    base = by.get("baseline", {}).get("tvs")
    out = {}
    for name, r in by.items():
        if name == "baseline" or base is None:
            continue
        better = r["tvs"] < base
        out[name] = "improves on baseline" if better else "does NOT improve on baseline"
    if "full" in by and base is not None:
        full = by["full"]["tvs"]
        out["full"] = (f"{'meets' if full <= base / 3 else 'misses'} full <= baseline/3 "
                       f"({full:.2f} vs {base / 3:.2f}); {'meets' if full < GOAL_TVS else 'misses'} "
                       f"TVS < {GOAL_TVS} %")
    return out


def markdown(rows: list[dict], meta: dict) -> str:
    head = ("| recipe | TVS % (generated) | TVS % (data floor) | warping error | background flicker | wall s | verdict |\n"
            "|---|---|---|---|---|---|---|\n")
    notes = verdicts(rows)
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['recipe']} | failed: {r['error']} | | | | {r['wall_s']} | |")
            continue
        fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
        lines.append(f"| {r['recipe']} | {fmt(r['tvs'], '.2f')} | {fmt(r['tvs_data'], '.2f')} | "
                     f"{fmt(r['warp_error'], '.4f')} | {fmt(r['bg_flicker'], '.3f')} | {r['wall_s']} | "
                     f"{notes.get(r['recipe'], 'reference' if r['recipe'] == 'baseline' else '')} |")
    again = "".join(f" Re-measured later by `python benchmarks/ablation.py {m['args']}`: {', '.join(m['recipes'])}."
                    for m in meta.get("merges", []))
    cmd = " ".join(["python benchmarks/ablation.py", meta["args"]]).strip()
    foot = (f"\n_Generated by `{cmd}` on {meta['machine']}, "
            f"{meta['date']}: {meta['steps']} steps per recipe, seed {meta['seed']}, "
            f"{meta['samples']} sampled clips each. TVS and warping error: lower is better; background "
            f"flicker is VBench's score on the data's static region (1 = perfectly still): higher is better.{again}_\n")
    return head + "\n".join(lines) + "\n" + foot


def plots(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("tvs") is not None]
    fig, ax = plt.subplots(figsize=(max(4, len(ok) * 0.8), 3))
    ax.bar([r["recipe"] for r in ok], [r["tvs"] for r in ok], color="#4c72b0")
    ax.axhline(GOAL_TVS, color="red", lw=1, ls="--", label=f"{GOAL_TVS} % goal")
    ax.set_ylabel("TVS of generated clips (%)")
    ax.tick_params(axis="x", rotation=45)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "tvs.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    ax.set_prop_cycle(color=plt.cm.tab20.colors[: max(1, len(ok))])
    for r in ok:
        if r["history"]:
            steps, values = zip(*r["history"])
            ax.plot(steps, values, marker="o", label=r["recipe"])
    ax.set_xlabel("training step (one per batch)")
    ax.set_ylabel("TVS (%)")
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(out / "tvs_steps.png", dpi=120)
    plt.close(fig)


def shown_args(argv: list[str]) -> str:
    """The command line as shown under the table: without where its files went."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif not a.startswith("--out=") and a != "--update-docs":
            out.append(a)
    return " ".join(out)


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
    p.add_argument("--recipes", nargs="+", default=None, help="default: every recipe (smoke: baseline "
                   "and full; every recipe has its own smoke test)")
    p.add_argument("--budget", choices=sorted(BUDGETS), default="cpu", help="steps per recipe: " +
                   ", ".join(f"{k}={v}" for k, v in BUDGETS.items()))
    p.add_argument("--steps", type=int, default=None, help="override the budget's steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=8, help="clips sampled per recipe for the metrics")
    p.add_argument("--config", action="append", default=[], help="extra --config overlay for every recipe")
    p.add_argument("--out", default=None, help="folder for the table and plots (default: a temporary one)")
    p.add_argument("--update-docs", action="store_true", help="write the table into README.md and docs/benchmarks.md")
    p.add_argument("--marker", default="ablation", help="the <!-- MARKER:start/end --> pair --update-docs replaces; "
                   "with a marker other than 'ablation' only docs/benchmarks.md is written")
    p.add_argument("--merge", action="store_true", help="keep the rows of --out/ablation.json (same steps and "
                   "seed) for recipes not run now: re-measure one recipe without re-running all")
    p.add_argument("--render", action="store_true", help="train nothing: rebuild the table and plots (and, with "
                   "--update-docs, the docs) from --out/ablation.json")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    if args.render:
        if not args.out or not (Path(args.out) / "ablation.json").exists():
            raise SystemExit("--render needs --out FOLDER holding an ablation.json")
        saved = json.loads((Path(args.out) / "ablation.json").read_text())
        write(saved["rows"], saved["meta"], Path(args.out).resolve(), args)
        return
    steps = 2 if args.smoke else (args.steps or BUDGETS[args.budget])
    if args.recipes is None:
        args.recipes = ["baseline", "full"] if args.smoke else RECIPES
    extra = [a for c in args.config for a in ("--config", str(Path(c).resolve()))]
    extra += SMOKE if args.smoke else [f"--model.num_val_samples={args.samples}", f"--data.val_clips={args.samples}"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        out = Path(args.out).resolve() if args.out else work / "out"
        out.mkdir(parents=True, exist_ok=True)
        rows = []
        for name in args.recipes:
            rows.append(train(name, extra, work, steps, args.seed))
            print(f"{name}: {json.dumps({k: v for k, v in rows[-1].items() if k != 'history'})}", file=sys.stderr)
        merges, first_args = [], None
        if args.merge and (out / "ablation.json").exists():
            old = json.loads((out / "ablation.json").read_text())
            if (old["meta"]["steps"], old["meta"]["seed"]) != (steps, args.seed):
                raise SystemExit("--merge: the previous table used other steps or seed")
            new = {r["recipe"]: r for r in rows}
            first_args = old["meta"]["args"]
            merges = list(old["meta"].get("merges", []))
            merges.append({"args": shown_args(sys.argv[1:]), "recipes": [r["recipe"] for r in rows]})
            rows = [new.pop(r["recipe"], r) for r in old["rows"]] + list(new.values())
        meta = {"machine": f"{platform.machine()} {platform.system()}, {__import__('os').cpu_count()} CPU cores",
                "date": datetime.date.today().isoformat(), "steps": steps, "seed": args.seed,
                "samples": 2 if args.smoke else args.samples,
                "args": first_args if first_args is not None else shown_args(sys.argv[1:]), "merges": merges}
        write(rows, meta, out, args)


def write(rows: list[dict], meta: dict, out: Path, args: argparse.Namespace) -> None:
    """The table (markdown, JSON), the plots, the docs if asked, and a JSON line on stdout."""
    table = markdown(rows, meta)
    (out / "ablation.md").write_text(table)
    (out / "ablation.json").write_text(json.dumps({"meta": meta, "rows": rows, "verdicts": verdicts(rows)}, indent=1))
    plots(rows, out)
    if args.update_docs:
        files = [ROOT / "docs" / "benchmarks.md"] + ([ROOT / "README.md"] if args.marker == "ablation" else [])
        update_docs(table, files, args.marker)
    print(json.dumps({"bench": "ablation", **meta, "out": str(out) if args.out else None,
                      "rows": [{k: v for k, v in r.items() if k != "history"} for r in rows],
                      "verdicts": verdicts(rows)}))


if __name__ == "__main__":
    main()
