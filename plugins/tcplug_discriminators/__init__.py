"""Built-in discriminators: ``conv3d``, a 3D-conv PatchGAN over short clips."""

from __future__ import annotations

from torch import Tensor, nn

from tcplug import Discriminator, hookimpl

__version__ = "0.1.0"


class Conv3dPatchGAN(Discriminator):
    """3D-convolutional PatchGAN (VideoLDM-style clip discriminator).

    A spatial trunk (``(1, 4, 4)`` kernels: per-frame features) followed by spatio-temporal
    layers (``(3, 4, 4)`` kernels) judging motion; returns one logit per space-time patch.

    ``forward(video (B, T, 3, H, W)) -> logits (B, 1, T', H', W')``;
    ``trunk(video) -> per-frame features (B, T, C, H/2, W/2)`` (used by ``perceptual_temporal``).

    Args:
        channels: width of the first layer (doubled per layer).
        layers: spatio-temporal layers after the trunk.
    """

    def __init__(self, channels: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.trunk_net = nn.Sequential(
            nn.Conv3d(3, channels, (1, 4, 4), stride=(1, 2, 2), padding=(0, 1, 1)), nn.LeakyReLU(0.2))
        body, c = [], channels
        for _ in range(layers):
            body += [nn.Conv3d(c, c * 2, (3, 4, 4), stride=(1, 2, 2), padding=(1, 1, 1)),
                     nn.GroupNorm(min(8, c * 2), c * 2), nn.LeakyReLU(0.2)]
            c *= 2
        body.append(nn.Conv3d(c, 1, (3, 3, 3), padding=1))
        self.body = nn.Sequential(*body)

    def trunk(self, video: Tensor) -> Tensor:
        feats = self.trunk_net(video.transpose(1, 2))  # (B, C, T, H/2, W/2)
        return feats.transpose(1, 2)

    def forward(self, video: Tensor) -> Tensor:
        return self.body(self.trunk(video).transpose(1, 2))


@hookimpl
def tcplug_register_components(register):
    register(Conv3dPatchGAN, name="conv3d")
