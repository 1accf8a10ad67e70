"""Attention time and peak memory per variant inside a real model family's block: the
self-attention (``attn1``: projections, q/k norms, rotary embedding, attention, output
projection) of one Wan2.1-1.3B-shaped block at 480x832x33 frames (9 latent frames x 30x52
tokens = 14,040 tokens), forward + backward, bf16 on a GPU (forward only on a CPU, where
``flex_attention`` has no backward).

Rows per variant and path:
- ``model``: the model's own processor (dense 3D attention over every token);
- ``fast``: the tcplug variant's training path (gathers only the frames the rule shows);
- ``flex``: the general path through ``flex_attention`` with a block-sparse frame mask (compiled
  on a GPU): hidden frame blocks are skipped;
- ``sdpa_masked``: the general path with a dense boolean mask (computes every block, masks some).

Prints one JSON line. Usage:
  python benchmarks/family_attention.py                     # GPU: Wan2.1-1.3B block, bf16
  python benchmarks/family_attention.py --family ltx        # an LTX-Video (2B) block, 512x704x49
  python benchmarks/family_attention.py --smoke             # tiny sizes, CPU, fp32, 1 step
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

VARIANTS = {
    "per_frame": {},
    "first_frame": {},
    "sparse_causal": {},
    "cross_frame": {"window": 2, "anchor": True},
    "full3d": {},
}
WAN_13B = dict(patch_size=[1, 2, 2], num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
               text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=1, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
LTX_2B = dict(in_channels=128, out_channels=128, num_attention_heads=32, attention_head_dim=64,
              cross_attention_dim=2048, num_layers=1, qk_norm="rms_norm_across_heads", caption_channels=4096)
TINY = {"wan": dict(WAN_13B, num_attention_heads=2, attention_head_dim=16, text_dim=32, freq_dim=32, ffn_dim=64),
        "ltx": dict(LTX_2B, in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8,
                    cross_attention_dim=16, caption_channels=32)}
# latent grids (T', h, w): Wan 480x832x33 -> 9 x 60 x 104 (patch 2: 30 x 52 tokens per frame);
# LTX 512x704x49 -> 7 x 16 x 22 (patch 1)
GRIDS = {"wan": (9, 60, 104), "ltx": (7, 16, 22)}
SMOKE_GRIDS = {"wan": (3, 4, 4), "ltx": (3, 2, 2)}


class _General(torch.nn.Module):
    """Runs a variant's general (masked) path even in training, with a chosen backend."""

    def __init__(self, variant, backend: str) -> None:
        super().__init__()
        self.variant, self.backend = variant, backend
        self.causal = variant.causal

    def forward(self, q, k, v, kv_index=None):
        self.variant.backend = self.backend
        return self.variant.general(q, k, v, torch.arange(k.shape[1], device=k.device))


def build(family: str, variant: str | None, path: str, cfg: dict, device: str, dtype: torch.dtype):
    import tcplug

    att = None
    if variant is not None:
        att = tcplug.get_component("attention", variant)(**VARIANTS[variant])
        if path in ("flex", "sdpa_masked"):
            att = _General(att, "flex" if path == "flex" else "sdpa")
    extra = {"vae_compression": [8, 32]} if family == "ltx" else {}
    bb = tcplug.get_component("backbone", family)(config=cfg, attention=att, **extra)
    return bb.to(device, dtype)


def attn_inputs(bb, family: str, grid: tuple[int, int, int], device: str, dtype: torch.dtype):
    """The block's self-attention input ``(1, L, D)`` and the model's rotary embedding for it."""
    t, h, w = grid
    p = bb.patch_size
    n = (h // p) * (w // p)
    hidden = torch.randn(1, t * n, bb.token_dim, device=device, dtype=dtype, requires_grad=True)
    for proc in bb._processors:
        proc.grid = (t, n)
    if family == "wan":
        rotary = bb.model.rope(torch.empty(1, 1, t, h, w, device=device))
    else:
        rotary = bb.model.rope(torch.empty(1, 1, device=device), t, h, w, bb.rope_scale)
    return hidden, rotary


def measure(family: str, variant: str | None, path: str, args, cfg: dict, grid, device: str) -> dict:
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" and args.precision == "bf16" else torch.float32
    bb = build(family, variant, path, cfg, device, dtype)
    backward = device == "cuda"
    attn = bb.blocks[0].attn1
    hidden, rotary = attn_inputs(bb, family, grid, device, dtype)

    def step():
        if not backward:  # flex_attention has no backward on a CPU: forward only there
            with torch.no_grad():
                attn(hidden, None, None, rotary)
            return
        attn(hidden, None, None, rotary).float().pow(2).mean().backward()
        hidden.grad = None

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return {"variant": variant or "model", "path": path, "ms": round(statistics.median(times) * 1e3, 2),
            "peak_mib": peak_mib(step)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=["wan", "ltx"], default="wan")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--paths", nargs="+", default=["fast", "flex", "sdpa_masked"],
                   choices=["fast", "flex", "sdpa_masked"])
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    cfg = TINY[args.family] if args.smoke else (WAN_13B if args.family == "wan" else LTX_2B)
    grid = SMOKE_GRIDS[args.family] if args.smoke else GRIDS[args.family]
    if args.smoke:
        args.steps, args.warmup = 1, 0
    rows = [measure(args.family, None, "model", args, cfg, grid, device)]
    for v in args.variants:
        for path in args.paths:
            rows.append(measure(args.family, v, path, args, cfg, grid, device))
            print(json.dumps(rows[-1]), file=sys.stderr)
    print(json.dumps({"bench": "family_attention", "family": args.family, "device": device,
                      "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
                      "machine": f"{platform.machine()} {platform.system()}", "torch": torch.__version__,
                      "precision": args.precision if device == "cuda" else "fp32", "grid": grid,
                      "pass": "forward + backward" if device == "cuda" else "forward", "smoke": args.smoke,
                      "rows": rows}))


if __name__ == "__main__":
    main()
