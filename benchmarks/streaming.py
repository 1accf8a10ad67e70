"""Streaming long videos: peak memory at 1x, 4x and 16x (--mult) the training length, and seam quality.

Samples with the streaming K/V frame buffer (`TCPlugModule.stream`), chunk = training clip
length. Memory: peak of torch's allocations during sampling (see _mem.py). Seam quality: TVS (estimated
flow) of the frame pairs that straddle a chunk boundary vs the pairs inside chunks.

Prints one JSON line. Usage:
  python benchmarks/streaming.py --ckpt runs/full/version_0/checkpoints/last.ckpt [--steps 20]
  python benchmarks/streaming.py --recipe recipes/wan/tiny.yaml --mult 64   # a family, random weights
  python benchmarks/streaming.py --recipe recipes/full.yaml --mult 64 --steps 2   # the main job, random weights
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


def held_out(size: int, chunk: int) -> dict:
    """The state and caption of one held-out clip of the synthetic world (what the world model
    and a caption conditioner read; a model without them ignores the batch)."""
    from tcplug.data.synthetic import make_clip

    clip = make_clip(4242, 0, chunk, size)
    return {"state": [clip["state"]], "txt": [clip["txt"]]}


def length(chunk: int, mult: int, compression: int) -> int:
    """``mult`` chunks of pixel frames (a causal video VAE takes c k + 1 frames)."""
    return chunk * mult if compression == 1 else (chunk - 1) * mult + 1


def run_stream(loaded, mult, steps, context=None):
    """A closure streaming ``mult`` x the training length (nothing kept but the buffer);
    ``loaded`` is :func:`load_model`'s ``(model, chunk, size)``."""
    model, chunk, size = loaded
    frames = length(chunk, mult, model.diffusion.latent.temporal_compression)

    batch = held_out(size, chunk)

    def run():
        for _ in model.stream(frames, size, size, chunk, steps=steps, batch=batch, context=context):
            pass

    return run


def seams(loaded, mult, steps, context=None) -> dict:
    """TVS (%) of the pairs across a chunk boundary and of those inside chunks. A pair whose flow
    check keeps no pixel (the second frame matches nothing of the first: a seam that jumps) has no
    TVS (``pair_errors`` gives NaN); the means are over the others and ``*_unmatched`` counts them."""
    import math

    from tcplug.metrics import pair_errors, to_unit

    model, chunk, size = loaded
    boundary, inside = [], []
    prev = None
    frames = length(chunk, mult, model.diffusion.latent.temporal_compression)
    for video in model.stream(frames, size, size, chunk, steps=steps, batch=held_out(size, chunk), context=context):
        v = to_unit(video)
        clip = v if prev is None else torch.cat([prev, v], dim=1)
        l1 = pair_errors(clip)[0][0] * 100  # TVS per pair (%)
        if prev is None:
            inside += l1.tolist()
        else:
            boundary.append(float(l1[0]))
            inside += l1[1:].tolist()
        prev = v[:, -1:]

    def mean(xs):
        kept = [x for x in xs if not math.isnan(x)]
        return sum(kept) / len(kept) if kept else float("nan")

    return {"tvs_boundary_pairs": mean(boundary), "tvs_inside_pairs": mean(inside),
            "boundary_pairs": len(boundary), "inside_pairs": len(inside),
            "boundary_unmatched": sum(math.isnan(x) for x in boundary),
            "inside_unmatched": sum(math.isnan(x) for x in inside)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--mult", type=int, default=16)
    p.add_argument("--recipe", default=None, help="a recipe's model at random weights, made to stream")
    p.add_argument("--context", default=None, choices=["same_step", "clean"],
                   help="the stream's context (default: the recipe's model.stream_mode)")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    if args.smoke:
        args.mult, args.steps = 3, 2
    if not args.ckpt and not args.smoke and not args.recipe:
        p.error("--ckpt or --recipe is required (or --smoke)")
    loaded = load_model(args.ckpt, args.smoke, args.recipe)
    model, chunk, _ = loaded
    one = peak_mib(run_stream(loaded, 1, args.steps, args.context))
    # the frame buffer (window + anchor) and a video VAE's decoder context fill over the first chunks
    filled = peak_mib(run_stream(loaded, 4, args.steps, args.context)) if args.mult > 4 else None
    start = time.perf_counter()
    many = peak_mib(run_stream(loaded, args.mult, args.steps, args.context))
    seconds = time.perf_counter() - start
    out = {"bench": "streaming", "machine": platform.machine(), "ckpt": bool(args.ckpt), "recipe": args.recipe,
           "context": args.context,
           "mult": args.mult, "frames": length(chunk, args.mult, model.diffusion.latent.temporal_compression),
           "peak_mib_1x": one, "peak_mib_4x": filled, f"peak_mib_{args.mult}x": many,
           "ratio": round(many / one, 3) if one > 0 else None,
           "ratio_vs_4x": round(many / filled, 3) if filled else None,
           "frames_per_s": round(length(chunk, args.mult, model.diffusion.latent.temporal_compression) / seconds, 2),
           **seams(loaded, args.mult, args.steps, args.context)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
