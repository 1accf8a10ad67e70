"""Built-in loss terms: ``denoise`` (the diffusion objective)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from tcplug import LossContext, LossTerm, hookimpl

__version__ = "0.1.0"


class Denoise(LossTerm):
    """Mean squared error between the prediction and the schedule's target.

    The target follows the schedule's parameterization (epsilon, v, x0 or flow-matching
    velocity), so the term is always consistent with the sampler.

    Args:
        weight: multiplier of the term in the total loss.
        weighting: ``none``, or ``min_snr`` (Hang et al. 2023: per-sample weight
            ``min(SNR, gamma)`` expressed for the prediction type).
        min_snr_gamma: the ``gamma`` of ``min_snr``.
    """

    def __init__(self, weight: float = 1.0, weighting: Literal["none", "min_snr"] = "none",
                 min_snr_gamma: float = 5.0) -> None:
        super().__init__(weight)
        self.weighting, self.gamma = weighting, min_snr_gamma

    def forward(self, ctx: LossContext) -> Tensor:
        err = (ctx.pred.float() - ctx.target.float()) ** 2  # (B, T, C, h, w)
        if self.weighting == "none":
            return err.mean()
        snr = ctx.schedule.snr(ctx.timesteps).float()
        clipped = torch.clamp(snr, max=self.gamma)
        kind = ctx.schedule.prediction_type
        if kind == "epsilon":
            w = clipped / snr.clamp_min(1e-8)
        elif kind == "v_prediction":
            w = clipped / (snr + 1)
        elif kind == "sample":
            w = clipped
        else:  # flow: velocity target; weight as for v
            w = clipped / (snr + 1)
        per_sample = err.flatten(1).mean(1) if w.dim() == 1 else err.mean(dim=(2, 3, 4))
        return (w * per_sample).mean()


@hookimpl
def tcplug_register_components(register):
    register(Denoise, name="denoise")
