"""``tcplug sample``: a video from a checkpoint, streamed chunk by chunk when the model can."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from tcplug.errors import TcplugError


def _conditioning_batch(args, cfg: dict) -> dict | None:
    """What ``tcplug sample`` conditions on: a validation clip of the recipe's data, a caption,
    an initial object state (``state.json``)."""
    batch: dict = {}
    if args.clip is not None:
        from tcplug.data import VideoDataModule
        from tcplug.data.shards import slice_batch

        dm = VideoDataModule(**(cfg.get("data") or {}))
        dm.prepare_data()
        dm.setup("validate")
        seen = 0
        for b in dm.val_dataloader():
            n = b["video"].shape[0]
            if args.clip < seen + n:
                i = args.clip - seen
                batch = slice_batch(b, slice(i, i + 1))
                video = batch.pop("video")  # the clip's conditioning, not its pixels ...
                batch["first_frames"] = video[:, :2]  # ... but for its first frames (image-to-video)
                break
            seen += n
        else:
            raise TcplugError(f"--clip {args.clip}: the recipe's validation data has only {seen} clips")
    if args.caption is not None:
        batch["txt"] = [args.caption]
    if args.state is not None:
        try:
            batch["state"] = [json.loads(Path(args.state).read_text())]
        except (OSError, ValueError) as exc:
            raise TcplugError(f"--state {args.state}: not a readable JSON state ({exc})") from None
    if args.first_frame is not None:
        batch["first_frames"] = _first_frames(args.first_frame, args.size or int((cfg.get("data") or {}).get("size", 32)))
    if args.static_mask is not None:
        from tcplug.video import read_mask

        size = args.size or int((cfg.get("data") or {}).get("size", 32))
        batch["static"] = (read_mask(args.static_mask, (size, size)) >= 0.5).float()
    return batch or None


def _first_frames(path: str, size: int):
    """``(1, n, 3, size, size)`` in [-1, 1]: an image, or a video's first two frames."""
    import numpy as np
    import torch

    from tcplug.scoring import load_frames

    p = Path(path)
    if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp"):
        try:
            from PIL import Image

            frames = np.asarray(Image.open(p).convert("RGB"))[None]
        except (OSError, ValueError) as exc:
            raise TcplugError(f"--first-frame {path}: not a readable image ({exc})") from None
        from tcplug.scoring import resize_frames

        frames = resize_frames(frames, size, size)
    else:
        frames = load_frames(p, size, max_frames=2)
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return video[None]


# what each conditioner reads at sampling, and the flags of `tcplug sample` that give it
_NEEDS = {"txt": "--caption TEXT", "state": "--state state.json", "depth": "--clip N", "skeleton": "--clip N",
          "flow": "--clip N", "first_frames": "--first-frame IMAGE",
          "static": "--static-mask IMAGE"}


def _check_conditions(model, args, batch: dict | None) -> None:
    """A conditioned model needs its conditions: name the flags that give the missing ones
    (and warn about a flag that the model does not read). ``model`` is a ``VideoDiffusion``."""
    from tcplug.module import TCPlugModule

    have = set(batch or {})
    missing: list[str] = []
    readers = [*model.conditioners, *([model.motion_lock] if model.motion_lock is not None else [])]
    for c in readers:
        name = TCPlugModule.name_of(c)
        for need in c.needs:
            options = need.split("|")
            if not have & set(options):
                flags = " or ".join(_NEEDS.get(k, f"a batch with {k!r}") for k in options if k in _NEEDS) or \
                    f"a batch with {need!r}"
                missing.append(f"{name} needs {flags}")
    if missing:
        raise TcplugError(
            f"this model is conditioned: {'; '.join(missing)} (or --clip N takes every condition from validation "
            "clip N of the recipe's data; `state.json` is described in the CLI reference)")
    if args.static_mask is not None and "static" not in {k for c in readers for need in c.needs
                                                         for k in need.split("|")}:
        print("tcplug sample: --static-mask is ignored: nothing in this model reads a static mask (a motion lock "
              "`mask` with source: static does)", file=sys.stderr)


def main(argv: Sequence[str]) -> int:
    from tcplug.module import TCPlugModule
    from tcplug.video import VideoWriter, to_uint8, write_video

    parser = argparse.ArgumentParser(
        prog="tcplug sample",
        description="Sample a video from a checkpoint. Models whose attention is causal with a bounded window "
        "are sampled chunk by chunk with the K/V frame buffer (memory bounded by the window, not by the length): "
        "conditioners roll their condition forward, experts and guidance run per chunk, the motion lock stays "
        "anchored to the first frame. Other models are sampled all at once.")
    parser.add_argument("--ckpt", required=True, help="a checkpoint written by tcplug fit (its recipe is inside)")
    parser.add_argument("--frames", type=int, required=True, help="frames to generate")
    parser.add_argument("--out", required=True, help="output .mp4")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk", type=int, default=None, help="frames per chunk (default: the training clip length)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the recipe's)")
    parser.add_argument("--size", type=int, default=None, help="frame size (default: the recipe's)")
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--caption", default=None, help="caption, for a caption-conditioned model")
    parser.add_argument("--state", default=None, help="state.json: the initial object state (physics_state)")
    parser.add_argument("--first-frame", default=None, metavar="IMAGE",
                        help="an image (or a video's first frames): what an image-to-video model (pixel_state) "
                        "starts from")
    parser.add_argument("--clip", type=int, default=None,
                        help="condition on validation clip N of the recipe's data (its depth, skeleton, state, "
                        "static mask and caption)")
    parser.add_argument("--static-mask", default=None, metavar="IMAGE",
                        help="white = static: the mask a motion lock (mask) ties to the first frame")
    parser.add_argument("--context", default=None, choices=["same_step", "clean"],
                        help="what each streamed chunk attends to: earlier frames at the same sampler step "
                        "(same_step: streamed = all at once for causal variants) or a K/V cache of the finished frames "
                        "(clean: conditions on what was generated); default: the recipe's model.stream_mode")
    parser.add_argument("--context-timestep", type=float, default=None, metavar="T",
                        help="with --context clean: the timestep finished frames are committed at (noise-augmented "
                        "context; default: the recipe's model.context_noise)")
    parser.add_argument("--no-drift", action="store_true",
                        help="do not measure the drift of a video longer than one chunk (by default its figures per "
                        "chunk go to OUT.drift.json and a plot to OUT.drift.png, against the recipe's validation "
                        "clips when its data can be read)")
    parser.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: "
                        "the recipe's model.guidance_scale)")
    args = parser.parse_args(list(argv))
    if args.frames < 1:
        raise TcplugError("--frames must be >= 1")
    if Path(args.out).suffix.lower() != ".mp4":
        if Path(args.out).suffix:
            raise TcplugError(f"--out {args.out}: tcplug sample writes .mp4 files; give a name ending in .mp4")
        args.out = f"{args.out}.mp4"
    model = TCPlugModule.from_checkpoint(args.ckpt)
    cfg = model.recipe
    data = cfg.get("data") or {}
    chunk = args.chunk or int(data.get("frames", 8))
    size = args.size or int(data.get("size", 32))
    batch = _conditioning_batch(args, cfg)
    _check_conditions(model.diffusion, args, batch)
    if model.can_stream:
        with VideoWriter(args.out, fps=args.fps) as writer:
            for video in model.stream(args.frames, size, size, chunk, steps=args.steps, seed=args.seed,
                                      progress=True, batch=batch, guidance_scale=args.guidance,
                                      context=args.context, context_timestep=args.context_timestep):
                writer.write(to_uint8(video[0]))
        print(f"wrote {writer.frames} frames to {args.out}")
    else:
        if args.frames > chunk:
            print("tcplug sample: sampling all at once: this model's attention looks at future frames (or has no "
                  "bounded window), so it cannot stream; memory grows with --frames", file=sys.stderr)
        video = model.generate(1, args.frames, size, size, steps=args.steps, seed=args.seed, batch=batch,
                               progress=True, guidance_scale=args.guidance)
        write_video(to_uint8(video[0]), args.out, fps=args.fps)
        print(f"wrote {video.shape[1]} frames to {args.out}")
    if args.frames >= 2 * chunk and chunk >= 2 and not args.no_drift:
        _write_drift(args.out, chunk, cfg)
    return 0


def _write_drift(out: str, chunk: int, cfg: dict) -> None:
    """The video's drift beside it: OUT.drift.json (figures per chunk, summary) and OUT.drift.png,
    against the recipe's validation clips when its data can be read."""
    from tcplug.metrics import drift
    from tcplug.scoring import load_frames

    frames = load_frames(out)
    reference = None
    try:
        from tcplug.data import VideoDataModule

        dm = VideoDataModule(**{**(cfg.get("data") or {}), "num_workers": 0})
        dm.prepare_data()
        dm.setup("validate")
        clips = []
        for b in dm.val_dataloader():
            clips += list(((b["video"].permute(0, 1, 3, 4, 2).numpy() + 1) * 127.5 + 0.5).clip(0, 255).astype("uint8"))
        reference = [c for c in clips if c.shape[1:3] == frames.shape[1:3]] or None
    except (TcplugError, OSError, ValueError) as exc:  # the drift is still measured, without the data's ratios
        print(f"tcplug sample: drift without the data's figures (the recipe's data cannot be read: {exc})",
              file=sys.stderr)
    report = drift.chunk_figures([frames], chunk, reference if reference and len(reference) >= 2 else None)
    base = Path(out).with_suffix("")
    Path(f"{base}.drift.json").write_text(json.dumps(drift.to_json(report)))
    drift.plot(report, f"{base}.drift.png", f"{Path(out).name}: per chunk of {chunk} frames")
    last = " ".join(f"{k}={v[0]:.3g}" for k, v in drift.to_json(report)["summary"].items() if v[0] is not None)
    print(f"drift (last quarter of the chunks against the first): {last}; per chunk in {base}.drift.json, "
          f"plot {base}.drift.png")
