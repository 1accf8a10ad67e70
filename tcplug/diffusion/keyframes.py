"""Keyframes first, then in-betweens: plan a video before rendering it.

:func:`keyframes_first` samples in two passes, in latent frames:

1. **keyframes**: latent frames ``0, stride, 2 stride, ...`` (and the last frame) are sampled
   together as one clip, so every keyframe attends to every other: the whole video's plan;
2. **in-betweens**: each gap between two neighbouring keyframes is sampled as a clip of
   ``stride + 1`` frames whose two ends are the clean keyframes, held at timestep 0 while the
   frames between are denoised (:class:`KnownFrames`, per-frame timesteps), so every in-between
   sees the keyframes on both sides.

Each pass tells the backbone which latent frames it holds (``context["frame_index"]``, see
:func:`frame_index`): the attention variant gets them as ``kv_index`` and a family's rotary
embedding their positions, so the keyframes are attended ``stride`` frames apart, as they are, and a
rule that depends on the frame (``shot``: which shot a frame lies in) sees the real frames. A
variant that only reaches near frames (``cross_frame`` with a small window) then sees no other
keyframe: keyframes need one that reaches them (``full3d``, ``temporal``, ``shot``).

The keyframes of the result are exactly their first-pass values. A model trained for it sees
clips at the keyframe stride (the first pass) and mixed per-frame noise levels with clean frames
among noisy ones (the second: ``model.frame_timesteps: independent``, diffusion forcing); any
backbone that takes per-position timesteps samples it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tcplug.diffusion.sampling import frame_generators, frame_noise, sample_loop
from tcplug.errors import TcplugError


class KnownFrames:
    """Frames given clean inside the sampler loop (:func:`~tcplug.diffusion.sampling.sample_loop`'s
    ``lock``): they hold ``values`` at ``timestep`` (0: clean) from the first step, the model sees
    that timestep on them, and they end exactly as given.

    Args:
        known: ``(T,)`` bool, the latent frames given.
        values: ``(B, T, C, h, w)`` latents; only the known frames are read.
        timestep: the known frames' timestep (0 = clean).
    """

    def __init__(self, known: Tensor, values: Tensor, timestep: float = 0.0) -> None:
        if known.dim() != 1 or known.shape[0] != values.shape[1]:
            raise TcplugError(f"known frames mask of shape {tuple(known.shape)} for {values.shape[1]} latent frames")
        self.known = known.to(values.device).view(1, -1, 1, 1, 1)
        self.values, self.timestep = values, float(timestep)

    def start(self, x: Tensor, noise: Tensor, schedule) -> Tensor:
        t = torch.full((x.shape[0],), self.timestep, device=x.device)
        t = t.long() if schedule.kind == "ddpm" else t
        self._held = schedule.add_noise(self.values, noise, t) if self.timestep > 0 else self.values
        self._where = self.known.expand(x.shape[0], -1, 1, x.shape[3], x.shape[4])
        return torch.where(self.known, self._held, x)

    def timesteps(self, i: int, t_batch: Tensor) -> Tensor:
        """Per latent pixel ``(B, T, 1, h, w)``: the known frames' timestep, the step's elsewhere."""
        return torch.where(self._where, self.timestep, t_batch.float().view(-1, 1, 1, 1, 1))

    def after_step(self, x_before: Tensor, pred: Tensor, t_batch: Tensor, x: Tensor, schedule) -> Tensor:
        return torch.where(self.known, self._held, x)

    def finish(self, x: Tensor) -> Tensor:
        return torch.where(self.known, self.values, x)


def frame_index(context: dict[str, Any] | None, frames: int, device: torch.device | str = "cpu") -> Tensor | None:
    """The absolute latent-frame index of each of a backbone's ``frames`` latent frames,
    ``(frames,)`` long, from ``context["frame_index"]`` (a list of ints, increasing), or None
    when the context has none (the frames are ``0 .. frames - 1``). A backbone hands it to its
    attention variants as ``kv_index`` (and to its rotary embedding), so a pass over some frames of a
    video (keyframes first) attends them as the frames they are. Not with a ``stream`` (a streamed
    chunk's positions come from the stream)."""
    idx = (context or {}).get("frame_index")
    if idx is None:
        return None
    out = torch.as_tensor(idx, dtype=torch.long, device=device).reshape(-1)
    if out.numel() != frames or (out.numel() > 1 and bool((out[1:] <= out[:-1]).any())) or bool((out < 0).any()):
        raise TcplugError(f"context['frame_index'] must give {frames} increasing frame indices >= 0, got {idx}")
    if (context or {}).get("stream") is not None:
        raise TcplugError("context['frame_index'] and a stream cannot be combined: a streamed chunk's frames are the "
                          "stream's")
    return out


def context_frames(context: dict[str, Any] | None, frames: list[int], temporal_compression: int = 1
                   ) -> dict[str, Any] | None:
    """``context`` cut to latent frames ``frames`` (increasing): its per-frame entries
    (:attr:`~tcplug.WorldConditioner.PER_FRAME`) keep those frames along dim 1 — ``maps``, at pixel
    resolution, the pixel frames of those latent frames (latent frame 0 is pixel frame 0, frame
    ``j > 0`` the ``temporal_compression`` pixel frames ending at ``j * c``), ``input_maps`` and each
    block's ``residuals`` the latent frames themselves (a residual that broadcasts over frames, dim 1
    of size 1, stays); other entries (captions) are the whole video's."""
    from tcplug.kinds import WorldConditioner

    if context is None:
        return None
    c = temporal_compression
    pixels = [p for j in frames for p in ([0] if j == 0 else range((j - 1) * c + 1, j * c + 1))]

    def cut(value: Tensor, idx: list[int]) -> Tensor:
        if value.dim() < 2 or value.shape[1] == 1:
            return value
        if max(idx) >= value.shape[1]:
            raise TcplugError(f"a per-frame context entry has {value.shape[1]} frames, frame {max(idx)} asked")
        return value[:, idx]

    out = {}
    for key, value in context.items():
        if key in WorldConditioner.PER_FRAME:
            idx = pixels if key == "maps" else list(frames)
            value = [cut(v, idx) for v in value] if isinstance(value, (list, tuple)) else cut(value, idx)
        out[key] = value
    return out


def keyframe_indices(frames: int, stride: int) -> list[int]:
    """The keyframes of ``frames`` latent frames at ``stride``: ``0, stride, ...`` and the last."""
    if stride < 1 or frames < 1:
        raise TcplugError(f"keyframes need stride >= 1 and frames >= 1, got stride {stride}, frames {frames}")
    keys = list(range(0, frames, stride))
    return keys + ([frames - 1] if keys[-1] != frames - 1 else [])


@torch.no_grad()
def keyframes_first(model, num: int, frames: int, height: int, width: int, stride: int, steps: int,
                    seed: int = 0, batch: dict[str, Any] | None = None,
                    guidance_scale: float | None = None) -> tuple[Tensor, Tensor, list[int]]:
    """Sample ``num`` clips keyframes first (see the module docstring) with
    :class:`~tcplug.diffusion.VideoDiffusion` ``model``. Returns ``(video, key_latents, keys)``:
    video ``(num, frames, 3, height, width)`` in ``[-1, 1]``, the first pass's keyframe latents
    ``(num, K, C, h, w)`` and their latent frame indices.

    The conditioners' context is built once for the whole video and each pass gets it cut to the
    frames it samples (:func:`context_frames`): a world model's per-frame maps are those of the
    keyframes in the first pass and of the span in each second one."""
    shape = model.latent_shape(num, frames, height, width)
    t_lat = shape[1]
    keys = keyframe_indices(t_lat, stride)
    noise = torch.stack([frame_noise(seed, c, range(t_lat), shape[2:]) for c in range(num)]).to(model.device)
    cond_batch = {**(batch or {}), "frame_size": (height, width), "num_clips": num, "num_frames": frames}
    context = model.context(cond_batch, shape)
    null = model.null_context(context)
    scale = model.guidance_scale if guidance_scale is None else guidance_scale

    every = frame_generators(seed, num, range(t_lat))  # each frame's step noise, clip-major

    def run(frames_idx: list[int], known: KnownFrames | None) -> Tensor:
        gens = [every[c * t_lat + f] for c in range(num) for f in frames_idx]
        at = {"frame_index": list(frames_idx)}  # the pass's frames, for the attention's rule and positions
        c = model.latent.temporal_compression
        ctx = {**(context_frames(context, frames_idx, c) or {}), **at}
        nul = None if null is None else {**context_frames(null, frames_idx, c), **at}

        def model_fn(x: Tensor, t: Tensor) -> Tensor:
            return model.guided(x, t, ctx, nul, scale)

        return sample_loop(model_fn, noise[:, frames_idx], model.schedule, steps, lock=known,
                           configure=model.timestep_schedule((num, len(frames_idx), *shape[2:])), frame_generators=gens)

    key_latents = run(keys, None)
    z = torch.zeros(shape, device=model.device, dtype=key_latents.dtype)
    z[:, keys] = key_latents
    for a, b in zip(keys, keys[1:]):
        if b - a < 2:
            continue
        span = list(range(a, b + 1))
        ends = torch.zeros(len(span), dtype=torch.bool)
        ends[0] = ends[-1] = True
        values = torch.zeros((num, len(span), *shape[2:]), device=model.device, dtype=z.dtype)
        values[:, 0], values[:, -1] = z[:, a], z[:, b]
        z[:, span] = run(span, KnownFrames(ends, values))
    return model.latent.decode(z).clamp(-1, 1), key_latents, keys


__all__ = ["KnownFrames", "context_frames", "frame_index", "keyframe_indices", "keyframes_first"]
