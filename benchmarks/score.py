"""`tcplug score` throughput and real-footage TVS: original vs with per-frame flicker.

Prints one JSON line:
  {"bench": "score", "size": S, "frames": N, "fps": frames/s of scoring at SxS,
   "videos": [{"path", "frames", "tvs", "tvs_flicker", "warp_error", "flicker"}]}

  python benchmarks/score.py VIDEO... [--size 256] [--max-frames 64] [--amplitude 0.03]
  python benchmarks/score.py --smoke          # tiny synthetic input, no timing claims
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

from tcplug.scoring import load_frames, score_frames


def add_flicker(frames: np.ndarray, amplitude: float, seed: int = 0) -> np.ndarray:
    """Per-frame global brightness flicker: each frame offset by U(-a, a) * 255."""
    rng = np.random.default_rng(seed)
    offsets = rng.uniform(-amplitude, amplitude, size=(len(frames), 1, 1, 1)) * 255
    return np.clip(frames.astype(np.float32) + offsets, 0, 255).astype(np.uint8)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("videos", nargs="*")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--max-frames", type=int, default=64)
    p.add_argument("--amplitude", type=float, default=0.03)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    if args.smoke:
        rng = np.random.default_rng(0)
        clips = {"synthetic": rng.integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)}
        args.size = 32
    else:
        clips = {v: load_frames(v, args.size, args.max_frames) for v in args.videos}
    rows, total_frames, total_time = [], 0, 0.0
    for path, frames in clips.items():
        t0 = time.perf_counter()
        base = score_frames(frames)
        total_time += time.perf_counter() - t0
        total_frames += len(frames)
        flick = score_frames(add_flicker(frames, args.amplitude))
        rows.append({"path": path, "frames": len(frames), "tvs": base["tvs"], "tvs_flicker": flick["tvs"],
                     "warp_error": base["warp_error"], "flicker": base["flicker"]})
    print(json.dumps({"bench": "score", "size": args.size, "frames": total_frames,
                      "fps": total_frames / total_time if total_time else None, "amplitude": args.amplitude,
                      "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "videos": rows}))


if __name__ == "__main__":
    main()
