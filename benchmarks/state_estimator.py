"""What ``pixel_state``'s estimator learns on its own: the object state from the first frame(s).

The world model without privilege (``pixel_state``) rolls out a state its estimator reads from
pixels; in a run the estimator trains beside the denoiser. This trains the estimator alone, on the
main job's training world (textured, 2 objects, 32x32, world seed 0), with its own loss
(``estimation_loss``), the main job's batch and its learning rate times ``lr_scale`` (5e-4 x 6),
for ``--steps`` steps, for one frame (image-to-video) and for two (a continuation), and scores it
with ``estimate_report`` on held-out clips (world seed 4242): position, velocity (and the velocity
of objects whose first step is not a bounce), size, colour, class, presence. A control beside
them: the estimate "no motion" (its velocity error is the objects' mean speed).

Usage:
  python benchmarks/state_estimator.py --out state_estimator      # about 1 min per row here
  python benchmarks/state_estimator.py --smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

FIELDS = ("position_px", "velocity_px", "velocity_px_straight", "bounced", "size_px", "colour", "class_accuracy",
          "presence_accuracy")


def clips(seed: int, n: int, frames: int, size: int = 32) -> dict:
    """``n`` clips of the synthetic world: ``video`` ``(n, frames, 3, S, S)`` in [-1, 1] and ``state``."""
    from tcplug.data.synthetic import make_clip

    cs = [make_clip(seed, i, frames, size, 2, 0.0) for i in range(n)]
    video = torch.from_numpy(np.stack([c["frames"] for c in cs])).permute(0, 1, 4, 2, 3).float() / 127.5 - 1
    return {"video": video, "state": [c["state"] for c in cs]}


def train(frames_seen: int, steps: int, pool: dict, batch: int, lr: float, seed: int = 0):
    """A ``pixel_state`` whose estimator trained ``steps`` steps on ``pool`` (shuffled batches)."""
    from tcplug import get_component

    torch.manual_seed(seed)
    world = get_component("conditioner", "pixel_state")(frames_seen=frames_seen, shapes=True, input_maps=True)
    opt = torch.optim.Adam(world.estimator.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    n = pool["video"].shape[0]
    for _ in range(steps):
        idx = torch.randint(0, n, (batch,), generator=g).tolist()
        loss = world.estimation_loss({"video": pool["video"][idx], "state": [pool["state"][i] for i in idx]})
        opt.zero_grad()
        loss.backward()
        opt.step()
    return world.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1200, help="the main job's budget")
    p.add_argument("--train", type=int, default=2048, help="training clips (the main job's)")
    p.add_argument("--clips", type=int, default=128, help="held-out clips scored")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3, help="the main job's lr x the world model's lr_scale")
    p.add_argument("--out", default=None)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    if args.smoke:
        args.steps, args.train, args.clips = 5, 16, 8
    pool, held = clips(0, args.train, 2), clips(4242, args.clips, 2)
    speed = float(torch.tensor([v for s in held["state"] for v in s["velocity"][0]]).float().norm(dim=-1).mean())
    rows = [{"row": "control: no motion", "velocity_px": speed}]
    t0 = time.perf_counter()
    for seen in (1, 2):
        t = time.perf_counter()
        report = train(seen, args.steps, pool, args.batch, args.lr).estimate_report(held)
        rows.append({"row": f"frames_seen {seen}", "wall_s": round(time.perf_counter() - t, 1), **report})
    head = "| row | " + " | ".join(FIELDS) + " |"
    lines = [head, "|" + "---|" * (len(FIELDS) + 1)]
    for r in rows:
        lines.append(f"| {r['row']} | " + " | ".join(f"{r[f]:.3g}" if f in r else "–" for f in FIELDS) + " |")
    md = (f"State estimator alone, {args.steps} steps of {args.batch} clips, {args.clips} held-out clips; "
          f"{platform.machine()} {platform.system()}, {datetime.date.today()}, "
          f"{round(time.perf_counter() - t0)} s.\n\n" + "\n".join(lines))
    result = {"bench": "state_estimator", "steps": args.steps, "clips": args.clips, "rows": rows}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "state_estimator.json").write_text(json.dumps(result, indent=1))
    print(md)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
