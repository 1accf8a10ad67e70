"""The motion lock's token logic and settings, for training and sampling.

A :class:`~tcplug.kinds.MotionLocker` says, per pixel, what is static (1 = locked). The engine
reduces that mask to whole backbone tokens (a token is locked only if every pixel under it is,
because timesteps are per token) and ties the locked tokens of every frame after the anchor
(frame 0) to the anchor:

- in training (:func:`lock_training`), locked tokens take the anchor's content and noise at the
  near-zero :attr:`LockSettings.timestep`, and weigh :attr:`LockSettings.loss_weight` in the
  denoising error (they are given, not predicted);
- in sampling (:class:`LockedSampling`, which the sampler loop calls), locked tokens start from
  the anchor's noise; after each step they hold the anchor's current clean estimate re-noised to
  that timestep (the model sees it per token) while free tokens take the full step.

Shapes: a lock at latent resolution is ``(B, 1, 1, h, w)``; positions ``(B, T, 1, h, w)`` bool.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tcplug.errors import TcplugError


@dataclass
class LockSettings:
    """How the engine applies a locker's mask (the recipe's ``model.lock_*`` settings).

    Attributes:
        timestep: the near-zero timestep of locked tokens (training and sampling).
        copy_anchor: at the end of sampling, overwrite locked tokens with the anchor frame's
            latents (exactly still, but copied rather than generated).
        prob: fraction of training batches that get the lock (the others train the unlocked model).
        loss_weight: weight of locked tokens in the denoising loss (0 = ignore them).
        preview_steps: sampler steps of the cheap first pass a locker may ask for.
    """

    timestep: float = 0.0
    copy_anchor: bool = False
    prob: float = 0.5
    loss_weight: float = 0.0
    preview_steps: int = 4

    def __post_init__(self) -> None:
        if not 0 <= self.prob <= 1:
            raise TcplugError(f"model.lock_prob must be in [0, 1], got {self.prob}")


def token_mask(mask: Tensor, latent_shape: tuple[int, ...], patch_size: int) -> Tensor:
    """A locker's pixel mask ``(B or 1, 1, H, W)`` -> the lock at latent resolution
    ``(B, 1, 1, h, w)`` (1 = locked), reduced to whole tokens of ``patch_size`` latent pixels."""
    b, _, _, h, w = latent_shape
    mask = mask.float()
    if mask.shape[0] == 1 and b > 1:
        mask = mask.expand(b, -1, -1, -1)
    if mask.dim() != 4 or mask.shape[:2] != (b, 1):
        raise TcplugError(f"motion lock mask must be (B, 1, H, W) with B={b}, got {tuple(mask.shape)}")
    # a token is locked only if every pixel under it is: min-pool to the token grid
    tok = 1 - F.adaptive_max_pool2d(1 - mask, (h // patch_size, w // patch_size))
    tok = (tok > 0.5).float()
    return F.interpolate(tok, size=(h, w), mode="nearest").unsqueeze(1)


@torch.no_grad()
def locked_positions(lock: Tensor, frames: int) -> Tensor:
    """A lock ``(B, 1, 1, h, w)`` (1 = locked) -> bool ``(B, frames, 1, h, w)``: the locked
    positions of every frame after the anchor (frame 0, which is never locked)."""
    locked = lock.bool().expand(-1, frames, -1, -1, -1).clone()
    locked[:, 0] = False
    return locked


def lock_training(x0: Tensor, noise: Tensor, t: Tensor, lock: Tensor,
                  settings: LockSettings) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A training batch with locked tokens: ``(x0, noise, timesteps, weight_mask)``, where
    locked tokens of frames after the anchor carry the anchor's content and noise at
    ``settings.timestep``; timesteps become per latent pixel ``(B, T, 1, h, w)`` and
    ``weight_mask`` weighs each position's denoising error."""
    locked = locked_positions(lock, x0.shape[1])
    x0 = torch.where(locked, x0[:, :1], x0)
    noise = torch.where(locked, noise[:, :1], noise)
    per = t.float().view(t.shape[0], -1, 1, 1, 1)  # per clip (B,) or per frame (B, T)
    t = torch.where(locked, torch.full_like(locked, settings.timestep, dtype=torch.float), per)
    weight = torch.where(locked, settings.loss_weight, 1.0).float()
    return x0, noise, t, weight


class LockedSampling:
    """The lock inside the sampler loop (:func:`~tcplug.diffusion.sampling.sample_loop`).

    Args:
        lock: ``(B, 1, 1, h, w)``, 1 = locked.
        timestep: the locked tokens' timestep (``model.lock_timestep``).
        copy_anchor: at the end, overwrite locked tokens with the anchor frame's final latents
            (exactly still, but a copy, not something the model produced; off by default).
        anchor: the anchor frame's finished latents ``(B, 1, C, h, w)`` when it is not in the
            latents being sampled (a later chunk of a streamed video; frame 0 was sampled in the
            first chunk): every frame's locked positions then hold it, re-noised to ``timestep``
            with ``anchor_noise`` (frame 0's initial noise), from the first step.
        anchor_noise: ``(B, 1, C, h, w)``, with ``anchor``.
    """

    def __init__(self, lock: Tensor, timestep: float = 0.0, copy_anchor: bool = False,
                 anchor: Tensor | None = None, anchor_noise: Tensor | None = None) -> None:
        if (anchor is None) != (anchor_noise is None):
            raise TcplugError("LockedSampling: give the anchor's latents and its noise together")
        self.lock, self.timestep, self.copy_anchor = lock, float(timestep), copy_anchor
        self.anchor, self.anchor_noise = anchor, anchor_noise
        self.locked: Tensor | None = None

    def start(self, x: Tensor, noise: Tensor, schedule) -> Tensor:
        """The initial latents ``(B, T, C, h, w)``: locked positions start from the anchor's."""
        t_lock = torch.full((x.shape[0],), self.timestep, device=x.device)
        self.t_lock = t_lock.long() if schedule.kind == "ddpm" else t_lock
        if self.anchor is not None:  # the anchor is finished: every frame here is after it
            self.locked = self.lock.bool().expand(-1, x.shape[1], -1, -1, -1)
            self._held = schedule.add_noise(self.anchor, self.anchor_noise, self.t_lock)
            return torch.where(self.locked, self._held, x)
        self.locked = locked_positions(self.lock, x.shape[1])
        self.anchor_noise = noise[:, :1]
        return torch.where(self.locked, x[:, :1], x)

    def timesteps(self, i: int, t_batch: Tensor) -> Tensor:
        """What the model sees at step ``i``: ``(B,)`` at the first step, then per latent pixel
        ``(B, T, 1, h, w)`` with the lock's timestep on locked positions (they already hold a
        near-clean estimate; with a finished ``anchor``, from the first step)."""
        if i == 0 and self.anchor is None:
            return t_batch
        return torch.where(self.locked, self.timestep, t_batch.float().view(-1, 1, 1, 1, 1))

    def after_step(self, x_before: Tensor, pred: Tensor, t_batch: Tensor, x: Tensor, schedule) -> Tensor:
        """The stepped latents with locked positions set to the anchor's current clean estimate
        (from the prediction at ``x_before``; the finished anchor itself when given) re-noised to
        the lock's timestep."""
        if self.anchor is not None:
            return torch.where(self.locked, self._held, x)
        x0_anchor = schedule.pred_x0(x_before[:, :1], pred[:, :1], t_batch)
        return torch.where(self.locked, schedule.add_noise(x0_anchor, self.anchor_noise, self.t_lock), x)

    def finish(self, x: Tensor) -> Tensor:
        if not self.copy_anchor:
            return x
        return torch.where(self.locked, self.anchor if self.anchor is not None else x[:, :1], x)


class StreamedLock:
    """The motion lock across the chunks of a streamed video, anchored to frame 0.

    Each chunk asks the locker for its mask (the conditioners' maps of the chunk, preceded by the
    previous chunk's last frame so that motion across the boundary counts; or the chunk's cheap
    first pass); a position stays locked only while it has been static in every chunk so far (the
    masks are multiplied), so an object that enters a locked region frees it from then on. The
    first chunk is sampled as all-at-once sampling does (frame 0 is the anchor); later chunks hold
    frame 0's finished latents (:class:`LockedSampling` with ``anchor``).
    """

    def __init__(self, settings: LockSettings) -> None:
        self.settings = settings
        self.mask: Tensor | None = None
        self.anchor: Tensor | None = None
        self.anchor_noise: Tensor | None = None
        self._last_maps: Tensor | None = None

    def chunk(self, model, batch: dict, context: dict | None, shape: tuple[int, ...], start: int,
              preview=None) -> LockedSampling | None:
        """The lock of the chunk whose first latent frame is ``start`` (None: nothing locked)."""
        ctx = context
        maps = (context or {}).get("maps")
        if maps is not None and self._last_maps is not None:
            ctx = {**context, "maps": torch.cat([self._last_maps, maps], 1)}
        if maps is not None:
            self._last_maps = maps[:, -1:]
        mask = model.lock_mask(batch, ctx, shape, preview)
        if mask is None:
            mask = None if self.mask is None else torch.zeros_like(self.mask)
        elif self.mask is not None:
            mask = mask * self.mask
        self.mask = mask
        if mask is None or start > 0 and self.anchor is None:
            return None
        s = self.settings
        if start == 0:
            return LockedSampling(mask, s.timestep, s.copy_anchor)
        return LockedSampling(mask, s.timestep, s.copy_anchor, anchor=self.anchor, anchor_noise=self.anchor_noise)

    def finished(self, z: Tensor, noise: Tensor, start: int) -> None:
        """The chunk's finished latents ``z`` and initial ``noise``: frame 0's become the anchor."""
        if start == 0:
            self.anchor, self.anchor_noise = z[:, :1], noise[:, :1]


__all__ = ["LockSettings", "LockedSampling", "StreamedLock", "lock_training", "locked_positions", "token_mask"]
