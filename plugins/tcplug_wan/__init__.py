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

import copy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tcplug import AttentionVariant, Backbone, LatentDesign, TcplugError, WorldConditioner, hookimpl

__version__ = "0.1.0"

_LAYOUT = "a diffusers model folder holds transformer/, vae/, text_encoder/, tokenizer/ and scheduler/"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _subfolder(pretrained: str, subfolder: str, what: str) -> Path:
    root = Path(pretrained).expanduser()
    if not root.is_dir():
        raise TcplugError(f"{what}: pretrained={pretrained!r} is not a local folder (weights are never downloaded)")
    sub = root / subfolder
    if not sub.is_dir():
        raise TcplugError(f"{what}: model folder {root} has no {subfolder}/ ({_LAYOUT})")
    return sub


def load_model(cls: type, what: str, pretrained: str | None, subfolder: str, config: dict | None,
               dtype: str | None = None) -> nn.Module:
    """A diffusers model from ``pretrained/subfolder`` (local files only) or from ``config``."""
    if (pretrained is None) == (config is None):
        raise TcplugError(f"{what}: give exactly one of pretrained (a local model folder) or config (a dict)")
    torch_dtype = None
    if dtype is not None:
        if dtype not in _DTYPES:
            raise TcplugError(f"{what}: dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
        torch_dtype = _DTYPES[dtype]
    if pretrained is not None:
        path = _subfolder(pretrained, subfolder, what)
        try:
            return cls.from_pretrained(path, local_files_only=True, torch_dtype=torch_dtype)
        except Exception as exc:
            raise TcplugError(f"{what}: cannot load {cls.__name__} from {path}: {type(exc).__name__}: {exc}") from None
    try:
        model = cls.from_config(dict(config))
    except Exception as exc:
        raise TcplugError(f"{what}: bad {cls.__name__} config: {type(exc).__name__}: {exc}") from None
    return model.to(torch_dtype) if torch_dtype is not None else model


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Wan's rotary embedding on ``x (B, L, heads, D)`` with ``cos, sin (1, L, 1, D)`` (the
    interleaved-pair form ``WanAttnProcessor`` applies)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class FrameAttnProcessor:
    """A diffusers attention processor for Wan's self-attention (``attn1``) that keeps Wan's
    projections, q/k RMS norms and 3D rotary embedding, then lets a tcplug
    :class:`~tcplug.AttentionVariant` decide which key frames each query frame sees.

    The backbone sets :attr:`grid` ``(T', N)`` (latent frames, tokens per frame; Wan's tokens are
    frame-major) before each forward, and :attr:`stream` / :attr:`rotary` while streaming (the
    K/V frame buffer, and the rotary embedding of the chunk's absolute frame positions).
    """

    def __init__(self, variant: AttentionVariant, index: int) -> None:
        self.variant, self.index = variant, index
        self.grid: tuple[int, int] | None = None
        self.stream = None
        self.rotary: tuple[Tensor, Tensor] | None = None

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, rotary_emb: tuple[Tensor, Tensor] | None = None) -> Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise TcplugError("tcplug frame attention is for Wan's self-attention (attn1) only, without a mask")
        if self.grid is None:
            raise TcplugError("frame attention has no frame grid: call it through the wan backbone")
        t, n = self.grid
        b, length, _ = hidden_states.shape
        if length != t * n:
            raise TcplugError(f"frame attention got {length} tokens for a grid of {t} frames x {n} tokens")
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (y.unflatten(2, (attn.heads, -1)) for y in (query, key, value))
        rotary = self.rotary if self.rotary is not None else rotary_emb
        if rotary is not None:
            query, key = apply_rotary(query, *rotary), apply_rotary(key, *rotary)

        def frames(y: Tensor) -> Tensor:  # (B, T'*N, H, D) -> (B, T', H, N, D)
            return y.view(b, t, n, attn.heads, -1).permute(0, 1, 3, 2, 4)

        q, k, v = frames(query), frames(key), frames(value)
        out = self.stream.attend(self.variant, self.index, q, k, v) if self.stream is not None else self.variant(q, k, v)
        out = out.permute(0, 1, 3, 2, 4).reshape(b, t * n, -1).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class WanBackbone(Backbone):
    """Wan's diffusion transformer (``WanTransformer3DModel``) as a tcplug backbone.

    Latents ``(B, T', C, h, w)`` (tcplug layout) are handed to diffusers as ``(B, C, T', h, w)``
    and back. Timesteps per clip ``(B,)``, per latent frame ``(B, T')`` or per token
    ``(B, T', N)`` with ``N = (h/2)(w/2)``; the last two reach Wan as ``(B, T'*N)``, the
    per-token form Wan takes. Text comes from ``context["text"]`` ``(B, L, text_dim)`` (raw
    text-encoder states, zero-padded as ``WanPipeline`` pads them) through Wan's own
    cross-attention; without one, a single zero token.

    ``attention`` installs a tcplug attention variant in every block's self-attention
    (:class:`FrameAttnProcessor`): the same variants and recipe names as on ``dit``
    (``per_frame``, ``cross_frame``, ``full3d``, a third party's...); without it Wan keeps its own
    full 3D attention. Causal variants stream long videos with the K/V frame buffer.
    ``context["residuals"]`` (one tensor per block, broadcastable to ``(B, T', N, token_dim)``) is
    added after each block: the seam ControlNet-style conditioners (``depth``, ``skeleton``,
    ``physics_state``) use, as VACE adds its hints to Wan's blocks.

    Args:
        pretrained: a local diffusers Wan folder (its ``subfolder``, default ``transformer``;
            ``transformer_2`` is Wan 2.2's low-noise expert).
        config: a ``WanTransformer3DModel`` config dict instead (random weights).
        dtype: ``float32`` (default), ``bfloat16`` or ``float16`` weights.
        gradient_checkpointing: recompute each Wan block in the backward pass.
        attention: one variant for every block (copied per block) or one per block; None keeps
            Wan's own attention.
    """

    def __init__(self, pretrained: str | None = None, subfolder: str = "transformer", config: dict | None = None,
                 dtype: str | None = None, gradient_checkpointing: bool = False,
                 attention: AttentionVariant | list[AttentionVariant] | None = None) -> None:
        super().__init__()
        from diffusers import WanTransformer3DModel

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
        if gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        self.variants: nn.ModuleList | None = None
        self._processors: list[FrameAttnProcessor] = []
        if attention is not None:
            variants = list(attention) if isinstance(attention, (list, tuple, nn.ModuleList)) else \
                [attention] + [copy.deepcopy(attention) for _ in range(self.num_blocks - 1)]
            if len(variants) != self.num_blocks:
                raise TcplugError(f"wan got {len(variants)} attention variants for {self.num_blocks} blocks; give 1 or "
                                  f"{self.num_blocks}")
            self.variants = nn.ModuleList(variants)
            for i, (block, variant) in enumerate(zip(self.model.blocks, variants)):
                proc = FrameAttnProcessor(variant, i)
                block.attn1.set_processor(proc)
                self._processors.append(proc)

    @property
    def supports_streaming(self) -> bool:
        """Streams when every block's variant is causal (the K/V frame buffer)."""
        if self.variants is None or not all(v.causal for v in self.variants):
            return False
        try:
            for v in self.variants:
                v.memory()
        except NotImplementedError:  # e.g. a causal variant with an unbounded window
            return False
        return True

    def _rotary_at(self, start: int, t: int, h: int, w: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Wan's rotary embedding for latent frames ``start .. start + t`` (absolute positions)."""
        p = self.patch_size
        cos, sin = self.model.rope(torch.empty(1, 1, start + t, h, w, device=device))
        n = (h // p) * (w // p)
        return cos[:, start * n:].to(device), sin[:, start * n:].to(device)

    @property
    def lora_target(self) -> nn.Module:
        """The module LoRA adapters go into (the diffusers transformer)."""
        return self.model

    def save_lora_weights(self, out: str, state_dict: dict[str, Tensor]) -> None:
        """Write adapters (peft state dict of :attr:`lora_target`) as ``WanPipeline.load_lora_weights`` reads them."""
        from diffusers import WanPipeline

        WanPipeline.save_lora_weights(out, transformer_lora_layers=state_dict)

    def forward(self, x: Tensor, timesteps: Tensor, context: dict[str, Any] | None = None) -> Tensor:
        b, t, c, h, w = x.shape
        p = self.patch_size
        if c != self.in_channels:
            raise TcplugError(f"wan backbone expects {self.in_channels} latent channels, got {c}")
        if h % p or w % p:
            raise TcplugError(f"latent size {h}x{w} is not a multiple of Wan's patch size {p}")
        n = (h // p) * (w // p)
        if timesteps.dim() == 2:
            if timesteps.shape != (b, t):
                raise TcplugError(f"per-frame timesteps {tuple(timesteps.shape)} do not match ({b}, {t})")
            timesteps = timesteps.repeat_interleave(n, dim=1)
        elif timesteps.dim() == 3:
            if timesteps.shape != (b, t, n):
                raise TcplugError(f"per-token timesteps {tuple(timesteps.shape)} do not match ({b}, {t}, {n})")
            timesteps = timesteps.flatten(1)
        elif timesteps.dim() != 1:
            raise TcplugError(f"timesteps of shape {tuple(timesteps.shape)}: give (B,), (B, T') or (B, T', N)")
        dtype = self.model.dtype
        context = context or {}
        text = context.get("text")
        if text is None:
            text = x.new_zeros(b, 1, self.text_dim)
        stream = context.get("stream")
        if stream is not None and not self.supports_streaming:
            raise TcplugError("this wan backbone cannot stream: give it a causal attention variant")
        rotary = self._rotary_at(stream.frame_start, t, h, w, x.device) if stream is not None else None
        for proc in self._processors:
            proc.grid, proc.stream, proc.rotary = (t, n), stream, rotary
        hooks = []
        residuals = context.get("residuals")
        if residuals is not None:
            if len(residuals) != self.num_blocks:
                raise TcplugError(f"got {len(residuals)} residuals for {self.num_blocks} wan blocks")
            for block, res in zip(self.model.blocks, residuals):
                hooks.append(block.register_forward_hook(_AddResidual(res, b, t, n)))
        try:
            out = self.model(hidden_states=x.permute(0, 2, 1, 3, 4).to(dtype), timestep=timesteps,
                             encoder_hidden_states=text.to(dtype), return_dict=False)[0]
        finally:
            for hook in hooks:
                hook.remove()
            for proc in self._processors:
                proc.stream = proc.rotary = None
        return out.permute(0, 2, 1, 3, 4).to(x.dtype)


class _AddResidual:
    """Forward hook adding one conditioner residual ``(B|1, T'|1, N|1, D)`` to a Wan block's
    output ``(B, T'*N, D)``."""

    def __init__(self, residual: Tensor, b: int, t: int, n: int) -> None:
        self.residual, self.shape = residual, (b, t, n)

    def __call__(self, module, args, output):
        b, t, n = self.shape
        res = self.residual.to(output.dtype).expand(b, t, n, output.shape[-1])
        return output + res.reshape(b, t * n, -1)


class WanVAE(LatentDesign):
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

    def __init__(self, pretrained: str | None = None, subfolder: str = "vae", config: dict | None = None,
                 encoder: bool | None = None, sample: bool = False, dtype: str | None = None) -> None:
        super().__init__()
        from diffusers import AutoencoderKLWan

        self.vae = load_model(AutoencoderKLWan, "wan_vae latent", pretrained, subfolder, config, dtype)
        self.vae.requires_grad_(False)
        self.vae.eval()
        cfg = self.vae.config
        self.latent_channels = int(cfg.z_dim)
        self.downsample = int(getattr(cfg, "scale_factor_spatial", None) or 2 ** sum(cfg.temperal_downsample))
        self.temporal_compression = int(getattr(cfg, "scale_factor_temporal", None) or 2 ** sum(cfg.temperal_downsample))
        if cfg.latents_mean is None or len(cfg.latents_mean) != cfg.z_dim:
            raise TcplugError(f"wan_vae: the VAE config has no latents_mean of length z_dim={cfg.z_dim}")
        self.register_buffer("mean", torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("inv_std", 1.0 / torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1), persistent=False)
        self.pretrained, self.subfolder, self.dtype_name, self.sample = pretrained, subfolder, dtype, sample
        self.encoder_mode = True if pretrained is None else encoder
        if self.encoder_mode is not True:  # decoder only; the encoder comes from the folder if ever needed
            self.vae.encoder = None
            self.vae.quant_conv = None
        self._encoder_vae = None  # not a submodule: never in the state dict

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_encoder_vae"] = None
        return state

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()  # frozen
        return self

    @property
    def encoder_loaded(self) -> bool:
        """Whether an encoder is in memory (a run on precomputed latents never loads one)."""
        return self.vae.encoder is not None or self._encoder_vae is not None

    def _encoding_vae(self, device: torch.device):
        if self.vae.encoder is not None:
            return self.vae
        if self.encoder_mode is False:
            raise TcplugError("wan_vae was built with encoder: false but was asked to encode pixels: the batch has "
                              "no 'latents' (train on shards made by `tcplug data encode`)")
        if self._encoder_vae is None:
            from diffusers import AutoencoderKLWan

            vae = load_model(AutoencoderKLWan, "wan_vae latent", self.pretrained, self.subfolder, None, self.dtype_name)
            object.__setattr__(self, "_encoder_vae", vae.requires_grad_(False).eval())  # not a submodule
        return self._encoder_vae.to(device)

    def encode(self, video: Tensor) -> Tensor:
        self.latent_frames(video.shape[1])
        vae = self._encoding_vae(video.device)
        x = video.permute(0, 2, 1, 3, 4).to(vae.dtype)
        dist = vae.encode(x).latent_dist
        z = dist.sample() if self.sample else dist.mode()
        z = (z.float() - self.mean) * self.inv_std
        return z.permute(0, 2, 1, 3, 4).contiguous()

    def decode_stream(self, latents: Tensor, state: dict[str, Any]) -> Tensor:
        """Decode one streamed chunk of latent frames. The causal decoder sees the previous
        chunk's last ``stream_context`` latent frames again (their pixels are dropped), so the
        chunk continues the video: ``1 + 4(k - 1)`` pixel frames for the first chunk of ``k``
        latent frames, ``4k`` for every later one, as the whole video would have."""
        prev = state.get("wan_context")
        c = self.temporal_compression
        if prev is None:
            video = self.decode(latents)
        else:
            video = self.decode(torch.cat([prev, latents], dim=1))[:, 1 + c * (prev.shape[1] - 1):]
        state["wan_context"] = latents[:, -self.stream_context:]
        return video

    stream_context: int = 2

    def decode(self, latents: Tensor) -> Tensor:
        z = latents.permute(0, 2, 1, 3, 4).float() / self.inv_std + self.mean
        video = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
        return video.permute(0, 2, 1, 3, 4).float()


class WanText(WorldConditioner):
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

    Args:
        pretrained: a local diffusers Wan folder (``text_encoder/`` and ``tokenizer/``).
        precomputed: never load the encoder: every batch must carry ``text_emb``.
        negative_prompt: the negative prompt (Wan's default is empty).
        negative_embeds: a ``.npy`` file of the negative prompt's embedding ``(L, text_dim)``.
        max_length: tokens per prompt (``WanPipeline`` default 512).
        dropout: probability of training on the negative prompt instead (for guidance).
    """

    needs = ("txt|text_emb",)

    def __init__(self, pretrained: str | None = None, precomputed: bool = False, negative_prompt: str = "",
                 negative_embeds: str | None = None, max_length: int = 512, dropout: float = 0.1) -> None:
        super().__init__()
        if not 0 <= dropout < 1:
            raise TcplugError(f"wan_text dropout must be in [0, 1), got {dropout}")
        if pretrained is None and not precomputed:
            raise TcplugError("wan_text: give pretrained (a local Wan folder) or precomputed: true")
        if pretrained is not None:  # fail now, not at the first prompt
            _subfolder(pretrained, "text_encoder", "wan_text")
            _subfolder(pretrained, "tokenizer", "wan_text")
        self.pretrained, self.precomputed, self.negative_prompt = pretrained, precomputed, negative_prompt
        self.max_length, self.dropout = max_length, dropout
        self._encoder = None  # loaded on first need; not a submodule: never in the state dict
        self._tokenizer = None
        self._negative: Tensor | None = None
        if negative_embeds is not None:
            import numpy as np

            if not Path(negative_embeds).is_file():
                raise TcplugError(f"wan_text negative_embeds={negative_embeds!r} is not a file")
            self._negative = torch.from_numpy(np.load(negative_embeds)).float()

    def __getstate__(self):  # tokenizers hold rust objects; the encoder reloads from the folder
        state = self.__dict__.copy()
        state["_tokenizer"] = None
        state["_encoder"] = None
        return state

    @property
    def text_encoder(self) -> nn.Module | None:
        """The loaded encoder, or None while none was needed."""
        return self._encoder

    def _load(self, device: torch.device) -> None:
        if self.precomputed:
            raise TcplugError("wan_text is precomputed: the batch must carry text_emb (shards made by "
                              "`tcplug data encode`); it has prompts only")
        if self._encoder is None:
            from transformers import AutoTokenizer, UMT5EncoderModel

            path = Path(self.pretrained)
            try:
                encoder = UMT5EncoderModel.from_pretrained(path / "text_encoder", local_files_only=True)
                object.__setattr__(self, "_encoder", encoder)  # not registered: out of state dict and optimizer
                self._tokenizer = self._tokenizer or AutoTokenizer.from_pretrained(path / "tokenizer",
                                                                                   local_files_only=True)
            except Exception as exc:
                raise TcplugError(f"wan_text: cannot load the text encoder from {path}: {type(exc).__name__}: {exc}") from None
            self._encoder.requires_grad_(False).eval()
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(Path(self.pretrained) / "tokenizer", local_files_only=True)
        self._encoder.to(device)

    @torch.no_grad()
    def encode(self, prompts: list[str], device: torch.device | str = "cpu") -> Tensor:
        """Prompts -> ``(B, max_length, text_dim)`` through ``WanPipeline.encode_prompt``."""
        from diffusers import WanPipeline

        self._load(torch.device(device))
        pipe = WanPipeline(tokenizer=self._tokenizer, text_encoder=self._encoder, vae=None, scheduler=None)
        embeds, _ = pipe.encode_prompt(list(prompts), do_classifier_free_guidance=False,
                                       max_sequence_length=self.max_length, device=torch.device(device))
        return embeds.float()

    def negative(self, b: int, like: Tensor, batch: dict[str, Any] | None = None) -> Tensor:
        """The negative prompt's embedding for ``b`` clips."""
        if batch is not None and batch.get("negative_text_emb") is not None:
            self._negative = batch["negative_text_emb"][0].detach().float().cpu()
        if self._negative is None:
            self._negative = self.encode([self.negative_prompt], like.device)[0].cpu()
        return self._negative.to(like.device, like.dtype).unsqueeze(0).expand(b, -1, -1)

    def forward(self, batch: dict[str, Any], latent_shape: tuple[int, ...]) -> dict[str, Any]:
        b = latent_shape[0]
        device = next((v.device for v in batch.values() if torch.is_tensor(v)), torch.device("cpu"))
        if batch.get("text_emb") is not None:
            text = batch["text_emb"].float()
            if text.shape[0] == 1 and b > 1:
                text = text.expand(b, -1, -1)
        else:
            texts = batch.get("txt")
            if texts is None:
                raise TcplugError("wan_text needs a prompt: the batch has no txt and no text_emb "
                                  "(give --caption when sampling)")
            texts = [texts] if isinstance(texts, str) else list(texts)
            if len(texts) == 1 and b > 1:
                texts = texts * b
            if len(texts) != b:
                raise TcplugError(f"wan_text got {len(texts)} prompts for {b} clips")
            text = self.encode(texts, device)
        if text.shape[0] != b:
            raise TcplugError(f"wan_text got {text.shape[0]} text embeddings for {b} clips")
        if self.training and self.dropout > 0:
            drop = (torch.rand(b) < self.dropout).to(text.device).view(-1, 1, 1)
            text = torch.where(drop, self.negative(b, text, batch), text)
        elif batch.get("negative_text_emb") is not None:  # keep it for guidance at sampling
            self.negative(b, text, batch)
        return {"text": text}

    def precompute(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """For ``tcplug data encode``: ``{"text_emb": (B, max_length, text_dim)}`` of the batch's prompts."""
        texts = batch.get("txt")
        if texts is None:
            raise TcplugError("wan_text: the shards have no txt captions to encode")
        return {"text_emb": self.encode(list(texts), batch["video"].device)}

    def precompute_shared(self) -> dict[str, Tensor]:
        """For ``tcplug data encode``: the negative prompt's embedding, written once."""
        return {"negative_text_emb": self.encode([self.negative_prompt])[0]}

    def null_context(self, context: dict[str, Any]) -> dict[str, Any]:
        """The negative prompt's context (the unconditional branch of guidance)."""
        return {**context, "text": self.negative(context["text"].shape[0], context["text"])}


@hookimpl
def tcplug_register_components(register):
    register(WanBackbone, name="wan")
    register(WanVAE, name="wan_vae")
    register(WanText, name="wan_text")
