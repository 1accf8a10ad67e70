"""Sampling pipelines over a :class:`~tcplug.diffusion.model.VideoDiffusion` (no Lightning
needed): all at once (:func:`generate`) or chunk by chunk with the K/V frame buffer
(:func:`stream`). Video out is ``(B, T, 3, H, W)`` in ``[-1, 1]``.

Noise is drawn per frame from its own generator (:func:`~tcplug.diffusion.sampling.frame_noise`),
so a frame gets the same noise for a seed whether the video is sampled at once or streamed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from tcplug.diffusion.lock import LockedSampling
from tcplug.diffusion.model import VideoDiffusion
from tcplug.diffusion.sampling import frame_noise, sample_loop, stream_sample
from tcplug.errors import TcplugError

DEFAULT_STEPS = 20


@torch.no_grad()
def generate(model: VideoDiffusion, num: int, frames: int, height: int, width: int, steps: int = DEFAULT_STEPS,
             seed: int = 0, batch: dict[str, Any] | None = None, progress: bool = False,
             guidance_scale: float | None = None, lock: bool = True, latents: Tensor | None = None) -> Tensor:
    """Sample ``num`` clips; returns video ``(num, frames, 3, height, width)`` in [-1, 1].

    ``batch`` carries what the conditioners and the motion locker read (a data clip's
    depth/skeleton/state/static mask, a caption ``txt``, an initial ``state``).
    ``guidance_scale`` defaults to the model's; ``lock=False`` samples without the motion lock
    (the locker's cheap first pass does). ``latents`` ``(num, T', C, h, w)`` replaces the seeded
    initial noise (to compare with another sampler on the same input). The share of sampler steps
    each expert took is left in ``model.sampler_expert_steps``.
    """
    shape = model.latent_shape(num, frames, height, width)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if latents is not None:
        if tuple(latents.shape) != shape:
            raise TcplugError(f"initial latents of shape {tuple(latents.shape)}; this model needs {shape}")
        noise = latents.to(model.device)
    else:
        noise = torch.stack([frame_noise(seed, c, range(shape[1]), shape[2:]) for c in range(num)]).to(model.device)
    cond_batch = {**(batch or {}), "frame_size": (height, width), "num_clips": num, "num_frames": frames}
    context = model.context(cond_batch, shape)
    null = model.null_context(context)
    scale = model.guidance_scale if guidance_scale is None else guidance_scale
    locked = None
    if lock and model.motion_lock is not None:
        def preview() -> Tensor:
            return generate(model, num, frames, height, width, steps=model.lock.preview_steps, seed=seed,
                            batch=batch, guidance_scale=guidance_scale, lock=False)

        mask = model.lock_mask(cond_batch, context, shape, preview)
        if mask is not None:
            locked = LockedSampling(mask, model.lock.timestep, model.lock.copy_anchor)
    model.sampler_expert_steps = [0] * model.num_experts

    def model_fn(x: Tensor, t: Tensor) -> Tensor:
        if model.router is not None:  # which expert takes this sampler step (first clip)
            model.sampler_expert_steps[int(model.route(t)[0].argmax())] += 1
        return model.guided(x, t, context, null, scale)

    z = sample_loop(model_fn, noise, model.schedule, steps, generator=gen, progress=progress, lock=locked,
                    configure=model.timestep_schedule(shape))
    return model.latent.decode(z).clamp(-1, 1)


@torch.no_grad()
def stream(model: VideoDiffusion, frames: int, height: int, width: int, chunk: int, steps: int = DEFAULT_STEPS,
           seed: int = 0, num: int = 1, progress: bool = False) -> Iterator[Tensor]:
    """Sample a long video chunk by chunk with the K/V frame buffer (and whatever the latent
    design carries across chunks, e.g. the two-tier global code).

    Yields decoded video chunks ``(num, <= chunk, 3, height, width)`` in [-1, 1]; memory is
    bounded by the attention variants' windows, not by ``frames``. The same seed gives the same
    frames as :func:`generate` for causal variants.
    """
    if model.router is not None or len(model.conditioners) or model.motion_lock is not None:
        raise TcplugError("streaming is not supported with a router, a conditioner or a motion lock in this "
                          "version; generate() samples such a model all at once")
    if not model.can_stream:
        raise TcplugError(f"backbone {type(model.backbone).__name__} does not support streaming")
    latent = model.latent
    f, c = latent.downsample, latent.temporal_compression
    frame_shape = (latent.latent_channels, height // f, width // f)
    latent_frames = latent.latent_frames(frames)
    latent_chunk = chunk if c == 1 else max(1, (chunk - 1) // c + 1)  # chunk counts pixel frames
    backbone = model.backbone

    def model_fn(x, t, buffer):
        return backbone(x, t, {"stream": buffer})

    carried: dict[str, Any] = {}  # what the latent design carries across chunks (a global code)
    configure = model.timestep_schedule((num, latent_frames, *frame_shape))
    for z in stream_sample(model_fn, frame_shape, latent_frames, latent_chunk, model.schedule, steps, seed=seed,
                           num_clips=num, device=model.device, progress=progress, configure=configure):
        yield latent.decode_stream(z, carried).clamp(-1, 1)


__all__ = ["generate", "stream"]
