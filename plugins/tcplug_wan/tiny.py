"""Tiny random Wan models: configs small enough for a CPU (after diffusers' own tests), and a
complete tiny model folder in diffusers layout, for tests, CPU recipes and the tutorial.

``python -m tcplug_wan.tiny OUT`` writes the folder (``transformer/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``; about 2 MB). Random weights: it trains and
samples like the real model's shapes, but it has learned nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tcplug_families.tiny import VOCAB, WORDS, tokenizer  # noqa: F401  (re-exported)

TEXT_DIM = 32
TRANSFORMER = dict(
    patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
    text_dim=TEXT_DIM, freq_dim=64, ffn_dim=64, num_layers=2, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
)
VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
SCHEDULER = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


def text_encoder(vocab: int = VOCAB):
    """A tiny random UMT5 encoder with ``d_model = TEXT_DIM``."""
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(vocab_size=vocab, d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                     relative_attention_num_buckets=8, relative_attention_max_distance=16)
    return UMT5EncoderModel(cfg)


def make_tiny_folder(out: str | Path, seed: int = 0, two_experts: bool = False) -> Path:
    """Write a tiny random Wan model folder with ``WanPipeline.save_pretrained``; returns it.
    ``two_experts`` adds ``transformer_2/`` and ``boundary_ratio`` 0.875 (Wan 2.2 layout)."""
    import torch
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )

    torch.manual_seed(seed)
    extra = {}
    if two_experts:
        extra = dict(transformer_2=WanTransformer3DModel(**TRANSFORMER), boundary_ratio=0.875)
    pipe = WanPipeline(
        tokenizer=tokenizer(), text_encoder=text_encoder(), vae=AutoencoderKLWan(**VAE),
        scheduler=UniPCMultistepScheduler(**SCHEDULER), transformer=WanTransformer3DModel(**TRANSFORMER), **extra,
    )
    out = Path(out)
    pipe.save_pretrained(out)
    return out


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tcplug_wan.tiny OUT_DIR")
    print(make_tiny_folder(sys.argv[1]))
