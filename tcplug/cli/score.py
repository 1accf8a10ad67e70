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
        "there, not by TVS). With --reference a last line judges the whole set with the fidelity gate: "
        "motion, sharpness, appearance and dynamics against held-out reference clips measured the same way, "
        "and with --train memorisation of training clips. Exit status 1 if any file failed.")
    parser.add_argument("videos", nargs="+", metavar="VIDEO",
                        help="mp4/gif/webm/... files, .npy (T, H, W, 3) arrays, or folders of them")
    parser.add_argument("--reference", metavar="REF", default=None,
                        help="reference footage: a video, a folder of videos, or webdataset shards")
    parser.add_argument("--train", metavar="TRAIN", default=None,
                        help="the training clips (a video, a folder of videos, or shards): the set line adds "
                        "memorisation, each clip's distance to its nearest training clip against held-out clips'")
    parser.add_argument("--metrics", default=None, metavar="A,B,...",
                        help="metric names (kind 'metric', `tcplug plugins` lists them); default: "
                        f"{', '.join(DEFAULT_METRICS)} with --reference, else those needing no reference")
    parser.add_argument("--json", action="store_true", help="one JSON object per file")
    parser.add_argument("--size", type=int, default=None, help="resize frames (and the reference) to SIZE x SIZE first")
    parser.add_argument("--max-frames", type=int, default=None, help="score only the first N frames")
    parser.add_argument("--flow", default="medium", choices=["ultrafast", "fast", "medium"], help="DIS preset")
    parser.add_argument("--per-chunk", type=int, default=None, metavar="K",
                        help="drift: figures per chunk of K frames against frame index (TVS, motion, sharpness, "
                        "appearance against the first chunk; with --reference the ratios and the dynamics distance), "
                        "a summary (the last quarter of the chunks against the first), and a plot VIDEO.drift.png "
                        "beside each video")
    parser.add_argument("--split", type=int, default=1, metavar="N",
                        help="each video holds N clips side by side (as tcplug's validation samples): score each")
    args = parser.parse_intermixed_args(list(argv))
    if args.train and not args.reference:
        raise TcplugError("--train needs --reference REF: memorisation is judged against held-out reference clips")
    if args.split < 1:
        raise TcplugError(f"--split must be >= 1, got {args.split}")
    if args.per_chunk is not None:
        return _drift(args)
    names = [n.strip() for n in args.metrics.split(",") if n.strip()] if args.metrics else None
    if names is None:
        names = list(DEFAULT_METRICS if args.reference else NO_REFERENCE_METRICS)
    # an unreadable reference stops the command (exit 2); a bad video only fails its own line
    reference = load_reference(args.reference, args.max_frames) if args.reference else None
    train = load_reference(args.train, args.max_frames, max_clips=1024) if args.train else None
    failed = 0
    scored: list = []  # every clip scored, for the set line
    suites: dict[tuple[int, int], object] = {}  # one suite per frame size, fed with the resized reference
    for path in _videos(args.videos):
        try:
            frames = load_frames(path, None if args.split > 1 else args.size, args.max_frames)
            if len(frames) < 2:
                raise TcplugError(f"{path}: need at least 2 frames, got {len(frames)}")
            clips = _split(frames, args.split, path)
            if args.split > 1 and args.size:
                clips = [(name, resize_frames(c, args.size, args.size)) for name, c in clips]
        except TcplugError as exc:
            failed += 1
            print(f"tcplug score: error: {exc}", file=sys.stderr)
            continue
        for name, clip in clips:
            try:
                size = tuple(clip.shape[1:3])
                if reference is not None and not args.size:
                    _same_shape(name, size, tuple(reference[0].shape[1:3]))
                if size not in suites:
                    ref = [resize_frames(c, *size) for c in reference] if reference is not None else None
                    suites[size] = reference_suite(names, ref, args.flow)
                result = {"path": name, "frames": int(len(clip)),
                          **score_frames(clip, args.flow, progress=sys.stderr.isatty() or len(clip) > 64,
                                         suite=suites[size])}
            except TcplugError as exc:
                failed += 1
                print(f"tcplug score: error: {exc}", file=sys.stderr)
                continue
            scored.append(clip)
            if args.json:
                print(json.dumps(result), flush=True)
            else:
                values = " ".join(f"{k}={_fmt(k, v)}" for k, v in result.items() if k not in ("path", "frames"))
                print(f"{name}: frames={result['frames']} {values}", flush=True)
    if reference is not None and scored:
        _set_line(scored, reference, train, names, args)
    return 1 if failed else 0


def _drift(args) -> int:
    """``--per-chunk K``: each video's figures per chunk, its summary, its plot beside it."""
    from pathlib import Path

    from tcplug.metrics import drift
    from tcplug.scoring import load_frames, load_reference, resize_frames

    if args.per_chunk < 2:
        raise TcplugError(f"--per-chunk needs chunks of at least 2 frames, got {args.per_chunk}")
    if args.split > 1 or args.train or args.metrics:
        raise TcplugError("--per-chunk measures whole videos against frame index: it takes no --split, --train "
                          "or --metrics")
    reference = load_reference(args.reference, args.max_frames) if args.reference else None
    failed = 0
    for path in _videos(args.videos):
        try:
            frames = load_frames(path, args.size, args.max_frames)
            if len(frames) < args.per_chunk:
                raise TcplugError(f"{path}: {len(frames)} frames, fewer than one chunk of {args.per_chunk}")
            ref = [resize_frames(c, *frames.shape[1:3]) for c in reference] if reference is not None else None
            report = drift.chunk_figures([frames], args.per_chunk, ref, flow_preset=args.flow,
                                         progress=sys.stderr.isatty())
        except TcplugError as exc:
            failed += 1
            print(f"tcplug score: error: {exc}", file=sys.stderr)
            continue
        out = Path(path).with_suffix(".drift.png")
        try:
            drift.plot(report, out, f"{Path(path).name}: per chunk of {args.per_chunk} frames")
        except OSError as exc:
            out = None
            print(f"tcplug score: {path}: the drift plot was not written ({exc})", file=sys.stderr)
        data = drift.to_json(report)
        if args.json:
            print(json.dumps({"path": str(path), "frames": int(len(frames)), "plot": str(out) if out else None,
                              **data}), flush=True)
            continue
        print(f"{path}: frames={len(frames)} chunks={len(report['starts'])} of {args.per_chunk}"
              + (f" plot={out}" if out else ""), flush=True)
        names = list(data["figures"])
        for c, start in enumerate(report["starts"]):
            values = " ".join(f"{k}={_fmt(k, v)}" for k in names if (v := data["figures"][k][0][c]) is not None)
            print(f"  frames {start}-{start + args.per_chunk - 1}: {values}", flush=True)
        last = " ".join(f"{k}={v[0]:.4g}" for k, v in data["summary"].items() if v[0] is not None)
        print(f"  drift (last quarter of the chunks against the first): {last}", flush=True)
    return 1 if failed else 0


def _set_line(clips: list, reference: list, train: list | None, names: list[str], args) -> None:
    """The last line: the fidelity gate of every clip scored, at the reference's frame size."""
    from tcplug.scoring import resize_frames, score_set

    h, w = (args.size, args.size) if args.size else reference[0].shape[1:3]
    same = [resize_frames(c, h, w) for c in clips]
    ref = [resize_frames(c, h, w) for c in reference]
    tr = [resize_frames(c, h, w) for c in train] if train is not None else None
    try:
        report = score_set(same, ref, tr, names, args.flow)
    except TcplugError as exc:  # a reference too small for a floor: the per-clip lines stand
        print(f"tcplug score: the set is not judged: {exc}", file=sys.stderr)
        return
    if args.json:
        print(json.dumps({"set": True, **report}), flush=True)
        return
    figs = " ".join(f"{k}={v:.4g} (data {report['floor'].get(k, float('nan')):.4g})"
                    for k, v in report["figures"].items())
    gate = report["gate"]
    verdict = "pass" if gate["pass"] else "fail: " + "; ".join(gate["reasons"])
    few = " (few held-out reference clips: the data floor is noisy)" if report["heldout_clips"] < 16 else ""
    print(f"set: clips={report['clips']} frames={report['length']} {figs} gate: {verdict}{few}", flush=True)


def _videos(paths: Sequence[str]) -> list[str]:
    """The files to score: each path, a folder's video files in name order."""
    from pathlib import Path

    from tcplug.scoring import VIDEO_SUFFIXES

    out = []
    for path in paths:
        folder = Path(path)
        if folder.is_dir():
            files = sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
            if not files:
                raise TcplugError(f"{path}: a folder without video files ({', '.join(VIDEO_SUFFIXES)})")
            out += files
        else:
            out.append(str(path))
    return out


def _split(frames, parts: int, path: str) -> list[tuple[str, object]]:
    """``(name, frames)`` of the ``parts`` clips side by side in ``frames`` ``(T, H, W, 3)``."""
    if parts == 1:
        return [(str(path), frames)]
    width = frames.shape[2]
    if width % parts:
        raise TcplugError(f"{path}: {width} pixels wide: not {parts} clips side by side (--split {parts})")
    w = width // parts
    return [(f"{path}[{i}]", frames[:, :, i * w:(i + 1) * w]) for i in range(parts)]


def _same_shape(name: str, size: tuple[int, int], ref: tuple[int, int]) -> None:
    """A clip of another aspect than the reference is refused rather than stretched to it."""
    if size[0] * ref[1] != size[1] * ref[0]:
        k = round(size[1] * ref[0] / (size[0] * ref[1]))
        hint = f" --split {k} scores {k} clips side by side (as tcplug's validation samples hold) one by one;" \
            if k >= 2 and size[1] * ref[0] == k * size[0] * ref[1] else ""
        raise TcplugError(f"{name}: frames are {size[0]}x{size[1]}, the reference's {ref[0]}x{ref[1]} (another "
                          f"shape):{hint} --size S resizes both to S x S")
