"""Built-in attention variants: ``per_frame`` (no temporal mixing, the baseline)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from tcplug import AttentionVariant, hookimpl

__version__ = "0.1.0"


class PerFrame(AttentionVariant):
    """Each frame attends to its own tokens only: plain spatial self-attention.

    ``q, k, v``: ``(B, T, H, N, D)`` -> ``(B, T, H, N, D)``. Frames never meet, so it is
    trivially causal; it is the baseline every temporal variant is compared with.
    """

    causal = True

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        b, t, h, n, d = q.shape
        out = F.scaled_dot_product_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1))
        return out.view(b, t, h, n, d)


@hookimpl
def tcplug_register_components(register):
    register(PerFrame, name="per_frame")
