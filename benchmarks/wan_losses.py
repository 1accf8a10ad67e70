"""The cost of temporal losses through a video VAE: one training step (forward + backward) of a
Wan model with `denoise` alone, and with `flow_warp` / `perceptual_temporal` on the decoded
prediction (whole batch, or one clip) or in latent space (flows summed
over each latent frame's span). Random weights; shapes from the tiny recipe, larger with
`--size`/`--frames`. Median step time and peak memory of torch's allocations.

Prints one JSON line. Usage:
  python benchmarks/wan_losses.py [--size 64] [--frames 17] [--batch 2] [--steps 5]
  python benchmarks/wan_losses.py --smoke
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _mem import peak_mib  # noqa: E402

VAE = dict(base_dim=32, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True])
TRANSFORMER = dict(patch_size=[1, 2, 2], num_attention_heads=4, attention_head_dim=32, in_channels=16,
                   out_channels=16, text_dim=32, freq_dim=64, ffn_dim=256, num_layers=4, cross_attn_norm=True,
                   qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
VARIANTS = {
    "denoise only": [],
    "flow_warp, pixels, whole batch": [("flow_warp", {"space": "pixel"})],
    "flow_warp, pixels, 1 clip": [("flow_warp", {"space": "pixel", "max_clips": 1})],
    "flow_warp, latent space": [("flow_warp", {"space": "latent"})],
    "perceptual_temporal (discriminator features), whole batch": [("perceptual_temporal", {"features": "discriminator"})],
    "perceptual_temporal, 1 clip": [("perceptual_temporal", {"features": "discriminator", "max_clips": 1})],
}


def build(terms, vae_cfg, tr_cfg):
    import tcplug
    from tcplug.module import TCPlugModule

    get = tcplug.get_component
    torch.manual_seed(0)
    losses = [get("loss", "denoise")()] + [get("loss", name)(**kw) for name, kw in terms]
    disc = get("discriminator", "conv3d")(channels=16) if any(n == "perceptual_temporal" for n, _ in terms) else None
    return TCPlugModule(backbone=get("backbone", "wan")(config=tr_cfg), latent=get("latent", "wan_vae")(config=vae_cfg),
                        losses=losses, discriminator=disc, noise="flow_matching", prediction_type="flow").train()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    vae_cfg, tr_cfg = dict(VAE), dict(TRANSFORMER)
    if args.smoke:
        args.size, args.frames, args.batch, args.steps = 32, 5, 1, 2
        vae_cfg.update(base_dim=8, dim_mult=[1, 1, 1, 1])
        tr_cfg.update(num_layers=1, ffn_dim=32)
    from tcplug.data import make_clip

    clips = [make_clip(0, i, args.frames, args.size) for i in range(args.batch)]
    batch = {
        "video": torch.stack([torch.from_numpy(c["frames"]).permute(0, 3, 1, 2).float() / 127.5 - 1 for c in clips]),
        "flow": torch.stack([torch.from_numpy(c["flow"]).permute(0, 3, 1, 2).float() for c in clips]),
        "occ": torch.stack([torch.from_numpy(c["occ"]).float()[:, None] for c in clips]),
    }
    rows = {}
    for label, terms in VARIANTS.items():
        model = build(terms, vae_cfg, tr_cfg)

        def step(model=model):
            model.zero_grad(set_to_none=True)
            total, _ = model.training_losses(batch)
            total.backward()

        step()  # warm-up
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        rows[label] = {"ms_per_step": round(statistics.median(times) * 1000, 1), "peak_mib": peak_mib(step)}
    print(json.dumps({"bench": "wan_losses", "machine": platform.machine(), "threads": torch.get_num_threads(),
                      "device": "cpu", "size": args.size, "frames": args.frames, "batch": args.batch,
                      "steps": args.steps, "rows": rows}))


if __name__ == "__main__":
    main()
