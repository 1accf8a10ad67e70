"""What a loss term sees in one training step: :class:`LossContext` (``from tcplug import
LossContext``). The module builds one per step; a :class:`~tcplug.kinds.LossTerm` reads it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from tcplug.diffusion.sampling import NoiseSchedule
    from tcplug.kinds import Discriminator, LatentDesign


@dataclass
class LossContext:
    """Everything a :class:`LossTerm` may look at in one training step.

    Attributes:
        batch: the data batch (``batch["video"]`` is ``(B, T, 3, H, W)`` in ``[-1, 1]``;
            ground truth such as ``flow`` when the data has it).
        x0: clean latents ``(B, T, C, h, w)``.
        noise: the noise that was added, same shape as ``x0``.
        xt: noisy latents fed to the backbone, same shape.
        timesteps: ``(B,)`` per clip, ``(B, T)`` per frame (diffusion forcing,
            ``model.frame_timesteps``), or ``(B, T, 1, h, w)`` per latent pixel when a motion
            lock gives locked tokens their own timestep (what the schedule's methods take).
        pred: the backbone's prediction, same shape as ``x0``.
        target: what ``pred`` should equal under the schedule's parameterization.
        schedule: the :class:`~tcplug.diffusion.sampling.NoiseSchedule` (e.g. ``schedule.pred_x0``).
        latent: the :class:`LatentDesign` (to decode predictions to pixels).
        discriminator: the module's :class:`Discriminator`, if any.
        step: the global training step (for warm-ups).
        extras: scratch space shared between terms within one step (e.g. a decoded clip).
        weight_mask: ``(B, T, 1, h, w)`` per-latent-pixel weight of the denoising error, or
            None (a motion lock down-weights the locked tokens it gave away).
    """

    batch: dict[str, Any]
    x0: Tensor
    noise: Tensor
    xt: Tensor
    timesteps: Tensor
    pred: Tensor
    target: Tensor
    schedule: NoiseSchedule
    latent: LatentDesign
    discriminator: Discriminator | None = None
    step: int = 0
    extras: dict[str, Any] = field(default_factory=dict)
    weight_mask: Tensor | None = None

    def pred_x0(self) -> Tensor:
        """The prediction expressed as clean latents ``(B, T, C, h, w)`` (cached)."""
        if "pred_x0" not in self.extras:
            self.extras["pred_x0"] = self.schedule.pred_x0(self.xt, self.pred, self.timesteps)
        return self.extras["pred_x0"]

    def pred_video(self) -> Tensor:
        """The predicted clean clip decoded to pixels ``(B, T, 3, H, W)`` (cached, differentiable)."""
        if "pred_video" not in self.extras:
            self.extras["pred_video"] = self.latent.decode(self.pred_x0())
        return self.extras["pred_video"]

    def snr_weight(self) -> Tensor:
        """Per-clip weight ``SNR / (1 + SNR)`` in (0, 1): near 1 at low noise, near 0 at high
        noise, where the predicted clean clip is still a blur. Shape ``(B,)``."""
        t = self.timesteps if self.timesteps.dim() == 1 else self.timesteps.flatten(1).float().mean(1)
        snr = self.schedule.snr(t if self.schedule.kind != "ddpm" else t.long()).float()
        return snr / (1 + snr)


__all__ = ["LossContext"]
