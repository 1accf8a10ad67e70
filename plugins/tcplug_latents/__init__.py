"""Built-in latent designs: ``pixel``, ``vae``, ``video_ldm``, ``two_tier``."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from tcplug import LatentDesign, TcplugError, hookimpl

__version__ = "0.1.0"


class Pixel(LatentDesign):
    """Pixel latent: diffusion runs on pixels ``(B, T, 3, H, W)``, standardised.

    ``encode(video) = (video - shift) * scale``; ``decode`` inverts it. Diffusion schedules
    assume data of about unit variance; pixels in ``[-1, 1]`` of a typical clip have a standard
    deviation of 0.2-0.35, so every noise level is far noisier for them than the schedule
    assumes. ``scale`` brings them to about unit variance (the built-in world: std 0.34,
    mean -0.16).

    Args:
        channels: image channels (3 for RGB).
        scale: multiply pixels by this (1 = identity latent).
        shift: subtract this first.
    """

    def __init__(self, channels: int = 3, scale: float = 1.0, shift: float = 0.0) -> None:
        super().__init__()
        if scale <= 0:
            raise TcplugError(f"pixel latent scale must be > 0, got {scale}")
        self.latent_channels = channels
        self.downsample = 1
        self.scale, self.shift = float(scale), float(shift)

    def encode(self, video: Tensor) -> Tensor:
        return (video - self.shift) * self.scale

    def decode(self, latents: Tensor) -> Tensor:
        return latents / self.scale + self.shift


def _load_local(cls, path: str):
    """``cls.from_pretrained`` from a local folder only: nothing is fetched from a hub."""
    from pathlib import Path

    if not Path(path).is_dir():
        raise TcplugError(f"pretrained latent model {path!r} is not a local folder (nothing is downloaded)")
    try:
        return cls.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise TcplugError(f"cannot load {cls.__name__} from {path}: {exc}") from None


def _freeze(module: nn.Module) -> None:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)


def _global_mean(value: Tensor) -> Tensor:
    """``value`` averaged over DDP processes (itself without a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


class _DiffusersAutoencoder(LatentDesign):
    """Shared per-frame encode/decode of a diffusers autoencoder held as ``self.vae``.

    The latent scale is the config's ``scaling_factor``, a number, or ``"data"``: measured on
    the first batch encoded in training (``1 / std`` of its latents, averaged over DDP
    processes) and kept in the buffer ``data_scale``, saved with the checkpoint. A random
    or foreign autoencoder with the config's factor can give latents far from unit variance
    (a random SD-sized encoder times 0.18215: std about 0.06), which collapses the latent
    space against unit noise.
    """

    vae: nn.Module
    scaling_factor: float

    @property
    def scale(self) -> float:
        if self.scaling_factor != "data":
            return self.scaling_factor
        return float(self.data_scale)

    def encode(self, video: Tensor) -> Tensor:
        b, t = video.shape[:2]
        z = self.vae.encode(video.flatten(0, 1)).latent_dist.mode()
        if self.scaling_factor == "data" and float(self.data_scale) == 0:
            self.data_scale.fill_(float(1.0 / _global_mean(z.float().std().reshape(1)).clamp_min(1e-6)))
        z = z * self.scale
        return z.view(b, t, *z.shape[1:])

    def decode(self, latents: Tensor) -> Tensor:
        if self.scale == 0:
            raise TcplugError("the latent scale is measured on the first training batch (scaling_factor: data): "
                              "encode a batch before decoding")
        b, t = latents.shape[:2]
        x = self._decode_frames(latents.flatten(0, 1) / self.scale, t)
        return x.view(b, t, *x.shape[1:])

    def _decode_frames(self, z: Tensor, num_frames: int) -> Tensor:
        return self.vae.decode(z).sample

    def _build(self, cls, pretrained: str | None, scaling_factor: float | None, blocks: list[int], **config) -> None:
        """``self.vae``: ``cls`` from a local folder, or a random init of ``config``."""
        if pretrained:
            self.vae = _load_local(cls, pretrained)
        else:
            self.vae = cls(in_channels=3, out_channels=3, block_out_channels=blocks,
                           down_block_types=["DownEncoderBlock2D"] * len(blocks), **config)
        self._configure(scaling_factor)

    def _configure(self, scaling_factor: float | str | None) -> None:
        cfg = self.vae.config
        self.latent_channels = cfg.latent_channels
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        if scaling_factor == "data":
            self.scaling_factor = "data"
        else:
            self.scaling_factor = float(scaling_factor if scaling_factor is not None else cfg.scaling_factor)
        self.register_buffer("data_scale", torch.zeros(()))


class VAE(_DiffusersAutoencoder):
    """diffusers ``AutoencoderKL`` applied to every frame independently.

    ``encode (B, T, 3, H, W) -> (B, T, c, H/f, W/f)`` (the posterior mean times
    ``scaling_factor``); ``decode`` inverts it.

    Args:
        pretrained: a local folder written by ``save_pretrained`` (never a hub id); None =
            random init with the small config below.
        trainable: train the autoencoder (with a ``reconstruction`` term); frozen otherwise.
        scaling_factor: latent scale; None = the model config's.
        block_out_channels: random init: channels per encoder level.
        latent_channels: random init: latent channels.
        layers_per_block: random init: res-blocks per level.
        norm_num_groups: random init: GroupNorm groups.
    """

    def __init__(self, pretrained: str | None = None, trainable: bool = False,
                 scaling_factor: float | Literal["data"] | None = None,
                 block_out_channels: list[int] | None = None, latent_channels: int = 4, layers_per_block: int = 1,
                 norm_num_groups: int = 16) -> None:
        super().__init__()
        from diffusers import AutoencoderKL

        blocks = list(block_out_channels or [32, 64])
        self._build(AutoencoderKL, pretrained, scaling_factor, blocks, latent_channels=latent_channels,
                    layers_per_block=layers_per_block, up_block_types=["UpDecoderBlock2D"] * len(blocks),
                    norm_num_groups=norm_num_groups)
        self.trainable = trainable
        if not trainable:
            _freeze(self.vae)

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.trainable:
            self.vae.eval()
        return self


class VideoLDM(_DiffusersAutoencoder):
    """Video-LDM latent: per-frame encoder, decoder with temporal layers.

    diffusers ``AutoencoderKLTemporalDecoder`` (Stable Video Diffusion): a 2D encoder applied
    to every frame alone, and a ``TemporalDecoder`` whose spatio-temporal res-blocks mix
    neighbouring frames. The encoder is always frozen; ``train_decoder: true`` makes the
    decoder trainable, so pixel-space temporal objectives (``flow_warp``,
    ``perceptual_temporal``, ``adversarial``, ``reconstruction``) fine-tune it.

    Args:
        pretrained: a local folder written by ``save_pretrained``; None = small random init.
        train_decoder: fine-tune the temporal decoder.
        scaling_factor: latent scale; None = the model config's; ``data`` = ``1 / std`` of
            the first training batch's latents (use it with a random or untuned encoder).
        block_out_channels: random init: channels per encoder level.
        latent_channels: random init: latent channels.
        layers_per_block: random init: res-blocks per level.
    """

    def __init__(self, pretrained: str | None = None, train_decoder: bool = False,
                 scaling_factor: float | Literal["data"] | None = None, block_out_channels: list[int] | None = None,
                 latent_channels: int = 4, layers_per_block: int = 1) -> None:
        super().__init__()
        from diffusers import AutoencoderKLTemporalDecoder

        self._build(AutoencoderKLTemporalDecoder, pretrained, scaling_factor, list(block_out_channels or [32, 64]),
                    latent_channels=latent_channels, layers_per_block=layers_per_block)
        self.train_decoder = train_decoder
        for part in (self.vae.encoder, self.vae.quant_conv):
            _freeze(part)
        if not train_decoder:
            _freeze(self.vae)

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.encoder.eval()
        if not self.train_decoder:
            self.vae.eval()
        return self

    def _decode_frames(self, z: Tensor, num_frames: int) -> Tensor:
        return self.vae.decode(z, num_frames=num_frames).sample  # frames of one video contiguous


def _conv_stack(cin: int, cout: int, width: int, down: int, up: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    c = cin
    for _ in range(down):
        conv = nn.ConvTranspose2d(c, width, 4, 2, 1) if up else nn.Conv2d(c, width, 4, 2, 1)
        layers += [conv, nn.GroupNorm(min(8, width), width), nn.SiLU()]
        c = width
    layers.append(nn.Conv2d(c, cout, 3, padding=1))
    return nn.Sequential(*layers)


class TwoTier(LatentDesign):
    """Two-tier latent: one global code per clip shared by every frame + per-frame codes.

    ``encode (B, T, 3, H, W) -> (B, T, g + p, h, w)``: channels ``[:g]`` hold the global code
    (the frame-average of a global encoder, identical in every frame: lighting, palette,
    layout, identity), channels ``[g:]`` the per-frame code (positions, pose). The backbone
    sees both. ``decode`` first averages the global channels over frames, so every frame is
    decoded with the *same* global code, then decodes each frame from ``[global, its own
    per-frame code]``. When a long video is streamed, the first chunk's global code is
    carried forward and decodes every later chunk (:meth:`decode_stream`).

    Args:
        global_channels: ``g``.
        frame_channels: ``p``.
        width: conv width.
        downsample_layers: stride-2 layers (``f = 2 ** downsample_layers``).
        trainable: train the autoencoder (use the ``reconstruction`` loss term).
        normalize: standardise each frame's codes (zero mean, unit variance over channels and
            positions, no affine part: ``GroupNorm`` with one group), so diffusion sees latents
            of unit variance while the autoencoder trains; without it the codes' scale drifts
            freely. No running statistics: training and evaluation encode alike.
    """

    def __init__(self, global_channels: int = 2, frame_channels: int = 2, width: int = 32,
                 downsample_layers: int = 1, trainable: bool = True, normalize: bool = True) -> None:
        super().__init__()
        self.global_channels, self.frame_channels = global_channels, frame_channels
        self.latent_channels = global_channels + frame_channels
        self.downsample = 2 ** downsample_layers
        self.enc_global = _conv_stack(3, global_channels, width, downsample_layers)
        self.enc_frame = _conv_stack(3, frame_channels, width, downsample_layers)
        if normalize:
            self.enc_global.append(nn.GroupNorm(1, global_channels, affine=False))
            self.enc_frame.append(nn.GroupNorm(1, frame_channels, affine=False))
        self.dec = _conv_stack(self.latent_channels, 3, width, downsample_layers, up=True)
        if not trainable:
            _freeze(self)

    def encode(self, video: Tensor) -> Tensor:
        b, t = video.shape[:2]
        frames = video.flatten(0, 1)
        g = self.enc_global(frames)
        g = g.view(b, t, *g.shape[1:]).mean(1, keepdim=True).expand(b, t, *g.shape[1:])
        p = self.enc_frame(frames)
        p = p.view(b, t, *p.shape[1:])
        return torch.cat([g, p], dim=2)

    def decode(self, latents: Tensor, global_code: Tensor | None = None) -> Tensor:
        b, t = latents.shape[:2]
        g = global_code if global_code is not None else latents[:, :, : self.global_channels].mean(1, keepdim=True)
        z = torch.cat([g.expand(-1, t, -1, -1, -1), latents[:, :, self.global_channels:]], dim=2)
        x = torch.tanh(self.dec(z.flatten(0, 1)))
        return x.view(b, t, *x.shape[1:])

    def decode_stream(self, latents: Tensor, state: dict) -> Tensor:
        """Streaming: the first chunk's global code is kept and used for every later chunk."""
        if "global_code" not in state:
            state["global_code"] = latents[:, :, : self.global_channels].mean(1, keepdim=True)
        return self.decode(latents, state["global_code"])


@hookimpl
def tcplug_register_components(register):
    register(Pixel, name="pixel")
    register(VAE, name="vae")
    register(VideoLDM, name="video_ldm")
    register(TwoTier, name="two_tier")
