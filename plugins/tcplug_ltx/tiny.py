"""Tiny random LTX-Video models: configs small enough for a CPU (after diffusers' own tests), and
a complete tiny model folder in diffusers layout, for tests, CPU recipes and the docs.

``python -m tcplug_ltx.tiny OUT`` writes the folder (``transformer/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``). Random weights: it trains and samples with the
real model's code path, but it has learned nothing. The VAE compresses 4x in space and time
(LTX-Video's own: 32x and 8x) so that small clips fit; its latent statistics are random, not 0/1,
so the pipeline's normalisation is exercised.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tcplug_families.tiny import VOCAB, tokenizer

TEXT_DIM = 32
TRANSFORMER = dict(
    in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
    num_layers=2, qk_norm="rms_norm_across_heads", caption_channels=TEXT_DIM,
)
VAE = dict(
    latent_channels=8, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
    layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
    spatio_temporal_scaling=(True, True, False, False), decoder_spatio_temporal_scaling=(True, True, False, False),
    decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4, upsample_factor=(1,) * 4,
    timestep_conditioning=False, patch_size=1, patch_size_t=1, encoder_causal=True, decoder_causal=False,
    scaling_factor=1.5,
)
#: LTX-Video 0.9.x's scheduler: flow matching, shift from the token count (mu), terminal shift
SCHEDULER = dict(use_dynamic_shifting=True, base_image_seq_len=1024, max_image_seq_len=4096, base_shift=0.95,
                 max_shift=2.05, shift_terminal=0.1)
COMPRESSION = (4, 4)  # (temporal, spatial) of VAE above


def text_encoder(vocab: int = VOCAB):
    """A tiny random T5 encoder with ``d_model = TEXT_DIM``."""
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=vocab, d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                   relative_attention_num_buckets=8, relative_attention_max_distance=16)
    return T5EncoderModel(cfg)


def vae(seed: int = 0):
    """The tiny VAE with random (non-trivial) ``latents_mean`` / ``latents_std``."""
    import torch
    from diffusers import AutoencoderKLLTXVideo

    torch.manual_seed(seed)
    model = AutoencoderKLLTXVideo(**VAE)
    g = torch.Generator().manual_seed(seed + 1)
    model.latents_mean.copy_(0.3 * torch.randn(VAE["latent_channels"], generator=g))
    model.latents_std.copy_(0.5 + torch.rand(VAE["latent_channels"], generator=g))
    return model


def make_tiny_folder(out: str | Path, seed: int = 0) -> Path:
    """Write a tiny random LTX-Video model folder with ``LTXPipeline.save_pretrained``; returns it."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

    torch.manual_seed(seed)
    pipe = LTXPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae(seed), text_encoder=text_encoder(),
        tokenizer=tokenizer(), transformer=LTXVideoTransformer3DModel(**TRANSFORMER),
    )
    out = Path(out)
    pipe.save_pretrained(out)
    return out


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tcplug_ltx.tiny OUT_DIR")
    print(make_tiny_folder(sys.argv[1]))
