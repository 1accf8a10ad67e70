"""Streaming long videos: peak memory at 1x vs 16x the training length, and seam quality.

Samples with the streaming K/V frame buffer (`TCPlugModule.stream`), chunk = training clip
length. Memory: peak of torch's allocations during sampling (see _mem.py). Seam quality: TVS (estimated
flow) of the frame pairs that straddle a chunk boundary vs the pairs inside chunks.

Prints one JSON line. Usage:
  python benchmarks/streaming.py --ckpt runs/full/version_0/checkpoints/last.ckpt [--steps 20]
  python benchmarks/streaming.py --recipe recipes/wan/tiny.yaml --mult 57   # a family, random weights
  python benchmarks/streaming.py --smoke      # random weights, tiny; no claims
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
from _mem import peak_mib  # noqa: E402
from _models import load_model  # noqa: E402

BATCH = {"txt": ["a red circle bounces"]}  # what a caption-conditioned family reads (others ignore it)


def length(chunk: int, mult: int, compression: int) -> int:
    """``mult`` chunks of pixel frames (a causal video VAE takes c k + 1 frames)."""
    return chunk * mult if compression == 1 else (chunk - 1) * mult + 1


def run_stream(ckpt, smoke, mult, steps, recipe=None):
    """A closure streaming ``mult`` x the training length (nothing kept but the buffer)."""
    model, chunk, size = load_model(ckpt, smoke, recipe)
    frames = length(chunk, mult, model.diffusion.latent.temporal_compression)

    def run():
        for _ in model.stream(frames, size, size, chunk, steps=steps, batch=BATCH):
            pass

    return run


def seams(ckpt, smoke, mult, steps, recipe=None) -> dict:
    from tcplug.metrics import pair_errors, to_unit

    model, chunk, size = load_model(ckpt, smoke, recipe)
    boundary, inside = [], []
    prev = None
    frames = length(chunk, mult, model.diffusion.latent.temporal_compression)
    for video in model.stream(frames, size, size, chunk, steps=steps, batch=BATCH):
        v = to_unit(video)
        clip = v if prev is None else torch.cat([prev, v], dim=1)
        l1 = pair_errors(clip)[0][0] * 100  # TVS per pair (%)
        if prev is None:
            inside += l1.tolist()
        else:
            boundary.append(float(l1[0]))
            inside += l1[1:].tolist()
        prev = v[:, -1:]
    return {"tvs_boundary_pairs": sum(boundary) / len(boundary), "tvs_inside_pairs": sum(inside) / len(inside),
            "boundary_pairs": len(boundary), "inside_pairs": len(inside)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--mult", type=int, default=16)
    p.add_argument("--recipe", default=None, help="a recipe's model at random weights, made to stream")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    if args.smoke:
        args.mult, args.steps = 3, 2
    if not args.ckpt and not args.smoke and not args.recipe:
        p.error("--ckpt or --recipe is required (or --smoke)")
    one = peak_mib(run_stream(args.ckpt, args.smoke, 1, args.steps, args.recipe))
    start = time.perf_counter()
    many = peak_mib(run_stream(args.ckpt, args.smoke, args.mult, args.steps, args.recipe))
    seconds = time.perf_counter() - start
    model, chunk, _ = load_model(args.ckpt, args.smoke, args.recipe)
    out = {"bench": "streaming", "machine": platform.machine(), "ckpt": bool(args.ckpt), "recipe": args.recipe,
           "mult": args.mult, "frames": length(chunk, args.mult, model.diffusion.latent.temporal_compression),
           "peak_mib_1x": one, f"peak_mib_{args.mult}x": many,
           "ratio": round(many / one, 3) if one > 0 else None,
           "frames_per_s": round(length(chunk, args.mult, model.diffusion.latent.temporal_compression) / seconds, 2),
           **seams(args.ckpt, args.smoke, args.mult, args.steps, args.recipe)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
