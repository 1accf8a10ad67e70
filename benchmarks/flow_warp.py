"""Does `flow_warp` lower the TVS of generated clips? Same recipe, budget and seed, with and
without the term; TVS of the validation samples (estimated flow) from each run's metrics.json.

Prints one JSON line. Usage:
  python benchmarks/flow_warp.py [--steps 1500] [--weight 1.0]
  python benchmarks/flow_warp.py --smoke
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train(recipe: Path, extra: list[str], workdir: Path, name: str) -> dict:
    cmd = [sys.executable, "-m", "tcplug", "fit", "--config", str(recipe), *extra,
           f"--trainer.logger.init_args.name={name}", "--trainer.enable_progress_bar=false"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    metrics = json.loads(next((workdir / "runs" / name).rglob("metrics.json")).read_text())["metrics"]
    return {"tvs": metrics.get("val/tvs"), "warp_error": metrics.get("val/warp_error"),
            "bg_flicker": metrics.get("val/bg_flicker"), "tvs_data": metrics.get("val/tvs_data"),
            "wall_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--weight", type=float, default=1.0)
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "cross_frame.yaml"))
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    common = [f"--trainer.max_steps={args.steps}", f"--trainer.val_check_interval={args.steps}",
              "--model.num_val_samples=8", "--data.val_clips=8", "--seed_everything=0"]
    if args.smoke:
        common = ["--trainer.max_steps=2", "--trainer.val_check_interval=2", "--data.frames=4", "--data.size=16",
                  "--data.batch_size=2", "--data.train_clips=8", "--data.epoch_batches=2", "--data.val_clips=2",
                  "--model.sample_steps=2", "--model.num_val_samples=2"]
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        base = train(Path(args.recipe), common, work, "without")
        with_fw = train(Path(args.recipe), common + [
            "--model.losses+=flow_warp", f"--model.losses.init_args.weight={args.weight}"], work, "with")
    print(json.dumps({"bench": "flow_warp", "machine": platform.machine(), "recipe": Path(args.recipe).name,
                      "steps": args.steps, "weight": args.weight, "without_flow_warp": base,
                      "with_flow_warp": with_fw}))


if __name__ == "__main__":
    main()
