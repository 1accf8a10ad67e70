"""Framework overhead: the same model and data trained by `tcplug fit` and by a plain
PyTorch loop. Time per step = wall clock between consecutive steps (data loading, forward,
backward, clipping, optimizer, logging: everything), median after warm-up.

`--recipe baseline` is the `dit` of recipes/baseline.yaml; `--recipe wan` the tiny random Wan of
recipes/wan/tiny.yaml (its VAE encodes every batch, as in a run without precomputed shards);
`--recipe ltx` the tiny random LTX-Video of recipes/ltx/tiny.yaml, likewise.

Prints one JSON line. Usage:
  python benchmarks/overhead.py [--recipe baseline|wan|ltx] [--steps 200] [--warmup 20]
  python benchmarks/overhead.py --smoke [--recipe wan|ltx]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"baseline": ROOT / "recipes" / "baseline.yaml", "wan": ROOT / "recipes" / "wan" / "tiny.yaml",
           "ltx": ROOT / "recipes" / "ltx" / "tiny.yaml"}
RECIPE = RECIPES["baseline"]


def overrides(steps: int, smoke: bool) -> list[str]:
    out = [f"--trainer.max_steps={steps}", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
           "--trainer.enable_model_summary=false", f"--data.epoch_batches={steps + 5}", "--data.num_workers=0"]
    if smoke and RECIPE == RECIPES["baseline"]:
        out += ["--data.frames=4", "--data.size=16", "--data.batch_size=2", "--data.train_clips=8",
                "--model.backbone.init_args.dim=32", "--model.backbone.init_args.depth=1"]
    elif smoke:
        out += ["--data.frames=5", "--data.size=32", "--data.batch_size=2", "--data.train_clips=8"]
    return out


def tcplug_fit(steps: int, smoke: bool, work: Path) -> list[float]:
    out = work / "steps.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "tcplug", "fit", "--config", str(RECIPE), *overrides(steps, smoke),
           "--trainer.callbacks+=_timing.StepTimer", f"--trainer.callbacks.init_args.out={out}"]
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(out.read_text())


def plain_loop(steps: int, smoke: bool, work: Path) -> list[float]:
    """The same model, data and optimizer settings, by hand: no Lightning, no logging."""
    import yaml

    from tcplug.data import VideoDataModule
    from tcplug.module import TCPlugModule
    from tcplug.recipe import instantiate

    # resolve the recipe exactly as `tcplug fit` does, then build the objects ourselves
    text = subprocess.run([sys.executable, "-m", "tcplug", "fit", "--config", str(RECIPE), *overrides(steps, smoke),
                           "--print_config"], capture_output=True, text=True, check=True, cwd=work).stdout
    cfg = yaml.safe_load(text)
    init = instantiate(cfg, {"model": TCPlugModule, "data": VideoDataModule})
    model, data = init.model, init.data
    torch.manual_seed(cfg.get("seed_everything") or 0)
    data.prepare_data()
    data.setup("fit")
    model.train()
    opt = model.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    times, t_prev = [], time.perf_counter()
    it = iter(data.train_dataloader())
    for _ in range(steps):
        batch = next(it)
        loss, _ = model.training_losses(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), model.gradient_clip)
        opt.step()
        now = time.perf_counter()
        times.append(now - t_prev)
        t_prev = now
    return times


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="baseline")
    args = p.parse_args()
    global RECIPE
    RECIPE = RECIPES[args.recipe]
    if args.smoke:
        args.steps, args.warmup = 6, 2
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        plain = plain_loop(args.steps, args.smoke, work)[args.warmup:]
        fit = tcplug_fit(args.steps, args.smoke, work)[args.warmup:]
    mp, mf = statistics.median(plain), statistics.median(fit)
    print(json.dumps({"bench": "overhead", "machine": platform.machine(), "threads": torch.get_num_threads(),
                      "recipe": str(RECIPE.relative_to(ROOT)), "steps": args.steps, "warmup": args.warmup,
                      "plain_ms_per_step": round(mp * 1000, 2), "tcplug_fit_ms_per_step": round(mf * 1000, 2),
                      "overhead_pct": round(100 * (mf - mp) / mp, 1)}))


if __name__ == "__main__":
    main()
