"""Built-in latent designs: ``pixel`` (diffusion directly on pixels)."""

from __future__ import annotations

from torch import Tensor

from tcplug import LatentDesign, hookimpl

__version__ = "0.1.0"


class Pixel(LatentDesign):
    """Identity latent: diffusion runs on pixels ``(B, T, 3, H, W)`` in ``[-1, 1]``.

    Args:
        channels: image channels (3 for RGB).
    """

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.latent_channels = channels
        self.downsample = 1

    def encode(self, video: Tensor) -> Tensor:
        return video

    def decode(self, latents: Tensor) -> Tensor:
        return latents


@hookimpl
def tcplug_register_components(register):
    register(Pixel, name="pixel")
