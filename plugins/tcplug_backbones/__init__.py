"""Built-in backbones: ``dit``, a small spatio-temporal diffusion transformer."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tcplug import AttentionVariant, Backbone, TcplugError, frame_index, get_component, hookimpl

__version__ = "0.1.0"


def sincos_2d(h: int, w: int, dim: int, device: torch.device) -> Tensor:
    """Fixed 2D sine-cosine position embedding ``(h*w, dim)``."""
    if dim % 4:
        raise TcplugError(f"dit dim must be a multiple of 4, got {dim}")
    quarter = dim // 4
    freqs = torch.exp(-math.log(10000.0) * torch.arange(quarter, device=device) / quarter)
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    ang_y = ys.flatten()[:, None].float() * freqs
    ang_x = xs.flatten()[:, None].float() * freqs
    return torch.cat([ang_y.sin(), ang_y.cos(), ang_x.sin(), ang_x.cos()], dim=1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class CrossAttention(nn.Module):
    """Tokens ``(B, T, N, D)`` attend to text ``(B, L, D)`` (padding masked: ``mask`` ``(B, L)``, or
    per frame ``(B, T, L)``, per-shot captions); zero-initialized output, so adding it leaves the
    block unchanged until it trains."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, text: Tensor, mask: Tensor | None) -> Tensor:
        b, t, n, d = x.shape
        q = self.q(self.norm(x)).view(b, t * n, self.heads, d // self.heads).transpose(1, 2)
        k, v = self.kv(text.to(x.dtype)).view(b, text.shape[1], 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn_mask = None
        if mask is not None and mask.dim() == 3:  # per frame: each frame's tokens their own text tokens
            attn_mask = mask[:, None, :, None, :].expand(b, 1, t, n, mask.shape[-1]).reshape(b, 1, t * n, -1)
        elif mask is not None:
            attn_mask = mask.view(b, 1, 1, -1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out(out.transpose(1, 2).reshape(b, t, n, d))


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block over tokens ``(B, T, N, D)``.

    Self-attention goes through the injected :class:`~tcplug.AttentionVariant`, which
    decides which frames each frame's queries see. ``c`` is the conditioning embedding
    broadcastable to ``(B, T, N, D)``.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float, attention: AttentionVariant) -> None:
        super().__init__()
        if dim % heads:
            raise TcplugError(f"dit dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn = attention
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)
        self.cross: CrossAttention | None = None
        self.ffn_experts: nn.ModuleList | None = None

    def feed_forward(self, h: Tensor, expert_weights: Tensor | None) -> Tensor:
        """The MLP, or the mixture of expert MLPs weighted per clip by ``expert_weights (B, E)``."""
        if self.ffn_experts is None:
            return self.mlp(h)
        if expert_weights is None:
            raise TcplugError("dit has feed-forward experts but the context carries no expert_weights")
        out = torch.zeros_like(h)
        for e, mlp in enumerate(self.ffn_experts):
            w = expert_weights[:, e]
            if bool((w != 0).any()):
                out = out + mlp(h) * w.view(-1, 1, 1, 1).to(h.dtype)
        return out

    def forward(self, x: Tensor, c: Tensor, stream: Any = None, index: int = 0,
                extra: dict[str, Any] | None = None) -> Tensor:
        extra = extra or {}
        b, t, n, d = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)
        h = modulate(self.norm1(x), shift1, scale1)
        # heads-first contiguous layout (3, B, H, T, N, Dh): variants can take frame windows as views
        qkv = self.qkv(h).view(b, t, n, 3, self.heads, d // self.heads).permute(3, 0, 4, 1, 2, 5).contiguous()
        q, k, v = (y.transpose(1, 2) for y in qkv)  # (B, T, H, N, Dh) views
        out = stream.attend(self.attn, index, q, k, v) if stream is not None else self.attn(q, k, v, extra.get("kv_index"))
        out = out.permute(0, 1, 3, 2, 4).reshape(b, t, n, d)
        x = x + gate1 * self.proj(out)
        if self.cross is not None and extra.get("text") is not None:
            x = x + self.cross(x, extra["text"], extra.get("text_mask"))
        return x + gate2 * self.feed_forward(modulate(self.norm2(x), shift2, scale2), extra.get("expert_weights"))


class DiT(Backbone):
    """A small spatio-temporal diffusion transformer (patchify, adaLN-Zero blocks).

    Input latents ``(B, T, C, h, w)`` are cut into ``patch_size`` patches per frame, giving
    tokens ``(B, T, N, dim)`` with ``N = (h/p)(w/p)``. Every block's self-attention is an
    injected :class:`~tcplug.AttentionVariant`; that is where frames meet.

    Args:
        in_channels: latent channels ``C`` (must match the latent design).
        patch_size: spatial patch size ``p``; ``h`` and ``w`` must be multiples of it.
        dim: token width.
        depth: number of blocks.
        heads: attention heads.
        mlp_ratio: hidden width of the MLP as a multiple of ``dim``.
        attention: one variant for every block (copied per block), or a list with one per
            block; default ``per_frame``.
        gradient_checkpointing: recompute block activations in the backward pass.
        conv_channels: if > 0, a per-frame convolutional stem and head at full latent
            resolution around the transformer (a U-ViT-style hourglass): the stem's features are
            patchified, and the head sees them again beside the unpatchified tokens, so fine
            detail need not pass through the patch bottleneck. The head is modulated by the
            timestep embedding (per token; zero-initialised), since what it keeps of the stem's
            features depends on the noise level. Convolutions never mix frames: frames still meet
            only in the attention variant.

    Timesteps may be per clip ``(B,)``, per frame ``(B, T)`` or per token ``(B, T, N)``.
    ``context["residuals"]``, if present, is a list (one per block) of tensors broadcastable
    to ``(B, T, N, dim)`` added after each block (ControlNet-style adapters use it).
    ``context["text"]`` ``(B, L, dim)`` with ``context["text_mask"]`` ``(B, L)`` is attended to by
    every block once :meth:`add_cross_attention` was called (a caption conditioner does it);
    ``context["expert_weights"]`` ``(B, E)`` mixes the feed-forward experts made by
    :meth:`add_ffn_experts` (a router with ``experts: ffn`` does it).
    ``context["stream"]``, if present, is a :class:`tcplug.FrameStream`: the K/V frame buffer
    that carries earlier chunks' keys/values while sampling long videos chunk by chunk.
    ``context["frame_index"]``, if present, is the absolute latent-frame index of each of the
    ``T`` frames (a list of ints; the keyframes-first sampler's passes): every variant gets it as
    ``kv_index``, so its rule and its frame positions see the real frames.
    """

    @property
    def supports_streaming(self) -> bool:
        """Streams when every block's attention variant can (a causal variant with a bounded
        window: its ``memory()``); ``full3d`` or an unbounded ``temporal`` cannot."""
        try:
            for block in self.blocks:
                block.attn.memory()
        except NotImplementedError:
            return False
        return True

    def __init__(
        self,
        in_channels: int = 3,
        patch_size: int = 2,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        attention: AttentionVariant | list[AttentionVariant] | None = None,
        gradient_checkpointing: bool = False,
        conv_channels: int = 0,
    ) -> None:
        super().__init__()
        if depth < 1 or patch_size < 1:
            raise TcplugError("dit depth and patch_size must be >= 1")
        self.in_channels, self.patch_size, self.dim, self.depth = in_channels, patch_size, dim, depth
        self.token_dim, self.num_blocks, self.heads = dim, depth, heads
        self.gradient_checkpointing = gradient_checkpointing
        if attention is None:
            attention = get_component("attention", "per_frame")()
        if isinstance(attention, AttentionVariant):
            variants = [attention] + [copy.deepcopy(attention) for _ in range(depth - 1)]
        else:
            variants = list(attention)
            if len(variants) != depth:
                raise TcplugError(f"dit got {len(variants)} attention variants for depth {depth}; give one or {depth}")
        self.conv_channels = conv_channels
        self.map_channels, self.map_in = 0, None
        feat = conv_channels if conv_channels > 0 else in_channels
        if conv_channels > 0:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, conv_channels, 3, padding=1), nn.SiLU(),
                nn.Conv2d(conv_channels, conv_channels, 3, padding=1),
            )
            self.head = nn.Sequential(
                nn.Conv2d(2 * conv_channels, conv_channels, 3, padding=1), nn.SiLU(),
                nn.Conv2d(conv_channels, in_channels, 3, padding=1),
            )
            nn.init.zeros_(self.head[2].weight)
            nn.init.zeros_(self.head[2].bias)
            # the head knows the noise level: whether the stem's features are mostly noise (high t)
            # or mostly signal (low t) decides what it must keep of them; a scale and shift per
            # channel from each token's timestep embedding (zero-initialised: no change at start)
            self.head_film = nn.Linear(dim, 2 * conv_channels)
            nn.init.zeros_(self.head_film.weight)
            nn.init.zeros_(self.head_film.bias)
        self.patch = nn.Linear(feat * patch_size * patch_size, dim)
        self.t_embed = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(DiTBlock(dim, heads, mlp_ratio, a) for a in variants)
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.out = nn.Linear(dim, feat * patch_size * patch_size)
        for layer in (self.ada_out[1], self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        if conv_channels > 0:  # the head must see the tokens from the start
            nn.init.normal_(self.out.weight, std=0.02)

    def add_cross_attention(self) -> None:
        """Every block gets a zero-initialized cross-attention to ``context["text"]``."""
        for block in self.blocks:
            if block.cross is None:
                block.cross = CrossAttention(self.dim, self.heads)

    def add_map_input(self, channels: int) -> None:
        """Conditioning maps ``context["input_maps"]`` ``(B, T, channels, h, w)`` at latent
        resolution also enter at the input, channel-concatenated in effect (as Wan's
        image-to-video or an inpainting model takes its mask): a zero-initialized 3x3
        convolution adds them to the stem's features (or to the latents before patchifying
        without a stem), so pixel-exact shapes need not pass through the patch tokens. Called
        once per map conditioner; the channels accumulate in call order. A context without
        ``input_maps`` (an unconditioned pass) adds nothing, as one without ``residuals``."""
        if channels < 1:
            raise TcplugError(f"dit map input needs >= 1 channel, got {channels}")
        self.map_channels += channels
        feat = self.conv_channels if self.conv_channels > 0 else self.in_channels
        self.map_in = nn.Conv2d(self.map_channels, feat, 3, padding=1)
        nn.init.zeros_(self.map_in.weight)
        nn.init.zeros_(self.map_in.bias)

    def add_ffn_experts(self, num_experts: int) -> None:
        """Every block's MLP becomes ``num_experts`` copies mixed by ``context["expert_weights"]``."""
        for block in self.blocks:
            if block.ffn_experts is None:
                block.ffn_experts = nn.ModuleList(copy.deepcopy(block.mlp) for _ in range(num_experts))
                block.mlp = None

    def embed_timesteps(self, timesteps: Tensor, b: int, t: int, n: int) -> Tensor:
        """Timesteps ``(B,)``/``(B, T)``/``(B, T, N)`` -> embedding broadcastable to ``(B, T, N, dim)``."""
        if timesteps.dim() == 1:
            ts = timesteps.view(b, 1, 1)
        elif timesteps.dim() == 2:
            ts = timesteps.view(b, t, 1)
        elif timesteps.dim() == 3 and timesteps.shape[2] == n:
            ts = timesteps
        else:
            raise TcplugError(
                f"timesteps of shape {tuple(timesteps.shape)} are not per clip ({b},), per frame "
                f"({b}, {t}) or per token ({b}, {t}, {n})"
            )
        from diffusers.models.embeddings import get_timestep_embedding  # imported on first use

        emb = get_timestep_embedding(ts.reshape(-1).float(), self.dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        return self.t_embed(emb.to(self.patch.weight.dtype)).view(*ts.shape, self.dim)

    def forward(self, x: Tensor, timesteps: Tensor, context: dict[str, Any] | None = None) -> Tensor:
        b, t, c, h, w = self.check_latents(x, "dit")
        p = self.patch_size
        context = context or {}
        feats = None
        if self.conv_channels > 0:
            feats = self.stem(x.flatten(0, 1))
        maps = context.get("input_maps") if self.map_in is not None else None
        if maps is not None:  # absent (an unconditioned pass), like absent residuals: no map input
            if maps.shape[:3] != (b, t, self.map_channels) or maps.shape[-2:] != (h, w):
                raise TcplugError(f"dit takes input maps ({b}, {t}, {self.map_channels}, {h}, {w}) in "
                                  f"context['input_maps'], got {tuple(maps.shape)}")
            added = self.map_in(maps.flatten(0, 1).to(x.dtype))
            if feats is not None:
                feats = feats + added
            else:
                x = x + added.view(b, t, c, h, w)
        x_in = feats.view(b, t, *feats.shape[1:]) if feats is not None else x
        tokens = rearrange(x_in, "b t c (hh p1) (ww p2) -> b t (hh ww) (p1 p2 c)", p1=p, p2=p)
        hh, ww = h // p, w // p
        tokens = self.patch(tokens) + sincos_2d(hh, ww, self.dim, x.device).to(tokens.dtype)
        cond = self.embed_timesteps(timesteps, b, t, hh * ww)
        residuals, stream = context.get("residuals"), context.get("stream")
        extra = {k: context.get(k) for k in ("text", "text_mask", "expert_weights")}
        extra["kv_index"] = frame_index(context, t, x.device)
        for i, block in enumerate(self.blocks):
            if self.gradient_checkpointing and self.training:
                tokens = checkpoint(block, tokens, cond, None, i, extra, use_reentrant=False)
            else:
                tokens = block(tokens, cond, stream, i, extra)
            if residuals is not None:
                tokens = tokens + residuals[i]
        shift, scale = self.ada_out(cond).chunk(2, dim=-1)
        tokens = self.out(modulate(self.norm_out(tokens), shift, scale))
        out = rearrange(tokens, "b t (hh ww) (p1 p2 c) -> b t c (hh p1) (ww p2)", hh=hh, p1=p, p2=p)
        if feats is None:
            return out
        film = self.head_film(cond).expand(b, t, hh * ww, -1)  # (B, T, N, 2C): per token
        film = rearrange(film, "b t (hh ww) c -> (b t) c hh ww", hh=hh).repeat_interleave(p, 2).repeat_interleave(p, 3)
        scale, shift = film.chunk(2, dim=1)
        hid = self.head[0](torch.cat([out.flatten(0, 1), feats], dim=1)) * (1 + scale) + shift
        out = self.head[2](self.head[1](hid))
        return out.view(b, t, c, h, w)


@hookimpl
def tcplug_register_components(register):
    register(DiT, name="dit")


