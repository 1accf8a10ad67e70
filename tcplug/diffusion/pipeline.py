"""Sampling pipelines over a :class:`~tcplug.diffusion.model.VideoDiffusion` (no Lightning
needed): all at once (:func:`generate`) or chunk by chunk with the K/V frame buffer
(:func:`stream`). Video out is ``(B, T, 3, H, W)`` in ``[-1, 1]``.

Noise is drawn per frame from its own generator (:func:`~tcplug.diffusion.sampling.frame_noise`),
so a frame gets the same noise for a seed whether the video is sampled at once or streamed.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from tcplug.diffusion.lock import LockedSampling, StreamedLock
from tcplug.diffusion.model import VideoDiffusion
from tcplug.diffusion.sampling import (
    CleanContext,
    FrameStream,
    chunk_ranges,
    commit_chunk,
    frame_generators,
    frame_noise,
    make_stream,
    sample_loop,
)
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

    z = sample_loop(model_fn, noise, model.schedule, steps, progress=progress, lock=locked,
                    configure=model.timestep_schedule(shape), frame_generators=frame_generators(seed, num, range(shape[1])))
    return model.latent.decode(z).clamp(-1, 1)


def _sample_chunk(model: VideoDiffusion, noise: Tensor, span: range, context: dict[str, Any] | None,
                  null: dict[str, Any] | None, scale: float, configure, buffers: tuple[FrameStream, ...],
                  steps: int, locked: LockedSampling | None, gens: list, count: bool = True) -> Tensor:
    """One chunk of a streamed video (latent frames ``span``) denoised with the K/V ``buffers`` (the
    conditional pass's, then the unconditional's; one buffer: unguided)."""
    def at(i: int) -> None:
        for b in buffers:
            b.step, b.frame_start = i, span.start

    def model_fn(x: Tensor, t: Tensor) -> Tensor:
        if count and model.router is not None:  # which expert takes this sampler step (first clip)
            model.sampler_expert_steps[int(model.route(t)[0].argmax())] += 1
        ctx = {**(context or {}), "stream": buffers[0]}
        nctx = {**null, "stream": buffers[1]} if null is not None and len(buffers) > 1 else None
        return model.guided(x, t, ctx, nctx, scale if nctx is not None else 1.0)

    return sample_loop(model_fn, noise, model.schedule, steps, lock=locked, configure=configure,
                       frame_generators=gens, before_step=at)


def _denoise_with(model: VideoDiffusion, context: dict[str, Any], x: Tensor, t: Tensor) -> Tensor:
    return model.denoise(x, t, context)


def pixel_frames(latent: range, compression: int) -> range:
    """The pixel frames latent frames ``latent`` stand for: with time compressed ``c``-fold (a
    causal video VAE), latent frame 0 is pixel frame 0 and latent frame ``s > 0`` pixel frames
    ``(s - 1) c + 1 .. s c``."""
    c = compression
    lo = 0 if latent.start == 0 else (latent.start - 1) * c + 1
    return range(lo, (latent.stop - 1) * c + 1)


@torch.no_grad()
def stream(model: VideoDiffusion, frames: int, height: int, width: int, chunk: int, steps: int = DEFAULT_STEPS,
           seed: int = 0, num: int = 1, progress: bool = False, batch: dict[str, Any] | None = None,
           guidance_scale: float | None = None, lock: bool = True, context: str | None = None,
           context_timestep: float | None = None) -> Iterator[Tensor]:
    """Sample a long video chunk by chunk with the K/V frame buffer: any model whose backbone
    streams (``model.can_stream``), conditioners, experts, guidance and motion lock included.

    - each conditioner gives the chunk's context from its state rolled forward
      (:meth:`~tcplug.WorldConditioner.stream_context`: the world model steps its object state
      chunk by chunk, a caption is encoded once);
    - the router picks each step's expert, classifier-free guidance runs its unconditional pass
      with a K/V buffer of its own;
    - the motion lock is anchored to frame 0 (:class:`~tcplug.diffusion.lock.StreamedLock`);
    - an ancestral sampler draws each frame's step noise from its own generator;
    - the latent design carries what it needs across chunks (a global code, a VAE's context).

    ``context``: ``same_step`` (each chunk attends to earlier frames as they were at the same sampler
    step: exact, streamed = all at once for causal variants) or ``clean`` (a K/V cache of the finished
    frames, :class:`~tcplug.diffusion.sampling.CleanContext`, committed by one more pass per chunk at
    ``context_timestep``); defaults: the model's ``stream_mode`` and ``context_noise``.
    ``batch``, ``guidance_scale``, ``lock`` as :func:`generate`. ``chunk`` counts pixel frames.
    Yields decoded video chunks ``(num, <= chunk, 3, height, width)`` in [-1, 1]; memory is bounded
    by the attention windows, not by ``frames``. For causal variants without a motion lock, the same
    seed gives the same frames as :func:`generate`.
    """
    if not model.can_stream:
        raise TcplugError(f"backbone {type(model.backbone).__name__} does not support streaming: its attention "
                          "variant looks at future frames or has no bounded window (give it a causal variant "
                          "with a window, e.g. cross_frame)")
    latent = model.latent
    f, c = latent.downsample, latent.temporal_compression
    frame_shape = (latent.latent_channels, height // f, width // f)
    latent_frames = latent.latent_frames(frames)
    latent_chunk = chunk if c == 1 else max(1, (chunk - 1) // c + 1)  # chunk counts pixel frames
    configure = model.timestep_schedule((num, latent_frames, *frame_shape))
    scale = model.guidance_scale if guidance_scale is None else guidance_scale
    whole = {**(batch or {}), "frame_size": (height, width), "num_clips": num, "num_frames": frames}
    context = model.stream_mode if context is None else context
    context_timestep = model.context_noise if context_timestep is None else float(context_timestep)
    buffers = (make_stream(context), make_stream(context))  # the conditional and the unconditional pass
    preview_buffer = FrameStream()
    states: list[dict[str, Any]] = [{} for _ in model.conditioners]
    locker = StreamedLock(model.lock) if lock and model.motion_lock is not None else None
    carried: dict[str, Any] = {}  # what the latent design carries across chunks
    preview_carried: dict[str, Any] = {}
    model.sampler_expert_steps = [0] * model.num_experts
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=frames, desc="streaming", unit="frame")
    for span in chunk_ranges(latent_frames, latent_chunk):
        shape = (num, len(span), *frame_shape)
        pixels = pixel_frames(span, c)
        cond_batch = {**whole, "frames": pixels, "num_frames": len(pixels)}
        ctx = model.stream_context(cond_batch, shape, span.start, states)
        null = model.null_context(ctx)
        noise = torch.stack([frame_noise(seed, k, span, frame_shape) for k in range(num)]).to(model.device)
        gens = frame_generators(seed, num, span)

        run = functools.partial(_sample_chunk, model, noise, span, ctx, null, scale, configure)

        def preview(run=run, span=span) -> Tensor:  # a cheap streamed first pass of this chunk, no lock
            z = run((preview_buffer,), model.lock.preview_steps, None, frame_generators(seed, num, span), count=False)
            return latent.decode_stream(z, preview_carried).clamp(-1, 1)

        locked = locker.chunk(model, cond_batch, ctx, shape, span.start, preview) if locker else None
        z = run(buffers, steps, locked, gens)
        if isinstance(buffers[0], CleanContext):  # the finished chunk joins the cache of each pass
            for buffer, c_ctx in ((buffers[0], ctx), (buffers[1], null)):
                if c_ctx is not None or buffer is buffers[0]:
                    commit_chunk(functools.partial(_denoise_with, model, {**(c_ctx or {}), "stream": buffer}),
                                 [buffer], z, model.schedule, context_timestep, seed, span)
        if locker is not None:
            locker.finished(z, noise, span.start)
        if bar is not None:
            bar.update(len(pixels))
        yield latent.decode_stream(z, carried).clamp(-1, 1)
    if bar is not None:
        bar.close()


__all__ = ["generate", "pixel_frames", "stream"]
