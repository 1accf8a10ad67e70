"""``tcplug score``: metrics of video files, with estimated flow, against reference footage."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from tcplug.errors import TcplugError


def _fmt(name: str, value: float) -> str:
    return f"{value:.3f}%" if name == "tvs" else f"{value:.4g}"


def main(argv: Sequence[str]) -> int:
    from tcplug.metrics.suite import DEFAULT_METRICS, NO_REFERENCE_METRICS
    from tcplug.scoring import (
        load_frames,
        load_reference,
        reference_suite,
        resize_frames,
        score_frames,
    )

    parser = argparse.ArgumentParser(
        prog="tcplug score",
        description="Metrics of videos with optical flow estimated by OpenCV DIS: TVS in %, warping error, "
        "flicker, coverage; with --reference also motion_ratio, sharpness_ratio and frame_distance against "
        "real footage (a clip that does not move, is blurred or looks nothing like the reference is caught "
        "there, not by TVS). Exit status 1 if any file failed.")
    parser.add_argument("videos", nargs="+", metavar="VIDEO", help="mp4/gif/webm/... files or .npy (T, H, W, 3) arrays")
    parser.add_argument("--reference", metavar="REF", default=None,
                        help="reference footage: a video, a folder of videos, or webdataset shards")
    parser.add_argument("--metrics", default=None, metavar="A,B,...",
                        help="metric names (kind 'metric', `tcplug plugins` lists them); default: "
                        f"{', '.join(DEFAULT_METRICS)} with --reference, else those needing no reference")
    parser.add_argument("--json", action="store_true", help="one JSON object per file")
    parser.add_argument("--size", type=int, default=None, help="resize frames (and the reference) to SIZE x SIZE first")
    parser.add_argument("--max-frames", type=int, default=None, help="score only the first N frames")
    parser.add_argument("--flow", default="medium", choices=["ultrafast", "fast", "medium"], help="DIS preset")
    args = parser.parse_intermixed_args(list(argv))
    names = [n.strip() for n in args.metrics.split(",") if n.strip()] if args.metrics else None
    if names is None:
        names = list(DEFAULT_METRICS if args.reference else NO_REFERENCE_METRICS)
    # an unreadable reference stops the command (exit 2); a bad video only fails its own line
    reference = load_reference(args.reference, args.max_frames) if args.reference else None
    failed = 0
    suites: dict[tuple[int, int], object] = {}  # one suite per frame size, fed with the resized reference
    for path in args.videos:
        try:
            frames = load_frames(path, args.size, args.max_frames)
            if len(frames) < 2:
                raise TcplugError(f"{path}: need at least 2 frames, got {len(frames)}")
            size = tuple(frames.shape[1:3])
            if size not in suites:
                ref = [resize_frames(c, *size) for c in reference] if reference is not None else None
                suites[size] = reference_suite(names, ref, args.flow)
            result = {"path": str(path), "frames": int(len(frames)),
                      **score_frames(frames, args.flow, progress=sys.stderr.isatty() or len(frames) > 64,
                                     suite=suites[size])}
        except TcplugError as exc:
            failed += 1
            print(f"tcplug score: error: {exc}", file=sys.stderr)
            continue
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            values = " ".join(f"{k}={_fmt(k, v)}" for k, v in result.items() if k not in ("path", "frames"))
            print(f"{path}: frames={result['frames']} {values}", flush=True)
    return 1 if failed else 0
