"""``tcplug export``: a checkpoint's trained weights in the model family's own format."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from tcplug.errors import TcplugError


def main(argv: Sequence[str]) -> int:
    from tcplug.lora import export_lora
    from tcplug.module import TCPlugModule

    parser = argparse.ArgumentParser(
        prog="tcplug export", description="write a checkpoint's trained weights in the model family's own format")
    parser.add_argument("ckpt", help="a checkpoint of `tcplug fit` (e.g. RUN/checkpoints/last.ckpt)")
    parser.add_argument("--lora", metavar="OUT", required=True,
                        help="write the LoRA adapters to the folder OUT (e.g. what WanPipeline.load_lora_weights reads)")
    parser.add_argument("--format", default=None,
                        help="the adapter file format, one the family writes (default: its first, diffusers; "
                             "Wan also writes `original`, the Wan repository's keys that ComfyUI loads)")
    parser.add_argument("--overwrite", action="store_true", help="replace what a non-empty folder OUT holds")
    args = parser.parse_args(list(argv))
    out = Path(args.lora)
    if out.exists() and not out.is_dir():
        raise TcplugError(f"--lora {out} is a file: give a folder (the adapters are written into it)")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise TcplugError(f"--lora {out} is not empty: give another folder, or --overwrite to replace what it holds")
    model = TCPlugModule.from_checkpoint(args.ckpt).diffusion
    if model.lora is None:
        raise TcplugError(f"{args.ckpt}: the recipe trained no LoRA adapters (model.lora is not set)")
    if len(model.experts) == 1:
        count = export_lora(model.backbone, args.lora, args.format)
        print(f"wrote {count} LoRA tensors to {args.lora}")
        return 0
    for i, expert in enumerate(model.experts):  # expert 0 takes the highest noise
        out = Path(args.lora) / f"expert_{i}"
        count = export_lora(expert, str(out), args.format)
        print(f"wrote {count} LoRA tensors of expert {i} to {out}")
    return 0
