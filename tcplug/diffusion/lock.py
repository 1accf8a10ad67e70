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
    t = torch.where(locked, torch.full_like(locked, settings.timestep, dtype=torch.float),
                    t.float().view(-1, 1, 1, 1, 1))
    weight = torch.where(locked, settings.loss_weight, 1.0).float()
    return x0, noise, t, weight


class LockedSampling:
    """The lock inside the sampler loop (:func:`~tcplug.diffusion.sampling.sample_loop`).

    Args:
        lock: ``(B, 1, 1, h, w)``, 1 = locked.
        timestep: the locked tokens' timestep (``model.lock_timestep``).
        copy_anchor: at the end, overwrite locked tokens with the anchor frame's final latents
            (exactly still, but a copy, not something the model produced; off by default).
    """

    def __init__(self, lock: Tensor, timestep: float = 0.0, copy_anchor: bool = False) -> None:
        self.lock, self.timestep, self.copy_anchor = lock, float(timestep), copy_anchor
        self.locked: Tensor | None = None

    def start(self, x: Tensor, noise: Tensor, schedule) -> Tensor:
        """The initial latents ``(B, T, C, h, w)``: locked positions start from the anchor's."""
        self.locked = locked_positions(self.lock, x.shape[1])
        self.anchor_noise = noise[:, :1]
        t_lock = torch.full((x.shape[0],), self.timestep, device=x.device)
        self.t_lock = t_lock.long() if schedule.kind == "ddpm" else t_lock
        return torch.where(self.locked, x[:, :1], x)

    def timesteps(self, i: int, t_batch: Tensor) -> Tensor:
        """What the model sees at step ``i``: ``(B,)`` at the first step, then per latent pixel
        ``(B, T, 1, h, w)`` with the lock's timestep on locked positions (they already hold a
        near-clean estimate)."""
        if i == 0:
            return t_batch
        return torch.where(self.locked, self.timestep, t_batch.float().view(-1, 1, 1, 1, 1))

    def after_step(self, x_before: Tensor, pred: Tensor, t_batch: Tensor, x: Tensor, schedule) -> Tensor:
        """The stepped latents with locked positions set to the anchor's current clean estimate
        (from the prediction at ``x_before``) re-noised to the lock's timestep."""
        x0_anchor = schedule.pred_x0(x_before[:, :1], pred[:, :1], t_batch)
        return torch.where(self.locked, schedule.add_noise(x0_anchor, self.anchor_noise, self.t_lock), x)

    def finish(self, x: Tensor) -> Tensor:
        return torch.where(self.locked, x[:, :1], x) if self.copy_anchor else x


__all__ = ["LockSettings", "LockedSampling", "lock_training", "locked_positions", "token_mask"]
