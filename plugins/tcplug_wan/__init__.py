"""The Wan model family (Wan 2.1 / 2.2) as tcplug components, written against tcplug's public
API only, the way a third party adds a model family.

- backbone ``wan``: diffusers ``WanTransformer3DModel``;
- latent ``wan_vae``: ``AutoencoderKLWan``, normalised as ``WanPipeline`` does, time compressed 4x;
- conditioner ``wan_text``: the model's UMT5 text encoder (frozen), or precomputed embeddings.

Weights come only from a local diffusers folder (``transformer/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``); nothing is downloaded. Each component can instead be built
from a config dict (tiny random models for tests and CPU recipes).
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


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Wan's rotary embedding on ``x (B, L, heads, D)`` with ``cos, sin (1, L, 1, D)`` (the
    interleaved-pair form ``WanAttnProcessor`` applies)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanFrameAttnProcessor(FrameAttnProcessor):
    """Frame attention in Wan's self-attention (``attn1``): Wan's projections, q/k RMS norms and
    3D rotary embedding (per head), then the tcplug variant."""

    def qkv(self, attn, hidden_states: Tensor, rotary: Any) -> tuple[Tensor, Tensor, Tensor]:
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (y.unflatten(2, (attn.heads, -1)) for y in (query, key, value))
        if rotary is not None:
            query, key = apply_rotary(query, *rotary), apply_rotary(key, *rotary)
        return query, key, value

    def rotate(self, x: Tensor, rotary: Any) -> Tensor:
        return apply_rotary(x, *rotary)


#: the name the Wan docs and recipes use for Wan's frame-attention processor
FrameAttnProcessor = WanFrameAttnProcessor


class WanBackbone(JointTokenBackbone):
    """Wan's diffusion transformer (``WanTransformer3DModel``) as a tcplug backbone.

    Latents ``(B, T', C, h, w)`` (tcplug layout) are handed to diffusers as ``(B, C, T', h, w)``
    and back. Timesteps per clip ``(B,)``, per latent frame ``(B, T')`` or per token
    ``(B, T', N)`` with ``N = (h/2)(w/2)``; the last two reach Wan as ``(B, T'*N)``, the
    per-token form Wan takes. Text comes from ``context["text"]`` ``(B, L, text_dim)`` (raw
    text-encoder states, zero-padded as ``WanPipeline`` pads them) through Wan's own
    cross-attention; without one, a single zero token.

    ``attention`` installs a tcplug attention variant in every block's self-attention
    (:class:`WanFrameAttnProcessor`): the same variants and recipe names as on ``dit``
    (``per_frame``, ``cross_frame``, ``full3d``, a third party's...); without it Wan keeps its own
    full 3D attention. Causal variants stream long videos with the K/V frame buffer.
    ``context["residuals"]`` (one tensor per block, broadcastable to ``(B, T', N, token_dim)``) is
    added after each block: the seam ControlNet-style conditioners (``depth``, ``skeleton``,
    ``physics_state``) use, as VACE adds its hints to Wan's blocks.

    Args:
        pretrained: a local diffusers Wan folder (its ``subfolder``, default ``transformer``;
            ``transformer_2`` is Wan 2.2's low-noise expert).
        config: a ``WanTransformer3DModel`` config dict instead (random weights), or the name of a
            published one (``wan2.1-t2v-1.3b``, ``wan2.1-t2v-14b``, ``wan2.2-t2v-a14b``:
            :data:`tcplug_wan.configs.CONFIGS`).
        dtype: ``float32`` (default), ``bfloat16`` or ``float16`` weights.
        gradient_checkpointing: recompute each Wan block in the backward pass.
        storage_dtype: store the frozen weights in ``float8_e4m3fn`` (or ``float8_e5m2``,
            ``bfloat16``, ``float16``) and compute each layer in ``dtype`` (diffusers' layerwise
            casting): fp8 halves a bf16 model's weight memory; adapters, norms and embeddings are kept.
        offload: for sampling, keep the blocks' weights in host RAM (``cpu``) or in files under
            ``offload_dir`` (``disk``) and load one block at a time (diffusers' group offloading);
            refused in training (see :meth:`apply_offload`).
        offload_dir: the folder ``offload: disk`` writes the blocks' weights to.
        attention: one variant for every block (copied per block) or one per block; None keeps
            Wan's own attention.
    """

    processor_cls = WanFrameAttnProcessor
    family = "wan"

    def __init__(self, pretrained: str | None = None, subfolder: str = "transformer", config: dict | str | None = None,
                 dtype: str | None = None, gradient_checkpointing: bool = False, storage_dtype: str | None = None,
                 offload: str | None = None, offload_dir: str | None = None,
                 attention: AttentionVariant | list[AttentionVariant] | None = None) -> None:
        super().__init__()
        from diffusers import WanTransformer3DModel

        if isinstance(config, str):
            from tcplug_wan.configs import transformer_config

            config = transformer_config(config)
        self.model = load_model(WanTransformer3DModel, "wan backbone", pretrained, subfolder, config, dtype)
        cfg = self.model.config
        if tuple(cfg.patch_size)[0] != 1 or cfg.patch_size[1] != cfg.patch_size[2]:
            raise TcplugError(f"wan backbone: patch_size {tuple(cfg.patch_size)} is not (1, p, p)")
        if (cfg.out_channels or cfg.in_channels) != cfg.in_channels:
            raise TcplugError("wan backbone: in_channels != out_channels (image-conditioned variants are not supported)")
        self.in_channels = int(cfg.in_channels)
        self.patch_size = int(cfg.patch_size[1])
        self.token_dim = int(cfg.num_attention_heads * cfg.attention_head_dim)
        self.num_blocks = int(cfg.num_layers)
        self.text_dim = int(cfg.text_dim)
        self.pretrained = pretrained
        self._setup(attention, gradient_checkpointing, storage_dtype, offload, offload_dir)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.blocks

    def rotary_at(self, start: int, t: int, h: int, w: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Wan's rotary embedding for latent frames ``start .. start + t`` (absolute positions),
        as ``WanRotaryPosEmbed`` builds it, with the frame axis computed for just these positions
        (``get_1d_rotary_pos_embed``): its table stops at ``rope_max_seq_len`` frames, and a long
        video must not pay for the whole prefix at every chunk."""
        from diffusers.models.embeddings import get_1d_rotary_pos_embed

        rope = self.model.rope
        _, p_h, p_w = rope.patch_size
        hh, ww = h // p_h, w // p_w
        split = [rope.t_dim, rope.h_dim, rope.w_dim]
        out = []
        for table, frame in zip((rope.freqs_cos, rope.freqs_sin),
                                get_1d_rotary_pos_embed(rope.t_dim, frame_positions(start, t, torch.float64),
                                                        10000.0, use_real=True, repeat_interleave_real=True,
                                                        freqs_dtype=torch.float64)):  # WanRotaryPosEmbed's theta
            _, fh, fw = table.split(split, dim=1)
            grid = torch.cat([frame.to(table).view(t, 1, 1, -1).expand(t, hh, ww, -1),
                              fh[:hh].view(1, hh, 1, -1).expand(t, hh, ww, -1),
                              fw[:ww].view(1, 1, ww, -1).expand(t, hh, ww, -1)], dim=-1)
            out.append(grid.reshape(1, t * hh * ww, 1, -1).to(device))
        return out[0], out[1]

    lora_formats = ("diffusers", "original")

    def save_lora_weights(self, out: str, state_dict: dict[str, Tensor], format: str = "diffusers") -> None:
        """Write adapters (peft state dict of :attr:`lora_target`): ``diffusers``, as
        ``WanPipeline.save_lora_weights`` writes them (``pytorch_lora_weights.safetensors``);
        ``original``, the Wan repository's key layout that ComfyUI loads
        (``wan_lora.safetensors``, :func:`tcplug_wan.lora.to_original`). ``WanPipeline.load_lora_weights``
        reads both."""
        if format == "original":
            from pathlib import Path

            from safetensors.torch import save_file

            from tcplug_wan.lora import to_original

            Path(out).mkdir(parents=True, exist_ok=True)
            save_file(to_original(state_dict), str(Path(out) / "wan_lora.safetensors"),
                      metadata={"format": "pt", "layout": "wan-original"})
            return
        if format != "diffusers":
            raise TcplugError(f"wan: LoRA format {format!r} is not one of {', '.join(self.lora_formats)}")
        from diffusers import WanPipeline

        WanPipeline.save_lora_weights(out, transformer_lora_layers=state_dict)

    def run(self, x: Tensor, timesteps: Tensor, context: dict[str, Any]) -> Tensor:
        b = x.shape[0]
        dtype = self.model.dtype
        text = context.get("text")
        if text is None:
            text = x.new_zeros(b, 1, self.text_dim)
        out = self.model(hidden_states=x.permute(0, 2, 1, 3, 4).to(dtype), timestep=timesteps,
                         encoder_hidden_states=text.to(dtype), return_dict=False)[0]
        return out.permute(0, 2, 1, 3, 4).to(x.dtype)


class WanVAE(FrozenVideoVAE):
    """Wan's causal 3D VAE (``AutoencoderKLWan``): spatial ``x8`` (``x16`` for Wan 2.2's 48-channel
    VAE), temporal ``x4``: ``T`` pixel frames (``T = 4k + 1``) <-> ``T' = (T - 1)/4 + 1`` latent
    frames. Latents are normalised with the config's ``latents_mean``/``latents_std`` exactly as
    ``WanPipeline`` does (``(z - mean) / std``; decode inverts it). Frozen.

    ``encode(video (B, T, 3, H, W)) -> (B, T', z_dim, H/f, W/f)``; ``decode`` the inverse.

    Args:
        pretrained: a local diffusers Wan folder (its ``subfolder``, default ``vae``).
        config: an ``AutoencoderKLWan`` config dict instead (random weights; encoder always kept).
        encoder: with ``pretrained``: ``true`` keeps the encoder loaded; ``null`` (default) keeps
            only the decoder and loads the encoder from the folder the first time pixels are
            encoded, so a run on precomputed latents (``tcplug data encode``) never loads it;
            ``false`` never loads it (encoding is an error).
        sample: encode to a sample of the posterior instead of its mode.
        dtype: ``float32`` (default), ``bfloat16`` or ``float16`` weights.
    """

    vae_cls_name = "AutoencoderKLWan"
    what = "wan_vae latent"

    def __init__(self, pretrained: str | None = None, subfolder: str = "vae", config: dict | None = None,
                 encoder: bool | None = None, sample: bool = False, dtype: str | None = None) -> None:
        super().__init__(pretrained, subfolder, config, encoder, sample, dtype)
        cfg = self.vae.config
        self.latent_channels = int(cfg.z_dim)
        self.downsample = int(getattr(cfg, "scale_factor_spatial", None) or 2 ** sum(cfg.temperal_downsample))
        self.temporal_compression = int(getattr(cfg, "scale_factor_temporal", None) or 2 ** sum(cfg.temperal_downsample))
        if cfg.latents_mean is None or len(cfg.latents_mean) != cfg.z_dim:
            raise TcplugError(f"wan_vae: the VAE config has no latents_mean of length z_dim={cfg.z_dim}")
        self.register_buffer("mean", torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("inv_std", 1.0 / torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1), persistent=False)

    def decode_stream(self, latents: Tensor, state: dict[str, Any]) -> Tensor:
        """Decode one streamed chunk exactly as the whole video would be: ``AutoencoderKLWan``
        decodes latent frame by latent frame with a cache of each causal convolution's last
        frames, and that cache is carried across chunks here (in ``state``), so the frames of
        every chunk equal the whole video's and memory is the cache's, whatever the length.
        With tiling enabled on the VAE, the generic context-frame decode is used instead."""
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, unpatchify

        vae = self.vae
        if getattr(vae, "use_tiling", False):
            return super().decode_stream(latents, state)
        cache = state.get("wan_decoder_cache")
        first = cache is None
        if first:
            cache = state["wan_decoder_cache"] = [None] * sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
        z = self.unnormalise(latents).to(vae.dtype)
        x = vae.post_quant_conv(z)
        out = torch.cat([vae.decoder(x[:, :, i:i + 1], feat_cache=cache, feat_idx=[0], first_chunk=first and i == 0)
                         for i in range(x.shape[2])], dim=2)
        if vae.config.get("patch_size") is not None:
            out = unpatchify(out, patch_size=vae.config.patch_size)
        return out.clamp(-1, 1).permute(0, 2, 1, 3, 4).float()


class WanText(FrozenTextEncoder):
    """Wan's text conditioning: the UMT5 encoder of the model folder (frozen), prompts cleaned,
    tokenised and zero-padded to ``max_length`` exactly as ``WanPipeline.encode_prompt`` does
    (it is called), or precomputed embeddings from the batch.

    A batch that carries ``text_emb`` ``(B, L, text_dim)`` (shards written by ``tcplug data
    encode``) is used as is; the encoder is loaded from the folder only the first time a batch
    has prompts and no embeddings, so a run on precomputed shards never loads it.

    Context keys: ``text`` ``(B, L, text_dim)``. The unconditional branch of classifier-free
    guidance (and caption dropout in training) uses the negative prompt's embedding, as
    ``WanPipeline`` does: from the batch's ``negative_text_emb`` (precomputed shards carry it),
    else from ``negative_embeds``, else encoded.

    Its arguments are ``FrozenTextEncoder``'s (defaults as ``WanPipeline``'s): ``pretrained``, a
    local diffusers Wan folder (``text_encoder/`` and ``tokenizer/``); ``precomputed``, never load
    the encoder (every batch must carry ``text_emb``); ``negative_prompt`` (Wan's default is
    empty); ``negative_embeds``, a ``.npy`` file of the negative prompt's embedding
    ``(L, text_dim)``; ``max_length``, tokens per prompt (512); ``dropout``, the probability of
    training on the negative prompt instead (for guidance); ``per_shot``, also each shot's own
    caption, seen by that shot's frames only (``text_mask`` ``(B, T', L)`` per latent frame:
    :meth:`~tcplug_families.FrozenTextEncoder.shot_context`).
    """

    what = "wan_text"
    encoder_cls_name = "UMT5EncoderModel"
    uses_mask = False  # WanPipeline zero-pads the states and Wan attends to every token

    def encode_with(self, tokenizer, encoder, prompts, device):
        from diffusers import WanPipeline

        pipe = WanPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=None, scheduler=None)
        embeds, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False,
                                       max_sequence_length=self.max_length, device=device)
        return embeds, None


@hookimpl
def tcplug_register_components(register):
    register(WanBackbone, name="wan")
    register(WanVAE, name="wan_vae")
    register(WanText, name="wan_text")
