"""The world model's rollout over long videos, against the world simulated as long.

The drift benchmark found the main job's objects slowing down over a 512-frame video: the world
model (``physics_state``) rolls its state forward with free flight plus a learned correction, and
a smooth correction rounds every bounce off. This measures the dynamics alone, as the main job
trains them (its ``auxiliary_loss`` on the training world's 8-frame trajectories, the main job's
batch, steps and learning rate) for each ``correction`` (``additive``, ``reflect``), and rolls them
out from held-out initial states (world seed 4242) for ``--frames`` frames: per chunk of 8 frames,
the objects' mean speed (the truth's beside it) and their position error in pixels, mean over
objects, videos and training seeds with a bootstrap interval. Controls, scored the same way: the
truth (error 0), objects kept still at their first position, and free flight with no correction
(the walls ignored). The denoiser is not in this: in the main job the maps rendered from this
rollout are what it follows.

Usage:
  python benchmarks/world_rollout.py --out world_rollout        # about 2 min per (correction, seed) here
  python benchmarks/world_rollout.py --smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

CORRECTIONS = ("additive", "reflect")


def states(seed: int, n: int, frames: int, size: int = 32) -> list[dict]:
    from tcplug.data.synthetic import make_clip

    return [make_clip(seed, i, frames, size, 2, 0.0, world="simple")["state"] for i in range(n)]


def train(correction: str, seed: int, steps: int, pool: list[dict], batch: int = 8, lr: float = 3e-3):
    """The dynamics of a ``physics_state`` (as ``full.yaml`` configures it) trained alone on its
    auxiliary loss: ``lr`` is the main job's 5e-4 times the dynamics' ``lr_scale`` 6."""
    from tcplug import get_component

    torch.manual_seed(seed)
    world = get_component("conditioner", "physics_state")(shapes=True, input_maps=True, correction=correction)
    opt = torch.optim.Adam(world.dynamics.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        loss = world.auxiliary_loss({"state": [pool[i] for i in rng.integers(0, len(pool), batch)]})
        opt.zero_grad()
        loss.backward()
        opt.step()
    return world


def figures(pos: torch.Tensor, vel: torch.Tensor, st: dict, chunk: int) -> dict[str, np.ndarray]:
    """Per video and chunk ``(B, chunks)``: mean speed and position error over present objects."""
    present = st["present"][:, None, :]
    n = present.sum(-1).clamp_min(1)
    speed = (vel.norm(dim=-1) * present).sum(-1) / n
    err = ((pos - st["pos"]).norm(dim=-1) * present).sum(-1) / n
    b, t = speed.shape
    cut = lambda x: x[:, : t // chunk * chunk].view(b, -1, chunk).mean(-1).numpy()  # noqa: E731
    return {"speed": cut(speed), "position_error": cut(err), "true_speed": cut((st["vel"].norm(dim=-1) * present).sum(-1) / n)}


def mean_ci(x: np.ndarray, rng, boot: int = 1000) -> list[float]:
    x = np.asarray(x, float).ravel()
    means = [x[rng.integers(0, len(x), len(x))].mean() for _ in range(boot)]
    return [round(float(x.mean()), 2), round(float(np.percentile(means, 2.5)), 2), round(float(np.percentile(means, 97.5)), 2)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=1200, help="training steps (the main job's)")
    p.add_argument("--frames", type=int, default=512)
    p.add_argument("--videos", type=int, default=16)
    p.add_argument("--horizon", type=int, default=8, help="frames of each training trajectory (the clip length)")
    p.add_argument("--corrections", default=",".join(CORRECTIONS))
    p.add_argument("--out", default=None)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    if args.smoke:
        args.seeds, args.steps, args.frames, args.videos = "0", 5, 32, 2
    from tcplug import get_component

    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    chunk = 8
    pool = states(0, 64 if args.smoke else 1024, args.horizon)
    test = states(4242, args.videos, args.frames)
    probe = get_component("conditioner", "physics_state")(shapes=True)
    st = probe.parse(test)
    rows: dict[str, list[dict]] = {}
    wall = {}
    with torch.no_grad():
        still = st["pos"][:, :1].expand_as(st["pos"])
        rows["truth"] = [figures(st["pos"], st["vel"], st, chunk)]
        rows["still"] = [figures(still, torch.zeros_like(st["vel"]), st, chunk)]
        rows["free flight"] = [figures(*probe.rollout(st, args.frames), st, chunk)]
    for correction in [c for c in args.corrections.split(",") if c]:
        rows[correction], t0 = [], time.perf_counter()
        for seed in seeds:
            world = train(correction, seed, args.steps, pool)
            with torch.no_grad():
                rows[correction].append(figures(*world.rollout(st, args.frames), st, chunk))
        wall[correction] = round((time.perf_counter() - t0) / len(seeds), 1)
    rng = np.random.default_rng(0)
    at = [c for c in (0, 3, 15, 63) if c < args.frames // chunk]
    table = {name: {key: {f"chunk {c}": mean_ci(np.concatenate([r[key][:, c] for r in runs]), rng) for c in at}
                    for key in ("speed", "position_error")} for name, runs in rows.items()}
    true_speed = float(rows["truth"][0]["true_speed"].mean())
    lines = ["| rollout | figure | " + " | ".join(f"frames {8 * c}-{8 * c + 7}" for c in at) + " |",
             "|---|---|" + "---|" * len(at)]
    for name, figs in table.items():
        for key, vals in figs.items():
            cells = " | ".join(f"{v[0]} [{v[1]}, {v[2]}]" for v in vals.values())
            lines.append(f"| {name} | {key.replace('_', ' ')} | {cells} |")
    result = {"bench": "world_rollout", "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores",
              "date": datetime.date.today().isoformat(), "seeds": seeds, "steps": args.steps, "frames": args.frames,
              "videos": args.videos, "horizon": args.horizon, "true_speed": round(true_speed, 2),
              "train_wall_s": wall, "table": table}
    md = "\n".join(lines)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "world_rollout.json").write_text(json.dumps(result, indent=1))
        (out / "world_rollout.md").write_text(md + "\n")
    print(md)
    print(json.dumps({k: v for k, v in result.items() if k != "table"}))


if __name__ == "__main__":
    main()
