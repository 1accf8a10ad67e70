"""Use tcplug attention variants inside diffusers models.

``model.set_attn_processor(attn_processor("cross_frame", num_frames=8, window=2))`` makes
every *self*-attention of the model temporal (the variant decides which frames' keys/values
each frame sees); cross-attention (to text) keeps diffusers' standard computation.

diffusers lays video out as ``(batch * frames, tokens, dim)``, batch-major. ``batch_size``
must count classifier-free-guidance halves (a prompt with guidance is a batch of 2): a
mismatch raises instead of silently doing nothing (diffusers issue 3619).
"""

from __future__ import annotations

import torch.nn.functional as F

from tcplug.errors import TcplugError
from tcplug.kinds import AttentionVariant
from tcplug.registry import get_component


class TemporalAttnProcessor:
    """A diffusers attention processor running a tcplug :class:`~tcplug.AttentionVariant`.

    Args:
        variant: the attention variant (an instance).
        num_frames: frames per video ``T``.
        batch_size: videos per batch, CFG halves included; ``None`` infers it.
    """

    def __init__(self, variant: AttentionVariant, num_frames: int, batch_size: int | None = 1) -> None:
        if num_frames < 1:
            raise TcplugError(f"num_frames must be >= 1, got {num_frames}")
        self.variant, self.num_frames, self.batch_size = variant, num_frames, batch_size

    def _videos(self, rows: int) -> int:
        if rows % self.num_frames:
            raise TcplugError(f"{rows} rows are not a whole number of videos of {self.num_frames} frames")
        videos = rows // self.num_frames
        if self.batch_size is not None and videos != self.batch_size:
            raise TcplugError(
                f"attention got {rows} rows = {videos} video(s) x {self.num_frames} frames, but batch_size="
                f"{self.batch_size}; with classifier-free guidance count both halves (batch_size=2 per prompt)"
            )
        return videos

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if getattr(attn, "spatial_norm", None) is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            bf, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(bf, channel, height * width).transpose(1, 2)
        rows, tokens, _ = hidden_states.shape
        if getattr(attn, "group_norm", None) is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else hidden_states
        if is_cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        heads = attn.heads
        head_dim = key.shape[-1] // heads

        def split(x):  # (rows, L, H*D) -> (rows, H, L, D)
            return x.view(x.shape[0], -1, heads, head_dim).transpose(1, 2)

        query, key, value = split(query), split(key), split(value)
        if getattr(attn, "norm_q", None) is not None:
            query = attn.norm_q(query)
        if getattr(attn, "norm_k", None) is not None:
            key = attn.norm_k(key)

        if is_cross:  # untouched: diffusers' standard attention
            if attention_mask is not None:
                attention_mask = attn.prepare_attention_mask(attention_mask, key.shape[2], rows)
                attention_mask = attention_mask.view(rows, heads, -1, attention_mask.shape[-1])
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        else:
            if attention_mask is not None:
                raise TcplugError("tcplug temporal attention does not take a self-attention mask")
            b, t = self._videos(rows), self.num_frames

            def frames(x):  # (B*T, H, N, D) -> (B, T, H, N, D)
                return x.reshape(b, t, heads, tokens, head_dim)

            out = self.variant(frames(query), frames(key), frames(value)).reshape(rows, heads, tokens, head_dim)
        hidden_states = out.transpose(1, 2).reshape(rows, -1, heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(bf, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def attn_processor(name: str, num_frames: int, batch_size: int | None = 1, **init_args) -> TemporalAttnProcessor:
    """An attention processor for ``model.set_attn_processor(...)`` running the registered
    attention variant ``name`` (built with ``init_args``) over ``num_frames`` frames."""
    variant = get_component("attention", name)(**init_args)
    return TemporalAttnProcessor(variant, num_frames, batch_size)


__all__ = ["TemporalAttnProcessor", "attn_processor"]
