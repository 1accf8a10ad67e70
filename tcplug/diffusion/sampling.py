"""Noise schedules and the sampler loop, built on diffusers schedulers.

:class:`NoiseSchedule` holds what training and sampling must agree on: how noise is added,
what the backbone is trained to predict, and how a prediction maps back to clean latents.
Two families are supported:

- ``ddpm``: the discrete variance-preserving schedule of diffusers' ``DDPMScheduler``
  (``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps``) with prediction ``epsilon``, ``v_prediction``
  or ``sample`` (x0); sampled with ``DDIMScheduler`` (default) or ``DDPMScheduler``.
- ``flow_matching``: rectified flow (``x_t = (1 - s) x_0 + s eps``, ``t = 1000 s``) with
  velocity prediction ``eps - x_0``; sampled with ``FlowMatchEulerDiscreteScheduler``.
  ``shift`` warps ``s`` towards high noise exactly as that scheduler does, in training too.

Timesteps may be per clip ``(B,)``, per frame ``(B, T)``, or per latent pixel
``(B, T, 1, h, w)``; coefficients broadcast over latents ``(B, T, C, h, w)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from tcplug.errors import TcplugError

if TYPE_CHECKING:  # pragma: no cover
    from tcplug.diffusion.lock import LockedSampling

NoiseKind = Literal["ddpm", "flow_matching"]
Prediction = Literal["epsilon", "v_prediction", "sample", "flow"]
SamplerName = Literal["ddim", "ddpm", "euler"]


def _expand(coef: Tensor, like: Tensor) -> Tensor:
    """Broadcast a per-clip/per-frame/per-pixel coefficient over ``(B, T, C, h, w)``."""
    if coef.dim() == 1:
        return coef.view(-1, 1, 1, 1, 1).to(like.dtype)
    if coef.dim() == 2:
        return coef.view(coef.shape[0], coef.shape[1], 1, 1, 1).to(like.dtype)
    if coef.dim() == like.dim():
        return coef.to(like.dtype)
    raise ValueError(f"timesteps of shape {tuple(coef.shape)} do not broadcast over {tuple(like.shape)}")


class NoiseSchedule:
    """Training/sampling agreement. Plain object (not a module): picklable, no parameters."""

    def __init__(
        self,
        kind: NoiseKind = "ddpm",
        prediction_type: Prediction = "epsilon",
        num_train_timesteps: int = 1000,
        beta_schedule: str = "squaredcos_cap_v2",
        sampler: SamplerName = "ddim",
        shift: float = 1.0,
        scheduler: str | dict | None = None,
    ) -> None:
        if kind == "flow_matching":
            if prediction_type not in ("flow", "epsilon"):
                raise TcplugError(
                    f"flow_matching predicts the velocity; prediction_type {prediction_type!r} "
                    "is not supported with it (use 'flow')"
                )
            prediction_type, sampler = "flow", "euler"
        elif prediction_type == "flow":
            raise TcplugError("prediction_type 'flow' needs kind 'flow_matching'")
        if sampler == "euler" and kind != "flow_matching":
            raise TcplugError("sampler 'euler' is the flow-matching sampler; use 'ddim' or 'ddpm'")
        self.kind, self.prediction_type, self.sampler = kind, prediction_type, sampler
        self.num_train_timesteps, self.beta_schedule, self.shift = num_train_timesteps, beta_schedule, shift
        self.scheduler_config = load_scheduler_config(scheduler) if scheduler is not None else None
        if kind == "ddpm":
            from diffusers import DDPMScheduler

            ref = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule)
            self.alphas_cumprod = ref.alphas_cumprod.float()

    # ----- training ---------------------------------------------------------------------
    def sample_timesteps(self, batch: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
        """Random training timesteps, one per clip ``(B,)``."""
        if self.kind == "ddpm":
            return torch.randint(0, self.num_train_timesteps, (batch,), device=device, generator=generator)
        u = torch.rand(batch, device=device, generator=generator)
        return self.shift_sigma(u) * self.num_train_timesteps

    def shift_sigma(self, sigma: Tensor) -> Tensor:
        """The flow-matching shift applied by ``FlowMatchEulerDiscreteScheduler``."""
        return self.shift * sigma / (1 + (self.shift - 1) * sigma)

    def _coefs(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """``(a, b)`` with ``x_t = a * x_0 + b * eps``."""
        if self.kind == "ddpm":
            ac = self.alphas_cumprod.to(t.device)[t.long()]
            return _expand(ac.sqrt(), like), _expand((1 - ac).sqrt(), like)
        sigma = t.float() / self.num_train_timesteps
        return _expand(1 - sigma, like), _expand(sigma, like)

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio ``a^2 / b^2`` at timesteps ``t`` (same shape as ``t``)."""
        if self.kind == "ddpm":
            ac = self.alphas_cumprod.to(t.device)[t.long()]
            return ac / (1 - ac).clamp_min(1e-12)
        sigma = (t.float() / self.num_train_timesteps).clamp(1e-6, 1 - 1e-6)
        return ((1 - sigma) / sigma) ** 2

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        a, b = self._coefs(t, x0)
        return a * x0 + b * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the backbone is trained to output."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        if self.prediction_type == "flow":
            return noise - x0
        a, b = self._coefs(t, x0)  # v_prediction
        return a * noise - b * x0

    def pred_x0(self, xt: Tensor, pred: Tensor, t: Tensor) -> Tensor:
        """Clean latents implied by a prediction (differentiable)."""
        if self.prediction_type == "sample":
            return pred
        a, b = self._coefs(t, xt)
        if self.prediction_type == "epsilon":
            return (xt - b * pred) / a.clamp_min(1e-4)
        if self.prediction_type == "flow":
            return xt - b * pred
        return a * xt - b * pred  # v_prediction

    # ----- sampling ---------------------------------------------------------------------
    def make_sampler(self, steps: int, configure: Callable[[Any, int], dict | None] | None = None):
        """A fresh diffusers scheduler set to ``steps`` inference steps.

        ``configure(scheduler, steps)`` may return the keyword arguments of ``set_timesteps``
        instead (a model family whose pipeline passes its own ``sigmas`` or a dynamic shift
        ``mu``, see :meth:`tcplug.Backbone.timestep_schedule`); None keeps ``set_timesteps(steps)``."""
        import diffusers

        n = self.num_train_timesteps
        if self.scheduler_config is not None:  # the one the model folder names (e.g. Wan's UniPC)
            sched = getattr(diffusers, self.scheduler_config["_class_name"]).from_config(self.scheduler_config)
        elif self.kind == "flow_matching":
            sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=n, shift=self.shift)
        elif self.sampler == "ddim":
            sched = diffusers.DDIMScheduler(
                num_train_timesteps=n, beta_schedule=self.beta_schedule, prediction_type=self.prediction_type,
                clip_sample=False, timestep_spacing="trailing", set_alpha_to_one=False,
            )
        else:
            sched = diffusers.DDPMScheduler(
                num_train_timesteps=n, beta_schedule=self.beta_schedule, prediction_type=self.prediction_type,
                clip_sample=False, timestep_spacing="trailing",
            )
        kwargs = configure(sched, steps) if configure is not None else None
        if kwargs:
            sched.set_timesteps(**kwargs)
        else:
            sched.set_timesteps(steps)
        return sched


def load_scheduler_config(scheduler: str | dict) -> dict:
    """A diffusers scheduler config: from a local scheduler folder (``scheduler_config.json``,
    e.g. a model folder's ``scheduler/``) or a dict with ``_class_name``. Checked here, so a bad
    one fails when the model is built, not at the first validation."""
    import json
    from pathlib import Path

    import diffusers

    if isinstance(scheduler, str):
        path = Path(scheduler).expanduser()
        file = path / "scheduler_config.json" if path.is_dir() else path
        if not file.is_file():
            raise TcplugError(f"scheduler {scheduler!r}: no scheduler_config.json there (give a model folder's scheduler/)")
        try:
            config = json.loads(file.read_text())
        except ValueError as exc:
            raise TcplugError(f"scheduler {file}: not valid JSON ({exc})") from None
    else:
        config = dict(scheduler)
    name = config.get("_class_name")
    if not name or not isinstance(getattr(diffusers, name, None), type) or not hasattr(getattr(diffusers, name), "step"):
        raise TcplugError(f"scheduler config names no diffusers scheduler class (_class_name={name!r})")
    return config


def sample_loop(
    model_fn: Callable[[Tensor, Tensor], Tensor],
    noise: Tensor,
    schedule: NoiseSchedule,
    steps: int,
    generator: torch.Generator | None = None,
    progress: bool = False,
    lock: LockedSampling | None = None,
    configure: Callable[[Any, int], dict | None] | None = None,
    frame_generators: list[torch.Generator] | None = None,
    before_step: Callable[[int], None] | None = None,
) -> Tensor:
    """Denoise ``noise`` (latents ``(B, T, C, h, w)``) in ``steps`` sampler steps.

    ``model_fn(x_t, timesteps) -> prediction`` in the schedule's parameterization; timesteps
    are ``(B,)``, or per latent pixel ``(B, T, 1, h, w)`` when a lock is given.

    An ancestral sampler (``ddpm``) draws fresh noise at every step: from ``generator``, or, with
    ``frame_generators`` (one per clip and frame, clip-major: :func:`frame_generators`), each
    frame's from its own generator, so that a frame gets the same noise at every step whether the
    video is sampled at once or chunk by chunk. ``before_step(i)`` is called before step ``i``
    (the streaming pipeline points its K/V buffers at the step).

    ``lock`` (:class:`~tcplug.diffusion.lock.LockedSampling`) ties the locked positions of every
    frame after the anchor (frame 0) to the anchor: they start from the anchor's noise; after each
    step they hold the anchor's current clean estimate re-noised to the lock's near-zero timestep
    (which the model sees) while free positions take the full step. ``configure``: see
    :meth:`NoiseSchedule.make_sampler`. Returns clean latents of the input's shape.
    """
    sched = schedule.make_sampler(steps, configure)
    x = noise * getattr(sched, "init_noise_sigma", 1.0)
    scale = getattr(sched, "scale_model_input", None)
    if lock is not None:
        x = lock.start(x, noise, schedule)
    timesteps = sched.timesteps
    if progress:
        from tqdm.auto import tqdm

        timesteps = tqdm(timesteps, desc="sampling", leave=False)
    for i, t in enumerate(timesteps):
        t_batch = torch.full((x.shape[0],), float(t), device=x.device)
        if schedule.kind == "ddpm":
            t_batch = t_batch.long()
        t_in = lock.timesteps(i, t_batch) if lock is not None else t_batch
        if before_step is not None:
            before_step(i)
        pred = model_fn(scale(x, t) if scale is not None else x, t_in)
        before = x
        if schedule.kind == "ddpm" and schedule.sampler == "ddpm" and frame_generators is not None:
            if len(frame_generators) != x.shape[0] * x.shape[1]:
                raise TcplugError(f"{len(frame_generators)} frame generators for {x.shape[0]} clips x {x.shape[1]} "
                                  "frames")
            # one row per (clip, frame): diffusers draws a list of generators' noise row by row
            x = sched.step(pred.flatten(0, 1), t, x.flatten(0, 1), generator=frame_generators).prev_sample.view_as(x)
        elif schedule.kind == "ddpm" and schedule.sampler == "ddpm":
            x = sched.step(pred, t, x, generator=generator).prev_sample
        else:
            x = sched.step(pred, t, x).prev_sample
        if lock is not None:
            x = lock.after_step(before, pred, t_batch, x, schedule)
    return lock.finish(x) if lock is not None else x


# ----- per-frame noise and streaming ----------------------------------------------------------
def frame_noise(seed: int, clip: int, frames: range, frame_shape: tuple[int, ...]) -> Tensor:
    """Initial noise ``(len(frames), *frame_shape)``, each frame from its own generator.

    Frame ``f`` of clip ``clip`` always gets the same noise for a seed, whether the video is
    sampled all at once or chunk by chunk.
    """
    out = []
    for f in frames:
        g = torch.Generator().manual_seed((seed * 1_000_003 + clip) * 100_003 + f)
        out.append(torch.randn(frame_shape, generator=g))
    return torch.stack(out)


def frame_generators(seed: int, clips: int, frames: range) -> list[torch.Generator]:
    """The ancestral sampler's step noise: one generator per clip and frame (clip-major, as
    ``(B, T)`` flattens), seeded apart from :func:`frame_noise`'s. Each frame draws from its own
    generator once per step, whatever chunk it is sampled in."""
    return [torch.Generator().manual_seed((((seed * 1_000_003 + c) * 100_003 + f) ^ 0x5DEECE66D) & (2**63 - 1))
            for c in range(clips) for f in frames]


class FrameStream:
    """The streaming K/V frame buffer.

    While a long video is sampled chunk by chunk, every attention block keeps, for every
    sampler step, the keys/values of the frames its variant still needs (its
    :meth:`~tcplug.AttentionVariant.memory`: the last ``window`` frames and, optionally, the
    first frame). Memory is bounded by the window, never by the video length. For a causal
    variant, streamed sampling therefore equals all-at-once sampling.

    Entries are keyed by the attention module, the block index and the step, so several expert
    backbones share one buffer without mixing; the guided (unconditional) pass keeps a buffer of
    its own (the pipeline gives it a second ``FrameStream``).
    """

    def __init__(self) -> None:
        self.step = 0
        self.frame_start = 0
        self._kv: dict[tuple[int, int, int], tuple[Tensor, Tensor, Tensor]] = {}

    def attend(self, attn, block: int, q: Tensor, k: Tensor, v: Tensor, reposition=None) -> Tensor:
        """Attention of the current chunk ``q, k, v (B, T, H, N, D)`` over buffer + chunk; ``reposition``
        (a rotary family's): see :meth:`positioned`."""
        t = q.shape[1]
        idx = torch.arange(self.frame_start, self.frame_start + t, device=q.device)
        key = (id(attn), block, self.step)
        past = self._kv.get(key)
        if past is not None:
            k, v, idx = torch.cat([past[0], k], 1), torch.cat([past[1], v], 1), torch.cat([past[2], idx])
        out = attn(q, self.positioned(attn, k, idx, reposition), v, kv_index=idx)
        self._store(attn, key, k, v, idx, t)
        return out

    def positioned(self, attn, k: Tensor, idx: Tensor, reposition=None) -> Tensor:
        """The keys as attended. With the variant's ``sink_positions: rolling`` and a family's
        ``reposition(k, old, new)`` (keys moved between rotary frame positions), the sink frames sit
        just before the oldest other kept frame, as in a training clip, not ever farther from the
        window (StreamingLLM's positions within the cache); the buffer keeps them as computed."""
        if reposition is None or getattr(attn, "sink_positions", "absolute") != "rolling":
            return k
        sink = idx < int(attn.memory()[1])
        gap = int(idx[~sink].min()) - int(sink.sum()) if sink.any() and not sink.all() else 0
        if gap > 0:  # (none while the sink is still next to the window)
            k = k.clone()
            k[:, sink] = reposition(k[:, sink], idx[sink], idx[sink] + gap)
        return k

    def _store(self, attn, key, k: Tensor, v: Tensor, idx: Tensor, t: int) -> None:
        """Keep of ``k, v`` the frames the variant still needs after this chunk (its ``memory()``)."""
        window, first = attn.memory()
        keep = idx >= self.frame_start + t - window
        if first:  # True: the first frame; an int: that many leading (sink) frames
            keep = keep | (idx < int(first))
        self._kv[key] = (k[:, keep], v[:, keep], idx[keep])

    def buffered_frames(self) -> int:
        """Frames currently held (summed over blocks and steps)."""
        return sum(int(e[2].numel()) for e in self._kv.values())


class CleanContext(FrameStream):
    """Clean-context autoregression: a K/V cache of *finished* frames.

    :class:`FrameStream` (the same-step buffer) lets each chunk attend, at sampler step ``j``, to
    earlier frames as they were at step ``j`` of their own chunk: exact for causal variants
    (streamed = all at once), but the context is as noisy as the chunk. Here each chunk attends, at
    every step, to the keys/values of the frames already generated, computed once per chunk by a
    *commit* pass over its finished latents (at ``context_timestep``: 0 = clean, above 0 = the
    noise-augmented context a model trained with ``model.frame_timesteps: history`` learns to
    correct), as CausVid, Self-Forcing and SkyReels-V2 condition on what they generated. The cache
    keeps what the variant's :meth:`~tcplug.AttentionVariant.memory` asks for (window and sink
    frames), one entry per block (not per step): memory is bounded by the window.
    """

    def __init__(self) -> None:
        super().__init__()
        self.writing = False  # True during the commit pass

    def attend(self, attn, block: int, q: Tensor, k: Tensor, v: Tensor, reposition=None) -> Tensor:
        t = q.shape[1]
        idx = torch.arange(self.frame_start, self.frame_start + t, device=q.device)
        key = (id(attn), block)
        past = self._kv.get(key)
        if past is not None:
            k, v, idx = torch.cat([past[0], k], 1), torch.cat([past[1], v], 1), torch.cat([past[2], idx])
        out = attn(q, self.positioned(attn, k, idx, reposition), v, kv_index=idx)
        if self.writing:
            self._store(attn, key, k, v, idx, t)
        return out


STREAM_CONTEXTS = ("same_step", "clean")


def chunk_ranges(frames: int, chunk: int) -> list[range]:
    """Consecutive ranges of at most ``chunk`` frames covering ``range(frames)``."""
    if chunk < 1:
        raise TcplugError(f"chunk must be >= 1 frame, got {chunk}")
    return [range(s, min(s + chunk, frames)) for s in range(0, frames, chunk)]


@torch.no_grad()
def stream_sample(
    model_fn: Callable[[Tensor, Tensor, FrameStream], Tensor],
    frame_shape: tuple[int, ...],
    num_frames: int,
    chunk: int,
    schedule: NoiseSchedule,
    steps: int,
    seed: int = 0,
    num_clips: int = 1,
    device: torch.device | str = "cpu",
    progress: bool = False,
    configure: Callable[[Any, int], dict | None] | None = None,
    context: str = "same_step",
    context_timestep: float = 0.0,
):
    """Sample ``num_frames`` frames in chunks of ``chunk``, carrying the K/V buffer (a bare
    backbone; :func:`tcplug.diffusion.stream` streams a whole model, conditioners and lock included).

    ``model_fn(x (B, C, c, h, w), timesteps (B,), stream) -> prediction``. Yields clean latents
    chunk by chunk, each ``(num_clips, <= chunk, c, h, w)``; nothing accumulates. An ancestral
    sampler draws each frame's step noise from its own generator (:func:`frame_generators`).
    ``context``: ``same_step`` (:class:`FrameStream`) or ``clean`` (:class:`CleanContext`, each
    chunk committed by one more pass at ``context_timestep``, see :func:`commit_chunk`).
    """
    stream = make_stream(context)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_frames, desc="streaming", unit="frame")
    for frames in chunk_ranges(num_frames, chunk):
        x = torch.stack([frame_noise(seed, c, frames, frame_shape) for c in range(num_clips)]).to(device)
        stream.frame_start = frames.start

        def at(i: int) -> None:
            stream.step = i

        x = sample_loop(lambda z, t: model_fn(z, t, stream), x, schedule, steps, configure=configure,
                        frame_generators=frame_generators(seed, num_clips, frames), before_step=at)
        if isinstance(stream, CleanContext):
            commit_chunk(lambda z, t: model_fn(z, t, stream), [stream], x, schedule, context_timestep, seed, frames)
        if bar is not None:
            bar.update(len(frames))
        yield x
    if bar is not None:
        bar.close()


def make_stream(context: str) -> FrameStream:
    """The K/V buffer of a streamed video: ``same_step`` or ``clean`` (:data:`STREAM_CONTEXTS`)."""
    if context not in STREAM_CONTEXTS:
        raise TcplugError(f"stream context {context!r}: use one of {', '.join(STREAM_CONTEXTS)}")
    return CleanContext() if context == "clean" else FrameStream()


def commit_chunk(model_fn: Callable[[Tensor, Tensor], Tensor], caches: list[CleanContext], z: Tensor,
                 schedule: NoiseSchedule, timestep: float, seed: int, frames: range) -> None:
    """The commit pass of clean-context streaming: the finished latents ``z`` ``(B, T, C, h, w)`` of
    latent frames ``frames``, noised to ``timestep`` (0: as they are) with noise of their own, run
    through ``model_fn`` once while ``caches`` record their keys/values."""
    t = torch.full((z.shape[0],), float(timestep), device=z.device)
    if schedule.kind == "ddpm":
        t = t.long()
    if timestep > 0:
        noise = torch.stack([frame_noise(seed + 7_919, c, frames, tuple(z.shape[2:])) for c in range(z.shape[0])])
        z = schedule.add_noise(z, noise.to(z), t)
    for cache in caches:
        cache.writing, cache.frame_start = True, frames.start
    try:
        model_fn(z, t)
    finally:
        for cache in caches:
            cache.writing = False
