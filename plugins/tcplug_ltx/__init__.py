"""The LTX-Video model family as tcplug components, written against tcplug's public API and the
shared family pieces of :mod:`tcplug_families` (the same ones Wan uses), the way a third party
adds a model family.

- backbone ``ltx``: diffusers ``LTXVideoTransformer3DModel`` (packed tokens ``(B, T'·h·w, C)``,
  3D rotary embedding from the latent grid, per-token timesteps);
- latent ``ltx_vae``: ``AutoencoderKLLTXVideo``, normalised as ``LTXPipeline`` does
  (``(z - latents_mean) * scaling_factor / latents_std``), time compressed 8x (4x in tiny configs);
- conditioner ``ltx_text``: the model's T5 encoder (frozen) with its padding mask, or precomputed
  embeddings and masks.

Weights come only from a local diffusers folder (``transformer/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``); nothing is downloaded. Each component can instead be built
from a config dict (tiny random models for tests and CPU recipes: :mod:`tcplug_ltx.tiny`).
"""

from __future__ import annotations

from typing import Any

import torch
from tcplug_families import (
    FrameAttnProcessor,
    FrozenTextEncoder,
    FrozenVideoVAE,
    JointTokenBackbone,
    frame_positions,
    load_model,
)
from torch import Tensor, nn

from tcplug import AttentionVariant, TcplugError, hookimpl

__version__ = "0.1.0"


class LTXFrameAttnProcessor(FrameAttnProcessor):
    """Frame attention in LTX-Video's self-attention (``attn1``): LTX's projections, q/k RMS
    norms across heads and its rotary embedding (over the whole width, before the heads are
    split), then the tcplug variant."""

    def qkv(self, attn, hidden_states: Tensor, rotary: Any) -> tuple[Tensor, Tensor, Tensor]:
        from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        if rotary is not None:
            query, key = apply_rotary_emb(query, rotary), apply_rotary_emb(key, rotary)
        return tuple(y.unflatten(2, (attn.heads, -1)) for y in (query, key, value))

    def rotate(self, x: Tensor, rotary: Any) -> Tensor:
        from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

        return apply_rotary_emb(x.flatten(2), rotary).unflatten(2, (x.shape[2], -1))  # over the whole width


def _vae_compression(pretrained: str | None, subfolder: str = "vae") -> tuple[int, int] | None:
    """(temporal, spatial) compression of the folder's VAE, read from its config without
    allocating its weights; None without a folder or a VAE there."""
    from pathlib import Path

    if pretrained is None or not (Path(pretrained) / subfolder).is_dir():
        return None
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLLTXVideo

    with init_empty_weights():
        vae = AutoencoderKLLTXVideo.from_config(AutoencoderKLLTXVideo.load_config(Path(pretrained) / subfolder))
    return int(vae.temporal_compression_ratio), int(vae.spatial_compression_ratio)


class LTXBackbone(JointTokenBackbone):
    """LTX-Video's transformer (``LTXVideoTransformer3DModel``) as a tcplug backbone.

    Latents ``(B, T', C, h, w)`` are packed into frame-major tokens ``(B, T'·h·w, C)`` as
    ``LTXPipeline`` packs them (patch size 1, as every released LTX-Video) and unpacked after.
    Timesteps per clip ``(B,)``, per latent frame ``(B, T')`` or per token ``(B, T', N)``
    (``N = h·w``): the last two reach LTX as ``(B, T'·N)``, the per-token form its image-to-video
    pipeline uses. The 3D rotary embedding is computed from the latent grid with the pipeline's
    ``rope_interpolation_scale`` ``(c_t / frame_rate, c_s, c_s)`` (``c`` the VAE's compression).
    Text: ``context["text"]`` ``(B, L, caption_channels)`` and ``context["text_mask"]``
    ``(B, L)`` (T5 states and their padding mask) through LTX's own cross-attention; without
    text, a single zero token.

    ``attention`` installs a tcplug attention variant in every block's self-attention
    (:class:`LTXFrameAttnProcessor`); the same variants and names as on ``dit`` and ``wan``.
    ``context["residuals"]`` is added after each block (ControlNet-style conditioners).

    Args:
        pretrained: a local diffusers LTX-Video folder (its ``subfolder``, default ``transformer``).
        config: an ``LTXVideoTransformer3DModel`` config dict instead (random weights).
        dtype: ``float32`` (default), ``bfloat16`` or ``float16`` weights.
        gradient_checkpointing: recompute each block in the backward pass.
        storage_dtype: store the frozen weights in ``float8_e4m3fn`` (or ``float8_e5m2``,
            ``bfloat16``, ``float16``) and compute each layer in ``dtype`` (diffusers' layerwise
            casting): fp8 halves a bf16 model's weight memory; adapters, norms and embeddings are kept.
        offload: for sampling, keep the blocks' weights in host RAM (``cpu``) or in files under
            ``offload_dir`` (``disk``) and load one block at a time (diffusers' group offloading);
            refused in training (see :meth:`apply_offload`).
        offload_dir: the folder ``offload: disk`` writes the blocks' weights to.
        attention: one variant for every block (copied per block) or one per block; None keeps
            LTX's own full 3D attention.
        frame_rate: frames per second the rotary embedding assumes (``LTXPipeline`` default 25).
        vae_compression: ``[temporal, spatial]`` compression of the VAE (rotary scale); default:
            read from the folder's ``vae/``, else LTX-Video's ``[8, 32]``.
    """

    processor_cls = LTXFrameAttnProcessor
    family = "ltx"

    def __init__(self, pretrained: str | None = None, subfolder: str = "transformer", config: dict | None = None,
                 dtype: str | None = None, gradient_checkpointing: bool = False, storage_dtype: str | None = None,
                 offload: str | None = None, offload_dir: str | None = None,
                 attention: AttentionVariant | list[AttentionVariant] | None = None, frame_rate: float = 25.0,
                 vae_compression: list[int] | None = None) -> None:
        super().__init__()
        from diffusers import LTXVideoTransformer3DModel

        self.model = load_model(LTXVideoTransformer3DModel, "ltx backbone", pretrained, subfolder, config, dtype)
        cfg = self.model.config
        if cfg.patch_size != 1 or cfg.patch_size_t != 1:
            raise TcplugError(f"ltx backbone: patch_size {cfg.patch_size} / patch_size_t {cfg.patch_size_t}: only 1 "
                              "(every released LTX-Video) is supported")
        if (cfg.out_channels or cfg.in_channels) != cfg.in_channels:
            raise TcplugError("ltx backbone: in_channels != out_channels")
        if frame_rate <= 0:
            raise TcplugError(f"ltx backbone: frame_rate must be > 0, got {frame_rate}")
        self.in_channels = int(cfg.in_channels)
        self.patch_size = 1
        self.token_dim = int(cfg.num_attention_heads * cfg.attention_head_dim)
        self.num_blocks = int(cfg.num_layers)
        self.text_dim = int(cfg.caption_channels)
        self.pretrained = pretrained
        comp = vae_compression or _vae_compression(pretrained) or (8, 32)
        if len(comp) != 2:
            raise TcplugError(f"ltx backbone: vae_compression is [temporal, spatial], got {comp}")
        self.rope_scale = (float(comp[0]) / frame_rate, float(comp[1]), float(comp[1]))
        self._setup(attention, gradient_checkpointing, storage_dtype, offload, offload_dir)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.transformer_blocks

    def rotary_at(self, start: int, t: int, h: int, w: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """LTX's rotary embedding for latent frames ``start .. start + t`` (absolute positions), from
        the coordinates of just these frames (the rope's ``video_coords``, scaled as it scales its own
        grid), so a long video does not rebuild the whole prefix at every chunk."""
        rope = self.model.rope
        s = self.rope_scale
        f, y, x = torch.meshgrid(frame_positions(start, t, torch.float32).to(device),
                                 torch.arange(h, dtype=torch.float32, device=device),
                                 torch.arange(w, dtype=torch.float32, device=device), indexing="ij")
        coords = torch.stack([f * s[0] * rope.patch_size_t, y * s[1] * rope.patch_size, x * s[2] * rope.patch_size])
        return rope(torch.empty(1, 1, device=device), video_coords=coords.flatten(1)[None])

    def save_lora_weights(self, out: str, state_dict: dict[str, Tensor], format: str = "diffusers") -> None:
        """Write adapters (peft state dict of :attr:`lora_target`) as ``LTXPipeline.load_lora_weights`` reads them."""
        from diffusers import LTXPipeline

        LTXPipeline.save_lora_weights(out, transformer_lora_layers=state_dict)

    def timestep_schedule(self, scheduler: Any, steps: int, latent_shape: tuple[int, ...]) -> dict | None:
        """``LTXPipeline``'s sampler timesteps: ``sigmas = linspace(1, 1/steps, steps)`` and, for a
        scheduler with dynamic shifting, ``mu`` from the number of latent tokens."""
        import inspect

        import numpy as np
        from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift

        params = inspect.signature(scheduler.set_timesteps).parameters
        if "sigmas" not in params or "mu" not in params:
            return None  # not a flow-matching scheduler: its own defaults
        _, t, _, h, w = latent_shape
        cfg = scheduler.config
        mu = calculate_shift(t * h * w, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        return {"sigmas": np.linspace(1.0, 1 / steps, steps), "mu": mu}

    def run(self, x: Tensor, timesteps: Tensor, context: dict[str, Any]) -> Tensor:
        b, t, c, h, w = x.shape
        dtype = self.model.dtype
        text, mask = context.get("text"), context.get("text_mask")
        if text is None:
            text, mask = x.new_zeros(b, 1, self.text_dim), None
        if mask is None or mask.dim() == 3:  # a per-frame mask (per-shot captions): the blocks' attn2 take it
            mask = torch.ones(text.shape[:2], dtype=torch.bool, device=x.device)
        tokens = x.permute(0, 1, 3, 4, 2).reshape(b, t * h * w, c)  # LTXPipeline's packing, patch size 1
        out = self.model(hidden_states=tokens.to(dtype), encoder_hidden_states=text.to(dtype), timestep=timesteps,
                         encoder_attention_mask=mask.to(dtype), num_frames=t, height=h, width=w,
                         rope_interpolation_scale=self.rope_scale, return_dict=False)[0]
        return out.reshape(b, t, h, w, c).permute(0, 1, 4, 2, 3).to(x.dtype)


class LTXVAE(FrozenVideoVAE):
    """LTX-Video's VAE (``AutoencoderKLLTXVideo``): spatial ``x32``, temporal ``x8`` (``T = 8k + 1``
    pixel frames <-> ``k + 1`` latent frames). Latents are normalised exactly as ``LTXPipeline``
    does: ``(z - latents_mean) * scaling_factor / latents_std`` (the VAE's stored statistics);
    decode inverts it, and for a VAE with timestep conditioning (0.9.1+) decodes at
    ``decode_timestep`` with as much noise mixed in, as the pipeline does. Frozen.

    ``encode(video (B, T, 3, H, W)) -> (B, T', C, H/32, W/32)``; ``decode`` the inverse.

    Args:
        pretrained: a local diffusers LTX-Video folder (its ``subfolder``, default ``vae``).
        config: an ``AutoencoderKLLTXVideo`` config dict instead (random weights).
        encoder: with ``pretrained``: ``true`` keeps the encoder; ``null`` (default) loads it from
            the folder the first time pixels are encoded; ``false`` never.
        sample: encode to a sample of the posterior instead of its mode.
        dtype: ``float32`` (default), ``bfloat16`` or ``float16`` weights.
        decode_timestep: ``LTXPipeline``'s ``decode_timestep`` (its default 0).
    """

    vae_cls_name = "AutoencoderKLLTXVideo"
    what = "ltx_vae latent"
    encoder_attrs = ("encoder",)

    def __init__(self, pretrained: str | None = None, subfolder: str = "vae", config: dict | None = None,
                 encoder: bool | None = None, sample: bool = False, dtype: str | None = None,
                 decode_timestep: float = 0.0) -> None:
        super().__init__(pretrained, subfolder, config, encoder, sample, dtype)
        if not 0 <= decode_timestep <= 1:
            raise TcplugError(f"ltx_vae decode_timestep must be in [0, 1], got {decode_timestep}")
        vae = self.vae
        self.latent_channels = int(vae.config.latent_channels)
        self.downsample = int(vae.spatial_compression_ratio)
        self.temporal_compression = int(vae.temporal_compression_ratio)
        self.decode_timestep = float(decode_timestep)
        scale = float(vae.config.scaling_factor)
        self.register_buffer("mean", vae.latents_mean.detach().float().clone().view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("inv_std", scale / vae.latents_std.detach().float().clone().view(1, -1, 1, 1, 1),
                             persistent=False)

    def vae_decode(self, z: Tensor) -> Tensor:
        temb = None
        if self.vae.config.timestep_conditioning:
            s = self.decode_timestep
            temb = torch.full((z.shape[0],), s, device=z.device, dtype=z.dtype)
            if s > 0:
                z = (1 - s) * z + s * torch.randn_like(z)
        return self.vae.decode(z.to(self.vae.dtype), temb, return_dict=False)[0]


class LTXText(FrozenTextEncoder):
    """LTX-Video's text conditioning: the T5 encoder of the model folder (frozen), prompts
    tokenised to ``max_length`` with their padding mask exactly as ``LTXPipeline.encode_prompt``
    does (it is called), or precomputed ``text_emb`` / ``text_mask`` from the batch (shards made
    by ``tcplug data encode``); the encoder loads only if a batch has prompts and no embeddings.

    Context keys: ``text`` ``(B, L, caption_channels)``, ``text_mask`` ``(B, L)`` bool. The
    unconditional branch of guidance (and caption dropout) uses the negative prompt's embedding
    and mask (``LTXPipeline``'s default negative prompt is empty).

    Args:
        pretrained: a local diffusers LTX-Video folder (``text_encoder/`` and ``tokenizer/``).
        precomputed: never load the encoder: every batch must carry ``text_emb`` and ``text_mask``.
        negative_prompt: the negative prompt.
        negative_embeds: a ``.npy`` file of the negative prompt's embedding ``(L, D)`` (all its
            tokens attended: a file carries no mask).
        max_length: tokens per prompt (``LTXPipeline`` default 128).
        dropout: probability of training on the negative prompt instead (for guidance).
        per_shot: also each shot's own caption, seen by that shot's frames only
            (:meth:`~tcplug_families.FrozenTextEncoder.shot_context`); ``text_mask`` is then
            ``(B, T', L)`` per latent frame.
    """

    what = "ltx_text"
    encoder_cls_name = "T5EncoderModel"
    uses_mask = True

    def __init__(self, pretrained: str | None = None, precomputed: bool = False, negative_prompt: str = "",
                 negative_embeds: str | None = None, max_length: int = 128, dropout: float = 0.1,
                 per_shot: bool = False) -> None:
        super().__init__(pretrained, precomputed, negative_prompt, negative_embeds, max_length, dropout, per_shot)

    def encode_with(self, tokenizer, encoder, prompts, device):
        from diffusers import LTXPipeline

        pipe = LTXPipeline(scheduler=None, vae=None, text_encoder=encoder, tokenizer=tokenizer, transformer=None)
        embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False,
                                                max_sequence_length=self.max_length, device=device)
        return embeds, mask


@hookimpl
def tcplug_register_components(register):
    register(LTXBackbone, name="ltx")
    register(LTXVAE, name="ltx_vae")
    register(LTXText, name="ltx_text")
