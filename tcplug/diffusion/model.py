"""The video diffusion model, free of Lightning: components wired, the forward (noising)
process, routing, guidance and the motion lock's mask.

``video -> latent.encode -> noise (and the lock's per-token timesteps) -> [router ->]
backbone(+ conditioner context) -> prediction``. Training (the loss terms) lives in
:class:`tcplug.module.TCPlugModule`; sampling in :mod:`tcplug.diffusion.pipeline`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from tcplug.diffusion import forcing
from tcplug.diffusion.lock import LockSettings, lock_training, token_mask
from tcplug.diffusion.sampling import NoiseSchedule
from tcplug.errors import TcplugError
from tcplug.kinds import Backbone, Component, LatentDesign, MotionLocker, Router, WorldConditioner
from tcplug.lora import LoraSpec, apply_lora


@dataclass
class Noised:
    """One training batch after the forward process (shapes ``(B, T', C, h, w)``).

    ``timesteps`` are per clip ``(B,)``, or per latent pixel ``(B, T', 1, h, w)`` under a motion
    lock; ``weight_mask`` then weighs each position's denoising error (else None)."""

    x0: Tensor
    noise: Tensor
    xt: Tensor
    timesteps: Tensor
    context: dict[str, Any] | None
    weight_mask: Tensor | None = None


#: ``model.frame_timesteps``: training noise levels per clip, or per frame (diffusion forcing)
FRAME_TIMESTEPS = ("clip", "independent", "history")


def clip_timesteps(timesteps: Tensor) -> Tensor:
    """One timestep per clip ``(B,)``: per-frame/per-token timesteps reduce to their maximum,
    the noise level of the free tokens (locked tokens carry a near-zero timestep)."""
    return timesteps if timesteps.dim() == 1 else timesteps.flatten(1).amax(1)


def _rows(value: Any, rows: Tensor) -> Any:
    """Select batch rows of a context entry (tensor, list of tensors, or anything else as is)."""
    if torch.is_tensor(value):
        return value[rows]
    if isinstance(value, list) and value and torch.is_tensor(value[0]):
        return [v[rows] for v in value]
    return value


class VideoDiffusion(nn.Module):
    """Latent video diffusion over injected components (a plain ``nn.Module``).

    Args:
        backbone: the denoiser, or one backbone per expert of a router with ``experts: backbone``
            (expert 0 takes the highest noise).
        latent: the latent design (default: the registry's ``pixel``).
        router: noise-level expert routing; with ``num_experts > 1`` the backbone is cloned per
            expert (``experts: backbone``) or its feed-forward layers are (``experts: ffn``).
        conditioners: structural conditioning, contexts merged (residuals summed).
        motion_lock: the locker, applied with ``lock`` (:class:`~tcplug.diffusion.lock.LockSettings`).
        schedule: the :class:`~tcplug.diffusion.sampling.NoiseSchedule` training and sampling share.
        guidance_scale: classifier-free guidance at sampling (1 = the conditional prediction).
        lora: LoRA adapters (peft) in every expert instead of training the whole backbone.
        train_experts: with several expert backbones, train only these (indices).
        frame_timesteps: training noise levels: ``clip`` (one per clip), ``independent`` (one per
            frame, drawn independently: diffusion forcing) or ``history`` (a random number of leading
            frames are context, clean or noised up to ``context_noise``; the others share one level:
            what clean-context streaming asks of the model).
        context_noise: the context frames' highest training timestep under ``history``, and the
            timestep clean-context streaming commits finished frames at (noise-augmented context).
        stream_mode: what streamed chunks attend to: ``same_step`` or ``clean``
            (:func:`~tcplug.diffusion.stream`).
        rollout_prob: the share of training batches whose first ``rollout_frames`` latent frames
            (default: half the clip) are replaced by the model's own rollout (``rollout_steps``
            sampler steps, no gradient, from the batch's conditions), held as context at
            ``U[0, context_noise]`` and left out of the loss: the later frames learn to continue what
            the model itself made (training on its own rollouts, as Self-Forcing; here with the data's
            later frames as the target).
    """

    def __init__(self, backbone: Backbone | list[Backbone], latent: LatentDesign | None = None,
                 router: Router | None = None, conditioners: list[WorldConditioner] | None = None,
                 motion_lock: MotionLocker | None = None, schedule: NoiseSchedule | None = None,
                 lock: LockSettings | None = None, guidance_scale: float = 1.0, lora: LoraSpec | None = None,
                 train_experts: list[int] | None = None, frame_timesteps: str = "clip", context_noise: float = 0.0,
                 stream_mode: str = "same_step", rollout_prob: float = 0.0, rollout_frames: int = 0,
                 rollout_steps: int = 4) -> None:
        super().__init__()
        from tcplug.diffusion.sampling import STREAM_CONTEXTS

        if frame_timesteps not in FRAME_TIMESTEPS:
            raise TcplugError(f"model.frame_timesteps {frame_timesteps!r}: use one of {', '.join(FRAME_TIMESTEPS)}")
        if stream_mode not in STREAM_CONTEXTS:
            raise TcplugError(f"model.stream_mode {stream_mode!r}: use one of {', '.join(STREAM_CONTEXTS)}")
        if context_noise < 0:
            raise TcplugError(f"model.context_noise must be >= 0, got {context_noise}")
        self.frame_timesteps, self.context_noise, self.stream_mode = frame_timesteps, float(context_noise), stream_mode
        if not 0 <= rollout_prob <= 1 or rollout_frames < 0 or rollout_steps < 1:
            raise TcplugError(f"model.rollout_prob must be in [0, 1], rollout_frames >= 0 and rollout_steps >= 1 (got "
                              f"{rollout_prob}, {rollout_frames}, {rollout_steps})")
        self.rollout_prob, self.rollout_frames, self.rollout_steps = rollout_prob, rollout_frames, rollout_steps
        if latent is None:
            from tcplug.registry import get_registry

            latent = get_registry().get("latent", "pixel")()
        self.latent = latent
        given = list(backbone) if isinstance(backbone, (list, tuple, nn.ModuleList)) else None
        n_experts = router.num_experts if router is not None else 1
        if given is not None:  # one backbone per expert (e.g. Wan 2.2's transformer and transformer_2)
            if router is None or router.experts != "backbone" or len(given) != n_experts:
                raise TcplugError(f"model.backbone is a list of {len(given)} backbones: that needs a router with "
                                  f"experts: backbone and num_experts: {len(given)} (got "
                                  f"{'no router' if router is None else f'{n_experts} experts'})")
            backbone = given[0]
        if backbone.in_channels != latent.latent_channels:
            raise TcplugError(f"backbone.in_channels={backbone.in_channels} but the latent design "
                              f"{type(latent).__name__} has latent_channels={latent.latent_channels}")
        conditioners = list(conditioners or [])
        for c in conditioners:  # size adapters to the backbone, add cross-attention, ... before cloning it
            for expert in given or [backbone]:
                c.setup(expert)
        self.conditioners = nn.ModuleList(conditioners)
        self.router = router
        if router is not None and router.experts not in ("backbone", "ffn"):
            raise TcplugError(f"router experts={router.experts!r}: use 'backbone' or 'ffn'")
        if router is not None and router.experts == "ffn" and n_experts > 1:
            backbone.add_ffn_experts(n_experts)
            n_experts = 1
        self.experts = nn.ModuleList(given if given is not None else
                                     [backbone] + [copy.deepcopy(backbone) for _ in range(n_experts - 1)])
        self.lora = lora
        if lora is not None:  # adapters only: every other backbone weight is frozen
            for expert in self.experts:
                apply_lora(expert, lora)
        self.train_experts = train_experts
        if train_experts is not None:  # the other experts are frozen (their batches still flow through them)
            bad = [i for i in train_experts if not 0 <= i < len(self.experts)]
            if bad or not train_experts:
                raise TcplugError(f"model.train_experts {train_experts}: give indices in 0..{len(self.experts) - 1}")
            for i, expert in enumerate(self.experts):
                if i not in train_experts:
                    expert.requires_grad_(False)
        self.motion_lock = motion_lock
        self.lock = lock or LockSettings()
        self.schedule = schedule or NoiseSchedule()
        self.guidance_scale = guidance_scale
        self.sampler_expert_steps: list[int] = []  # sampler steps per expert of the last sample

    @property
    def backbone(self) -> Backbone:
        return self.experts[0]

    @property
    def num_experts(self) -> int:
        return self.router.num_experts if self.router is not None else 1

    def components(self) -> list[Component]:
        """Every component inside the model (nested ones, such as attention variants, too)."""
        return [m for m in self.modules() if isinstance(m, Component)]

    def check_clip(self, frames: int | None, size: int | None) -> None:
        """The clip fits the model: a frame count the latent design takes (a video VAE takes
        ``c k + 1`` frames), a frame size that is a multiple of the latent's downsampling times the
        backbone's patch size. Raises a clear error naming the data setting."""
        if frames is not None:
            try:
                self.latent.latent_frames(frames)
            except TcplugError as exc:
                raise TcplugError(f"data.frames={frames}: {exc}") from None
        unit = int(self.latent.downsample) * int(self.backbone.patch_size or 1)
        if size is not None and size % unit:
            lo = max(unit, size // unit * unit)
            raise TcplugError(
                f"data.size={size} does not fit the model: the latent design ({type(self.latent).__name__}) downsamples "
                f"{self.latent.downsample}x and the backbone's patch_size is {self.backbone.patch_size}, so the frame "
                f"size must be a multiple of {unit} (e.g. {lo} or {lo + unit})")

    def example_input(self, frames: int | None, size: int | None) -> tuple[Tensor, Tensor] | None:
        """A one-clip latent batch and a mid timestep for ``frames`` frames of ``size x size`` (what
        Lightning's model summary counts FLOPs with), or None when the clip does not fit."""
        if not frames or not size:
            return None
        try:
            shape = self.latent_shape(1, frames, size, size)
        except TcplugError:
            return None
        return torch.zeros(shape), torch.full((1,), self.schedule.num_train_timesteps // 2)

    def latent_shape(self, num: int, frames: int, height: int, width: int) -> tuple[int, int, int, int, int]:
        """Latents ``(num, T', C, h, w)`` for ``num`` clips of ``frames`` frames of ``height x width``."""
        f = self.latent.downsample
        return num, self.latent.latent_frames(frames), self.latent.latent_channels, height // f, width // f

    # ----- conditioning and denoising -------------------------------------------------------
    def context(self, batch: dict[str, Any] | None, latent_shape: tuple[int, ...]) -> dict[str, Any] | None:
        """Conditioning for the backbone: the conditioners' contexts merged (residuals summed,
        ``maps`` and ``input_maps`` concatenated along ``K``). A batch of keyframe clips
        (``batch["frame_stride"]`` ``K > 1``, ``data.frame_stride``) adds ``frame_index``
        ``0, K, 2K, ...``: the backbone places its frames ``K`` apart, as a keyframes pass does."""
        ctx = self._merge(c(batch, latent_shape) for c in self.conditioners) if len(self.conditioners) else None
        stride = int((batch or {}).get("frame_stride", 1))
        if stride > 1:
            ctx = {**(ctx or {}), "frame_index": list(range(0, latent_shape[1] * stride, stride))}
        return ctx

    def stream_context(self, batch: dict[str, Any], latent_shape: tuple[int, ...], start: int,
                       states: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The merged context of one chunk of a streamed video (latent frames ``start ..
        start + T``): each conditioner's :meth:`~tcplug.WorldConditioner.stream_context`, with its
        own entry of ``states`` (one dict per conditioner, kept across the chunks)."""
        if len(self.conditioners) == 0:
            return None
        return self._merge(c.stream_context(batch, latent_shape, start, state)
                           for c, state in zip(self.conditioners, states))

    @staticmethod
    def _merge(contexts) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for ctx in contexts:
            for key, value in ctx.items():
                if key == "residuals" and key in merged:
                    merged[key] = [a + b for a, b in zip(merged[key], value)]
                elif key in ("maps", "input_maps") and key in merged:
                    merged[key] = torch.cat([merged[key], value], dim=2)
                elif key in merged:
                    raise TcplugError(f"two conditioners both set context[{key!r}]")
                else:
                    merged[key] = value
        return merged

    def null_context(self, context: dict[str, Any] | None) -> dict[str, Any] | None:
        """The unconditional context for guidance: every conditioner's condition dropped (None
        if no conditioner has an unconditional form)."""
        if context is None:
            return None
        dropped = False
        for c in self.conditioners:
            null = c.null_context(context)
            if null is not None:
                context, dropped = null, True
        return context if dropped else None

    def _token_timesteps(self, timesteps: Tensor) -> Tensor:
        """Per-latent-pixel timesteps ``(B, T, 1, h, w)`` -> per backbone token ``(B, T, N)``."""
        if timesteps.dim() != 5:
            return timesteps
        p = self.backbone.patch_size
        t = timesteps[:, :, 0].float()
        if p > 1:
            t = torch.nn.functional.avg_pool2d(t, p)
        return t.flatten(2)

    def route(self, timesteps: Tensor) -> Tensor | None:
        """Expert weights ``(B, E)`` for timesteps of any granularity (None without a router).

        Per-frame/per-token timesteps route by their maximum: the noise level of the free
        tokens (locked tokens carry a near-zero timestep). Training and sampling both call this.
        """
        if self.router is None:
            return None
        return self.router(clip_timesteps(timesteps), self.schedule)

    def denoise(self, xt: Tensor, timesteps: Tensor, context: dict[str, Any] | None = None) -> Tensor:
        """The (routed) backbone prediction for noisy latents ``(B, T, C, h, w)``.

        ``timesteps`` are per clip ``(B,)``, per frame ``(B, T)`` or per latent pixel
        ``(B, T, 1, h, w)`` (motion locking), converted to per-token for the backbone.
        """
        weights = self.route(timesteps)
        t_in = self._token_timesteps(timesteps)
        if weights is None:
            return self.experts[0](xt, t_in, context)
        if len(self.experts) == 1:  # feed-forward experts inside the backbone
            return self.experts[0](xt, t_in, {**(context or {}), "expert_weights": weights})
        out = torch.zeros_like(xt)
        for e, expert in enumerate(self.experts):
            w = weights[:, e]
            rows = (w != 0).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            ctx = None if context is None else {k: _rows(v, rows) for k, v in context.items()}
            out = out.index_add(0, rows, expert(xt[rows], t_in[rows], ctx) * w[rows].view(-1, 1, 1, 1, 1))
        return out

    def guided(self, xt: Tensor, timesteps: Tensor, context: dict[str, Any] | None,
               null: dict[str, Any] | None, scale: float) -> Tensor:
        """Classifier-free guidance: ``uncond + scale * (cond - uncond)``; ``scale == 1`` (or no
        unconditional context) is the conditional prediction alone, at the cost of one pass."""
        cond = self.denoise(xt, timesteps, context)
        if null is None or scale == 1:
            return cond
        uncond = self.denoise(xt, timesteps, null)
        return uncond + scale * (cond - uncond)

    def forward(self, xt: Tensor, timesteps: Tensor) -> Tensor:
        """One unconditioned denoiser pass."""
        return self.denoise(xt, timesteps)

    def lock_mask(self, batch: dict[str, Any] | None, context: dict[str, Any] | None,
                  latent_shape: tuple[int, ...], preview=None) -> Tensor | None:
        """The motion locker's mask reduced to whole backbone tokens, at latent resolution
        ``(B, 1, 1, h, w)`` (1 = locked), or None."""
        if self.motion_lock is None:
            return None
        mask = self.motion_lock(batch or {}, context, preview)
        if mask is None:
            return None
        return token_mask(mask.to(self.device), latent_shape, self.backbone.patch_size)

    @property
    def device(self) -> torch.device:
        """The device the model's weights are on (CPU for a model without parameters)."""
        param = next(self.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    # ----- the forward (noising) process ---------------------------------------------------
    def encode(self, batch: dict[str, Any]) -> Tensor:
        """Clean latents ``(B, T', C, h, w)`` of ``batch["video"]`` ``(B, T, 3, H, W)``: the batch's
        precomputed ``latents`` (``tcplug data encode``) when present, else the latent design's
        encoding (without gradient: diffusion never moves the latent space)."""
        video = batch["video"]
        if video.dim() != 5:
            raise TcplugError(f"batch['video'] must be (B, T, C, H, W), got shape {tuple(video.shape)}")
        if batch.get("latents") is None:
            with torch.no_grad():
                return self.latent.encode(video)
        x0 = batch["latents"].float()
        want = self.latent.latent_frames(video.shape[1])
        if x0.dim() != 5 or x0.shape[1] != want or x0.shape[2] != self.latent.latent_channels:
            raise TcplugError(
                f"precomputed latents of shape {tuple(x0.shape)} do not fit this recipe's latent design "
                f"({want} latent frames of {self.latent.latent_channels} channels for {video.shape[1]} frames): "
                "were the shards encoded with another VAE or frame count? Re-run `tcplug data encode`")
        return x0

    def add_noise(self, batch: dict[str, Any]) -> Noised:
        """The forward process on one batch: latents, noise, timesteps (one per clip), the
        conditioning context, and the motion lock on a ``lock.prob`` share of batches."""
        x0 = self.encode(batch)
        noise = torch.randn_like(x0)
        t = self.frame_noise_levels(x0.shape[0], x0.shape[1], x0.device)
        context = self.context(batch, tuple(x0.shape))
        weight_mask = None
        lock = None
        if self.motion_lock is not None and float(torch.rand(())) < self.lock.prob:
            lock = self.lock_mask(batch, context, tuple(x0.shape))
        rollout = None
        if self.rollout_prob > 0 and x0.shape[1] > 1 and float(torch.rand(())) < self.rollout_prob:
            k = min(self.rollout_frames or x0.shape[1] // 2, x0.shape[1] - 1)
            x0 = torch.cat([self.own_rollout(context, tuple(x0[:, :k].shape)), x0[:, k:]], 1)
            t = self.frame_noise_levels(x0.shape[0], x0.shape[1], x0.device, context_frames=k)
            rollout = (torch.arange(x0.shape[1], device=x0.device) >= k).float().view(1, -1, 1, 1, 1)
        if lock is not None:
            x0, noise, t, weight_mask = lock_training(x0, noise, t, lock, self.lock)
        if rollout is not None:
            weight_mask = rollout if weight_mask is None else weight_mask * rollout
        return Noised(x0, noise, self.schedule.add_noise(x0, noise, t), t, context, weight_mask)

    def own_rollout(self, context: dict[str, Any] | None, shape: tuple[int, ...]) -> Tensor:
        """The model's own first latent frames ``shape`` (:func:`tcplug.diffusion.forcing.own_rollout`)."""
        return forcing.own_rollout(self, context, shape)

    def frame_noise_levels(self, batch: int, frames: int, device: torch.device,
                           context_frames: int | None = None) -> Tensor:
        """Training timesteps (:func:`tcplug.diffusion.forcing.noise_levels`)."""
        return forcing.noise_levels(self, batch, frames, device, context_frames)

    def auxiliary_losses(self, batch: dict[str, Any], timesteps: Tensor, name_of) -> dict[str, tuple[float, Tensor]]:
        """Objectives of the router and conditioners themselves: ``{name: (weight, value)}``;
        ``name_of(component)`` names a term whose component sets no ``aux_name``."""
        out = {}
        if self.router is not None:
            value = self.router.auxiliary_loss(clip_timesteps(timesteps), self.schedule)
            if value is not None:
                out[self.router.aux_name or name_of(self.router)] = (self.router.aux_weight, value)
        for c in self.conditioners:
            value = c.auxiliary_loss(batch)
            if value is not None:
                out[c.aux_name or name_of(c)] = (c.aux_weight, value)
        return out

    # ----- sampling hooks -------------------------------------------------------------------
    def timestep_schedule(self, shape: tuple[int, ...]):
        """The backbone's :meth:`~tcplug.Backbone.timestep_schedule` for latents of ``shape``
        ``(B, T', C, h, w)``, as the sampler's ``configure`` callback."""
        backbone = self.backbone
        return lambda sched, steps: backbone.timestep_schedule(sched, steps, tuple(shape))

    @property
    def can_stream(self) -> bool:
        """Whether the pipeline can stream this model: a streaming backbone (a causal attention
        variant with a bounded window). Conditioners roll their condition forward chunk by chunk
        (:meth:`~tcplug.WorldConditioner.stream_context`), experts and guidance run per chunk, the
        motion lock stays anchored to frame 0, and an ancestral sampler draws each frame's step
        noise from its own generator."""
        return bool(self.backbone.supports_streaming)


__all__ = ["FRAME_TIMESTEPS", "Noised", "VideoDiffusion", "clip_timesteps"]
