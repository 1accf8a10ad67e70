"""Built-in routers (noise-level experts): ``single``, ``noise_boundary``, ``learned``.

Every router maps the diffusion timesteps of a batch, ``(B,)``, to expert weights
``(B, E)``. The timesteps are the numbers the backbone sees, in training and in the sampler
(under a flow-matching shift: the shifted ones), so a timestep goes to the same expert in
both; this is the pitfall users of Wan-style two-expert models report when the boundary is
compared in step-index space instead.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tcplug import Router, TcplugError, hookimpl

__version__ = "0.1.0"


class Single(Router):
    """No mixture: one expert takes every noise level."""

    num_experts = 1

    def forward(self, timesteps: Tensor, schedule=None) -> Tensor:
        return torch.ones(timesteps.shape[0], 1, device=timesteps.device)


class NoiseBoundary(Router):
    """``N`` experts with hard boundaries in timestep or SNR space (eDiff-I, Wan 2.2).

    Expert 0 takes the highest noise levels (layout), the last expert the lowest (detail).

    Args:
        num_experts: ``N``.
        boundaries: ``N - 1`` boundaries. In ``timestep`` space, timesteps (``0..T``) in
            decreasing order: expert ``i`` takes ``boundaries[i] <= t`` (above the previous
            boundary). In ``snr`` space, SNR values in increasing order: expert ``i`` takes
            ``snr <= boundaries[i]``. Default: evenly spaced in timestep space, or for two
            experts Wan 2.2's ``boundary_ratio`` times the number of training timesteps.
        boundary_ratio: the two-expert default boundary as a fraction of the training
            timesteps (Wan 2.2 text-to-video: 0.875, image-to-video: 0.9).
        space: ``timestep`` or ``snr``.
        experts: ``backbone`` (whole backbones per expert) or ``ffn`` (expert feed-forward
            layers inside each block).
    """

    def __init__(self, num_experts: int = 2, boundaries: list[float] | None = None, boundary_ratio: float = 0.875,
                 space: Literal["timestep", "snr"] = "timestep",
                 experts: Literal["backbone", "ffn"] = "backbone") -> None:
        super().__init__()
        if num_experts < 1:
            raise TcplugError(f"noise_boundary num_experts must be >= 1, got {num_experts}")
        if boundaries is not None and len(boundaries) != num_experts - 1:
            raise TcplugError(f"noise_boundary needs {num_experts - 1} boundaries for {num_experts} experts, "
                              f"got {len(boundaries)}")
        if boundaries is not None:
            order = sorted(boundaries, reverse=(space == "timestep"))
            if list(boundaries) != order:
                want = "decreasing timesteps" if space == "timestep" else "increasing SNR values"
                raise TcplugError(f"noise_boundary boundaries must be {want}, got {list(boundaries)}")
        if not 0 < boundary_ratio < 1:
            raise TcplugError(f"noise_boundary boundary_ratio must be in (0, 1), got {boundary_ratio}")
        self.num_experts, self.space, self.experts = num_experts, space, experts
        self.boundaries = None if boundaries is None else [float(b) for b in boundaries]
        self.boundary_ratio = boundary_ratio

    def timestep_boundaries(self, num_train_timesteps: int) -> list[float]:
        """The boundaries in timestep space (the defaults resolved), decreasing."""
        if self.boundaries is not None:
            return self.boundaries
        n = self.num_experts
        if n == 2:
            return [self.boundary_ratio * num_train_timesteps]
        return [num_train_timesteps * (n - 1 - i) / n for i in range(n - 1)]

    def expert_index(self, timesteps: Tensor, schedule) -> Tensor:
        """Which expert takes each timestep ``(B,)`` -> long ``(B,)``."""
        t = timesteps.float()
        if self.space == "snr" and self.boundaries is not None:
            snr = schedule.snr(timesteps if schedule.kind != "ddpm" else timesteps.long()).float()
            bounds = torch.tensor(self.boundaries, device=t.device)
            return torch.bucketize(snr, bounds, right=False).clamp_max(self.num_experts - 1)
        # default boundaries are in timestep space in both spaces (SNR is monotone in t)
        bounds = torch.tensor(self.timestep_boundaries(schedule.num_train_timesteps), device=t.device)
        # number of boundaries strictly above t: t >= boundaries[0] -> expert 0
        return (t[:, None] < bounds[None, :]).sum(1)

    def forward(self, timesteps: Tensor, schedule) -> Tensor:
        return F.one_hot(self.expert_index(timesteps, schedule), self.num_experts).float()


class Learned(Router):
    """A soft gate on the timestep embedding, top-k, with a load-balancing auxiliary loss.

    ``weights = top_k(softmax(MLP(embed(t))))``, renormalized over the kept experts; with
    ``top_k == 1`` the kept expert's weight is 1 in the forward pass and carries the gate's
    gradient (straight-through). The auxiliary loss is Switch Transformer's
    ``E * sum_e f_e * P_e`` (``f_e``: fraction of the batch sent to expert ``e``, ``P_e``: its
    mean gate probability); 1 when balanced.

    Args:
        num_experts: ``E``.
        top_k: experts kept per clip.
        embed_dim: width of the sinusoidal timestep embedding and the gate's hidden layer.
        aux_weight: weight of the balance term in the training loss.
        experts: ``backbone`` or ``ffn`` (see :class:`NoiseBoundary`).
    """

    def __init__(self, num_experts: int = 2, top_k: int = 1, embed_dim: int = 64, aux_weight: float = 0.01,
                 experts: Literal["backbone", "ffn"] = "backbone") -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise TcplugError(f"learned router top_k must be in [1, {num_experts}], got {top_k}")
        self.num_experts, self.top_k, self.embed_dim = num_experts, top_k, embed_dim
        self.aux_weight, self.experts = aux_weight, experts
        self.aux_name = "router_balance"
        self.gate = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, num_experts))

    def probs(self, timesteps: Tensor, schedule) -> Tensor:
        """Gate probabilities ``(B, E)``; the embedding sees ``t`` scaled to ``[0, 1000)``."""
        t = timesteps.float() * (1000.0 / schedule.num_train_timesteps)
        from diffusers.models.embeddings import get_timestep_embedding  # imported on first use

        emb = get_timestep_embedding(t, self.embed_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        return self.gate(emb.to(self.gate[0].weight.dtype)).softmax(-1)

    def forward(self, timesteps: Tensor, schedule) -> Tensor:
        p = self.probs(timesteps, schedule)
        top = p.topk(self.top_k, dim=-1)
        kept = torch.zeros_like(p).scatter(-1, top.indices, top.values)
        if self.top_k == 1:
            hard = torch.zeros_like(p).scatter(-1, top.indices, 1.0)
            return hard + kept - kept.detach()
        return kept / kept.sum(-1, keepdim=True)

    def auxiliary_loss(self, timesteps: Tensor, schedule) -> Tensor:
        p = self.probs(timesteps, schedule)
        chosen = F.one_hot(p.topk(self.top_k, dim=-1).indices, self.num_experts).sum(1).float()
        frac = chosen.mean(0) / self.top_k
        return self.num_experts * (frac * p.mean(0)).sum()


@hookimpl
def tcplug_register_components(register):
    register(Single, name="single")
    register(NoiseBoundary, name="noise_boundary")
    register(Learned, name="learned")
