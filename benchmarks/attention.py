"""Attention variants: forward+backward time and peak memory at the same shapes, against
diffusers' cross-frame processors on the same layer, and the peak memory of a whole `dit`
training step per variant.

Prints one JSON line. Usage:
  python benchmarks/attention.py            # full sizes
  python benchmarks/attention.py --smoke    # tiny sizes, for CI (no timing claims)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _mem import peak_mib  # noqa: E402

VARIANTS = {
    "per_frame": {}, "first_frame": {}, "sparse_causal": {}, "cross_frame_w1": {"window": 1},
    "cross_frame_w2_anchor": {"window": 2, "anchor": True}, "temporal": {}, "full3d": {},
    # compressed history: the 6 frames before the window pooled 2x and 4x, against the same span uncompressed
    "cross_frame_w2_anchor_history": {"window": 2, "anchor": True, "history": [2, 4]},
    "cross_frame_w8_anchor": {"window": 8, "anchor": True},
}


def registry_name(key: str) -> str:
    return "cross_frame" if key.startswith("cross_frame") else key


def timed(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def prepare_variant(key: str, shape: tuple):
    """A closure running forward+backward of one variant on fixed inputs."""
    import tcplug

    b, t, h, n, d = shape
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a = tcplug.get_component("attention", registry_name(key))(**VARIANTS[key]).to(dev)
    qkv = torch.randn(3, b, h, t, n, d, device=dev, requires_grad=True)  # heads-first, as the dit makes it

    def run():
        q, k, v = (x.transpose(1, 2) for x in qkv)
        a(q, k, v).sum().backward()

    return run


def prepare_layer(kind: str, shape: tuple):
    """A closure running forward+backward of a diffusers Attention layer with a processor."""
    from diffusers.models.attention_processor import Attention

    b, t, h, n, d = shape
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    attn = Attention(query_dim=h * d, heads=h, dim_head=d).to(dev)
    attn.set_processor(make_processor(kind, b, t))
    x = torch.randn(b * t, n, h * d, device=dev, requires_grad=True)

    def run():
        attn(x).sum().backward()

    return run


def make_processor(kind: str, b: int, t: int):
    if kind == "tcplug_first_frame":
        from tcplug.diffusers import attn_processor

        return attn_processor("first_frame", num_frames=t, batch_size=b)
    from diffusers.pipelines.deprecated.text_to_video_synthesis import (
        pipeline_text_to_video_zero as z,
    )

    return z.CrossFrameAttnProcessor2_0(batch_size=b) if kind == "diffusers_CrossFrameAttnProcessor2_0" \
        else z.CrossFrameAttnProcessor(batch_size=b)


def prepare_dit(key: str, cfg: dict):
    """A closure running one whole `dit` training step (forward + backward) of a variant."""
    import tcplug
    from tcplug.module import TCPlugModule

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    att = tcplug.get_component("attention", registry_name(key))(**VARIANTS[key])
    net = tcplug.get_component("backbone", "dit")(in_channels=3, patch_size=cfg["patch"], dim=cfg["dim"],
                                                  depth=cfg["depth"], heads=cfg["heads"], attention=att)
    m = TCPlugModule(backbone=net).to(dev)
    batch = {"video": torch.rand(cfg["batch"], cfg["frames"], 3, cfg["size"], cfg["size"], device=dev) * 2 - 1}

    def run():
        total, _ = m.training_losses(batch)
        total.backward()

    return run


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args()
    shape = (2, 8, 4, 256, 32)  # B, T, heads, tokens/frame (16x16), head dim
    dit_cfg = {"batch": 4, "frames": 8, "size": 64, "patch": 4, "dim": 128, "depth": 4, "heads": 4}
    if args.smoke:
        shape, args.reps = (1, 3, 2, 16, 8), 1
        dit_cfg = {"batch": 1, "frames": 3, "size": 16, "patch": 4, "dim": 32, "depth": 1, "heads": 2}
    out = {"bench": "attention", "device": "cuda" if torch.cuda.is_available() else "cpu",
           "machine": platform.machine(), "threads": torch.get_num_threads(),
           "shape_BTHND": list(shape), "variants": {}, "diffusers_layer": {}, "dit_step": {}}
    for key in VARIANTS:
        out["variants"][key] = {"fwd_bwd_ms": round(timed(prepare_variant(key, shape), args.reps), 3),
                                "peak_mib": peak_mib(prepare_variant(key, shape))}
    for kind in ("tcplug_first_frame", "diffusers_CrossFrameAttnProcessor2_0", "diffusers_CrossFrameAttnProcessor"):
        out["diffusers_layer"][kind] = {"fwd_bwd_ms": round(timed(prepare_layer(kind, shape), args.reps), 3),
                                        "peak_mib": peak_mib(prepare_layer(kind, shape))}
    out["dit_step"]["config"] = dit_cfg
    for key in ("per_frame", "first_frame", "cross_frame_w1", "cross_frame_w2_anchor", "full3d"):
        out["dit_step"][key] = {"peak_mib": peak_mib(prepare_dit(key, dit_cfg))}
    base = out["dit_step"]["per_frame"]["peak_mib"]
    for key in ("first_frame", "cross_frame_w1", "cross_frame_w2_anchor", "full3d"):
        out["dit_step"][key]["ratio_to_per_frame"] = round(out["dit_step"][key]["peak_mib"] / base, 3) if base else None
    print(json.dumps(out))


if __name__ == "__main__":
    main()
