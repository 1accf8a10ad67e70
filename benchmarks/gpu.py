"""GPU efficiency of the `dit` training step at the GPU preset's size: model FLOP utilisation
(MFU) and peak memory per attention variant, with bf16 autocast, `torch.compile` and
activation checkpointing as options.

FLOPs of one forward + backward are counted by `torch.utils.flop_counter.FlopCounterMode`
(matmuls and scaled-dot-product attention, as the model defines them); time per step is
the median of timed steps after warm-up, synchronised; MFU = FLOPs / time / peak, with the
peak of the device's dense bf16 (or fp32) tensor throughput (`--peak-tflops`, default: the
H100/H200 SXM figure, 989 TFLOP/s bf16 dense).

Prints one JSON line. Usage:
  python benchmarks/gpu.py                                  # GPU preset size, bf16, every variant
  python benchmarks/gpu.py --compile --checkpointing --variants per_frame cross_frame
  python benchmarks/gpu.py --smoke                          # tiny sizes, CPU, fp32, 2 steps
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _mem import peak_mib  # noqa: E402

VARIANTS = {
    "per_frame": {},
    "first_frame": {},
    "cross_frame": {"window": 2, "anchor": True},
    "temporal": {"causal": True, "window": 4},
    "full3d": {},
}
PEAK_TFLOPS = {"bf16": 989.0, "fp32": 67.0}  # H100/H200 SXM: dense bf16 tensor cores; fp32 (non-tensor)


def build(variant: str, size: dict, checkpointing: bool, device: str):
    import tcplug

    att = tcplug.get_component("attention", variant)(**VARIANTS[variant])
    net = tcplug.get_component("backbone", "dit")(in_channels=size["channels"], patch_size=size["patch"],
                                                  dim=size["dim"], depth=size["depth"], heads=size["heads"],
                                                  attention=att, gradient_checkpointing=checkpointing)
    return net.to(device)


def step_fn(net, opt, x, t, autocast):
    def step():
        with autocast():
            loss = net(x, t).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(variant: str, args, size: dict, device: str) -> dict:
    torch.manual_seed(0)
    net = build(variant, size, args.checkpointing, device)
    if args.compile:
        net.compile()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device == "cuda")
    b, f, c, h = size["batch"], size["frames"], size["channels"], size["latent"]
    x = torch.randn(b, f, c, h, h, device=device)
    t = torch.randint(0, 1000, (b,), device=device)
    bf16 = args.precision == "bf16" and device == "cuda"

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()

    step = step_fn(net, opt, x, t, autocast)
    from torch.utils.flop_counter import FlopCounterMode

    for _ in range(args.warmup):  # compile, cudnn autotune, allocator warm-up
        step()
    sync(device)
    counter = FlopCounterMode(display=False)
    with counter:  # counts matmuls and attention; the optimizer's elementwise update adds none
        step()
    flops = counter.get_total_flops()
    times = []
    for _ in range(args.steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    peak = args.peak_tflops or PEAK_TFLOPS["bf16" if bf16 else "fp32"]
    mem = peak_mib(step)
    return {"variant": variant, "step_ms": round(sec * 1e3, 2), "tflop_per_step": round(flops / 1e12, 4),
            "achieved_tflops": round(flops / sec / 1e12, 2), "mfu": round(flops / sec / (peak * 1e12), 4),
            "peak_mib": mem, "params_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing of every dit block")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak for MFU")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    # the GPU preset (recipes/presets/gpu.yaml on full.yaml): dit 384 x 12 blocks, 6 heads, 16 frames
    # of 64 x 64 through the two-tier latent (32 x 32 x 4), patch 2: 256 tokens per frame, batch 16
    size = {"dim": 384, "depth": 12, "heads": 6, "frames": 16, "latent": 32, "channels": 4, "patch": 2, "batch": 16}
    if args.smoke:
        size = {"dim": 32, "depth": 1, "heads": 2, "frames": 2, "latent": 8, "channels": 4, "patch": 2, "batch": 1}
        args.steps, args.warmup, args.compile = 2, 1, False
    rows = [measure(v, args, size, device) for v in args.variants]
    name = torch.cuda.get_device_name() if device == "cuda" else f"{platform.machine()} CPU"
    print(json.dumps({"bench": "gpu", "device": name, "precision": args.precision if device == "cuda" else "fp32",
                      "compile": args.compile, "checkpointing": args.checkpointing, "size": size,
                      "torch": torch.__version__, "rows": rows}))


if __name__ == "__main__":
    main()
