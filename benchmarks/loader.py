"""Loader throughput: clips/s of the shard DataModule for 16x64x64 clips, 0 and 2 workers.

Prints one JSON line:
  {"bench": "loader", "frames": 16, "size": 64, "batch_size": B, "clips_per_s": {"0": x, "2": y}, ...}

  python benchmarks/loader.py [--batches 60] [--smoke]

Compare with what training consumes: batch_size x steps/s of `tcplug fit --config recipes/full.yaml`
(the progress bar's it/s).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

from tcplug.data import VideoDataModule


def measure(dm: VideoDataModule, batches: int) -> float:
    loader = dm.train_dataloader()
    it = iter(loader)
    next(it)  # start-up (worker spawn) not counted
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        b = next(it)
        n += b["video"].shape[0]
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=60)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--smoke", action="store_true", help="tiny sizes; no timing claims")
    args = p.parse_args()
    if args.smoke:
        args.frames, args.size, args.batches = 4, 16, 3
    result = {}
    with tempfile.TemporaryDirectory() as cache:
        for w in args.workers:
            dm = VideoDataModule(frames=args.frames, size=args.size, batch_size=args.batch_size,
                                 epoch_batches=args.batches + 2, train_clips=256, shard_size=32, num_workers=w,
                                 cache_dir=cache)
            dm.prepare_data()
            dm.setup()
            result[str(w)] = round(measure(dm, args.batches), 1)
    print(json.dumps({"bench": "loader", "frames": args.frames, "size": args.size, "batch_size": args.batch_size,
                      "keys": "all ground truth", "clips_per_s": result, "machine": platform.machine()}))


if __name__ == "__main__":
    main()
