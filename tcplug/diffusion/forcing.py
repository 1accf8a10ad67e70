"""Training for long videos: per-frame noise levels (diffusion forcing) and training on the model's
own rollouts, for a :class:`~tcplug.diffusion.model.VideoDiffusion` (its ``frame_timesteps``,
``context_noise`` and ``rollout_*`` settings).

Clean-context streaming (:class:`~tcplug.diffusion.sampling.CleanContext`) shows a chunk finished
frames beside its noisy ones; a model trained with one noise level per clip never saw that. With
``frame_timesteps: history`` a random number of leading frames of every training clip are context,
clean or noised up to ``context_noise``; with ``independent`` every frame draws its own level
(diffusion forcing proper). With ``rollout_prob`` the leading frames are what the model itself
sampled, so the frames after them learn to continue its own imperfect history.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from tcplug.diffusion.model import VideoDiffusion


def noise_levels(model: VideoDiffusion, batch: int, frames: int, device: torch.device,
                 context_frames: int | None = None) -> Tensor:
    """Training timesteps: ``(B,)`` for ``frame_timesteps: clip``, else per frame ``(B, T)``
    (``independent``: each frame its own; ``history``: the first ``k ~ U{0..T-1}`` frames at
    ``U[0, context_noise]``, the rest at one level per clip). ``context_frames`` fixes ``k``
    (a rollout's context), whatever ``frame_timesteps`` says."""
    schedule = model.schedule
    t = schedule.sample_timesteps(batch, device)
    if model.frame_timesteps == "clip" and context_frames is None:
        return t
    if model.frame_timesteps == "independent" and context_frames is None:
        return schedule.sample_timesteps(batch * frames, device).view(batch, frames)
    k = torch.randint(0, frames, (batch, 1), device=device) if context_frames is None else \
        torch.full((batch, 1), context_frames, device=device)
    ctx = torch.rand(batch, frames, device=device) * model.context_noise
    ctx = ctx.round().to(t.dtype) if schedule.kind == "ddpm" else ctx
    return torch.where(torch.arange(frames, device=device) < k, ctx, t.view(-1, 1).expand(batch, frames))


@torch.no_grad()
def own_rollout(model: VideoDiffusion, context: dict[str, Any] | None, shape: tuple[int, ...]) -> Tensor:
    """The model's own first ``shape[1]`` latent frames ``shape`` ``(B, k, C, h, w)``, sampled in
    ``model.rollout_steps`` steps without gradients (in eval mode) from the batch's conditions cut
    to them (the per-frame context entries: ``maps`` by pixel frames, the others by latent frames)."""
    from tcplug.diffusion.keyframes import context_frames
    from tcplug.diffusion.sampling import sample_loop

    ctx = context_frames(context, list(range(shape[1])), model.latent.temporal_compression)
    was = model.training
    model.train(False)
    try:
        return sample_loop(lambda x, t: model.denoise(x, t, ctx), torch.randn(shape, device=model.device),
                           model.schedule, model.rollout_steps)
    finally:
        model.train(was)


__all__ = ["noise_levels", "own_rollout"]
