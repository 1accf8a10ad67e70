"""Sampling speed: frames/s of all-at-once sampling and of streaming long videos.

Prints one JSON line. Usage:
  python benchmarks/sampling.py [--ckpt CKPT] [--steps 20] [--frames 64]
  python benchmarks/sampling.py --smoke
Without --ckpt, the `full.yaml`-sized dit (cross_frame window 2 + anchor, 32 x 32, 8-frame
clips) with random weights is timed: speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _models import load_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--frames", type=int, default=64, help="length of the streamed video")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    if args.smoke:
        args.steps, args.frames = 2, 8
    model, chunk, size = load_model(args.ckpt, args.smoke)
    model.generate(1, chunk, size, size, steps=1)  # warm-up
    t0 = time.perf_counter()
    model.generate(1, chunk, size, size, steps=args.steps)
    clip_fps = chunk / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    n = sum(v.shape[1] for v in model.stream(args.frames, size, size, chunk, steps=args.steps))
    stream_fps = n / (time.perf_counter() - t0)
    print(json.dumps({"bench": "sampling", "machine": platform.machine(), "device": "cpu",
                      "threads": torch.get_num_threads(), "size": size, "chunk": chunk, "steps": args.steps,
                      "clip_frames_per_s": round(clip_fps, 2), "stream_frames": n,
                      "stream_frames_per_s": round(stream_fps, 2)}))


if __name__ == "__main__":
    main()
