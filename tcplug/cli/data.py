"""``tcplug data synth|ingest|encode|inspect``: make, ingest, precompute and inspect shards."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

from tcplug.errors import TcplugError


def _write_mode(parser) -> None:
    """--append / --overwrite: what to do with a folder that already holds shards (default: refuse)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--append", dest="mode", action="store_const", const="append", default="new",
                       help="add to the shards already in --out (the numbering continues)")
    group.add_argument("--overwrite", dest="mode", action="store_const", const="overwrite",
                       help="replace the shards already in --out")


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="tcplug data", description="Make, ingest and inspect webdataset shards.")
    sub = parser.add_subparsers(dest="action", required=True)
    synth = sub.add_parser("synth", help="write the synthetic world (exact flow, depth, keypoints, state) as shards")
    synth.add_argument("--out", required=True)
    synth.add_argument("--clips", type=int, default=256)
    synth.add_argument("--frames", type=int, default=8)
    synth.add_argument("--size", type=int, default=32)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--shapes", type=int, default=2)
    synth.add_argument("--gravity", type=float, default=0.0, help="pixels/frame^2 (rounded)")
    synth.add_argument("--format", choices=["npy", "mp4"], default="npy", help="frames as exact npy or mp4")
    synth.add_argument("--shard-size", type=int, default=64, help="clips per shard")
    synth.add_argument("--shots", type=int, default=1,
                       help="shots of one scene per clip (cuts between cameras; --frames frames each)")
    synth.add_argument("--stride", type=int, nargs="+", default=[1],
                       help="render every STRIDE-th step of the simulated world (keyframe clips; one camera only); "
                            "several: the clips take them in turn (a mixture, batched one stride at a time)")
    synth.add_argument("--world", choices=["simple", "textured"], default="simple",
                       help="difficulty: smooth background and flat shapes, or textured ones")
    _write_mode(synth)
    ing = sub.add_parser("ingest", help="real videos -> clips with estimated flow and occlusion")
    ing.add_argument("videos", nargs="+", metavar="VIDEO")
    ing.add_argument("--out", required=True)
    ing.add_argument("--frames", type=int, default=8)
    ing.add_argument("--size", type=int, default=64)
    ing.add_argument("--stride", type=int, default=1, help="take every STRIDE-th source frame")
    ing.add_argument("--format", choices=["npy", "mp4"], default="npy")
    ing.add_argument("--shard-size", type=int, default=64)
    _write_mode(ing)
    enc = sub.add_parser("encode", help="precompute a recipe's VAE latents and text embeddings into new shards")
    enc.add_argument("--config", action="append", required=True, metavar="RECIPE",
                     help="the recipe whose latent design and conditioners encode (repeat to overlay)")
    enc.add_argument("--shards", required=True, help="input shards (a folder, a tar, or a brace pattern)")
    enc.add_argument("--out", required=True, help="output folder (finished shards there are skipped: resumable)")
    enc.add_argument("--batch-size", type=int, default=4)
    enc.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="stored precision")
    enc.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    enc.add_argument("--rank", type=int, default=None, help="this process's rank (default: $RANK or 0)")
    enc.add_argument("--world", type=int, default=None, help="number of processes (default: $WORLD_SIZE or 1)")
    ins = sub.add_parser("inspect", help="clip count, keys, shapes, unreadable samples")
    ins.add_argument("dir")
    ins.add_argument("--json", action="store_true")
    args = parser.parse_args(list(argv))

    if args.action == "synth":
        from tqdm.auto import tqdm

        from tcplug.data.shards import check_out_folder, encode_sample, write_shards
        from tcplug.data.shots import make_shots
        from tcplug.data.synthetic import make_clip

        if args.clips < 1 or args.frames < 2 or args.size < 8 or args.shard_size < 1 or args.shots < 1 \
                or min(args.stride) < 1 or (max(args.stride) > 1 and args.shots > 1):
            raise TcplugError("need --clips >= 1, --frames >= 2, --size >= 8, --shard-size >= 1, --shots >= 1, "
                              "--stride >= 1 (and --stride 1 with --shots)")
        check_out_folder(args.out, args.mode)  # before any clip is made

        def clip(i: int) -> dict:
            if args.shots > 1:
                return make_shots(args.seed, i, args.shots, args.frames, args.size, args.shapes, args.gravity,
                                  world=args.world)
            return make_clip(args.seed, i, args.frames, args.size, args.shapes, args.gravity, world=args.world,
                             stride=stride(i))

        def stride(i: int) -> int:
            return args.stride[i % len(args.stride)]

        samples = (encode_sample(f"clip{i:07d}", clip(i), args.format,
                                 {"source": "synthetic", "seed": args.seed, "index": i,
                                  **({"shots": args.shots} if args.shots > 1 else {}),
                                  **({"stride": stride(i)} if stride(i) > 1 else {})})
                   for i in tqdm(range(args.clips), desc="synth", unit="clip"))
        shards = write_shards(args.out, samples, maxcount=args.shard_size, mode=args.mode)
        print(f"wrote {args.clips} clips in {len(shards)} shard(s) to {args.out}")
        return 0
    if args.action == "encode":
        from tcplug.data.encode import encode_shards

        rank = args.rank if args.rank is not None else int(os.environ.get("RANK", 0))
        world = args.world if args.world is not None else int(os.environ.get("WORLD_SIZE", 1))
        if not 0 <= rank < world or args.batch_size < 1:
            raise TcplugError(f"need 0 <= --rank < --world and --batch-size >= 1 (got rank {rank}, world {world})")
        if args.device is None:
            import torch

            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        report = encode_shards(args.config, args.shards, args.out, args.batch_size, args.dtype, rank, world,
                               args.device)
        for bad in report["bad"]:
            print(f"  BAD {bad['shard']} key={bad.get('key')}: {bad['error']}")
        print(f"encoded {report['clips']} clips into {report['shards']} shard(s) in {args.out}"
              f" ({report['skipped_shards']} already done)")
        return 1 if report["bad"] else 0
    if args.action == "ingest":
        from tcplug.data.ingest import ingest

        count, errors = ingest(args.videos, args.out, args.frames, args.size, args.stride, args.shard_size,
                               args.format, mode=args.mode)
        print(f"wrote {count} clips to {args.out}; {len(errors)} file(s) failed")
        return 1 if count == 0 else 0
    from tcplug.data.shards import inspect_shards

    report = inspect_shards(args.dir)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{args.dir}: {report['shards']} shard(s), {report['clips']} readable clip(s)")
        video = report["shapes"].get("video")
        for k, n in sorted(report["keys"].items()):
            name = "video" if k.startswith("frames.") else k.split(".")[0]
            shape = report["shapes"].get(name)
            stored = f"({video[0]}, {video[2]}, {video[3]}, 3) uint8 " if name == "video" and video else ""
            print(f"  {k:<14} {n:>6} sample(s)  {stored}{f'-> batch[{name!r}] {shape}' if shape else ''}")
        for bad in report["bad"]:
            print(f"  BAD {bad['shard']} key={bad['key']}: {bad['error']}")
    return 1 if report["bad"] else 0
