"""Built-in loss terms: ``denoise``, ``flow_warp``, ``perceptual_temporal``, ``adversarial``,
``reconstruction``."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tcplug import LossContext, LossTerm, TcplugError, hookimpl

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
        if ctx.weight_mask is not None:  # e.g. locked tokens a motion lock gave away
            wm = ctx.weight_mask.float().expand_as(err)
            err = err * wm / wm.mean().clamp_min(1e-8)
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
        if w.dim() == 5:  # per-latent-pixel timesteps
            return (w * err).mean()
        per_sample = err.flatten(1).mean(1) if w.dim() == 1 else err.mean(dim=(2, 3, 4))
        return (w * per_sample).mean()


# ----- temporal terms ----------------------------------------------------------------------
def _warp(x: Tensor, flow: Tensor) -> Tensor:
    """Sample ``x (N, C, H, W)`` at ``p + flow(p)`` (bilinear, border padding)."""
    n, _, h, w = x.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=x.device, dtype=x.dtype),
                            torch.arange(w, device=x.device, dtype=x.dtype), indexing="ij")
    gx = 2 * (xs + flow[:, 0]) / max(w - 1, 1) - 1
    gy = 2 * (ys + flow[:, 1]) / max(h - 1, 1) - 1
    return F.grid_sample(x, torch.stack([gx, gy], -1), mode="bilinear", padding_mode="border", align_corners=True)


def _resize_flow(flow: Tensor, h: int, w: int) -> Tensor:
    """Flow ``(N, 2, H, W)`` in pixels -> ``(N, 2, h, w)`` in pixels of the smaller grid."""
    H, W = flow.shape[-2:]
    if (h, w) == (H, W):
        return flow
    out = F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=False)
    return out * torch.tensor([w / W, h / H], device=flow.device, dtype=flow.dtype).view(1, 2, 1, 1)


def _valid(batch: dict, n: int, h: int, w: int, device) -> Tensor:
    """Non-occluded mask ``(N, 1, h, w)`` from the batch's ``occ`` (max-pooled when shrinking)."""
    occ = batch.get("occ")
    if occ is None:
        return torch.ones(n, 1, h, w, device=device)
    occ = occ.flatten(0, 1).float().to(device)
    if occ.shape[-2:] != (h, w):
        occ = F.adaptive_max_pool2d(occ, (h, w))
    return 1 - occ


def warp_consistency(frames: Tensor, flow: Tensor, valid: Tensor) -> Tensor:
    """Occlusion-masked flow-compensated squared error per clip.

    ``frames (B, T, C, h, w)``, ``flow (B*(T-1), 2, h, w)`` forward flow in pixels of this grid,
    ``valid (B*(T-1), 1, h, w)``. Returns ``(B,)``: mean over pairs of
    ``sum(valid * mean_c (V_n - W(V_{n+1}))^2) / sum(valid)``.
    """
    b, t = frames.shape[:2]
    cur = frames[:, :-1].flatten(0, 1)
    nxt = frames[:, 1:].flatten(0, 1)
    err = ((cur - _warp(nxt, flow)) ** 2).mean(1, keepdim=True)
    per_pair = (err * valid).sum(dim=(1, 2, 3)) / valid.sum(dim=(1, 2, 3)).clamp_min(1.0)
    return per_pair.view(b, t - 1).mean(1)


def _need_flow(ctx: LossContext, name: str) -> Tensor:
    flow = ctx.batch.get("flow")
    if flow is None:
        raise TcplugError(
            f"loss {name!r} needs forward flow in the batch: use the synthetic world or shards with flow.npy "
            "(`tcplug data ingest` estimates it), and keep 'flow' in data.keys"
        )
    return flow


class FlowWarp(LossTerm):
    """Flow-compensated temporal L2 on the predicted clean clip.

    Frame ``n+1`` of the model's clean-clip prediction is warped back to frame ``n`` with the
    data's forward flow and compared with frame ``n``, on non-occluded pixels only (the
    batch's ``occ``). In pixel space when the latent design decodes (``space: auto`` or
    ``pixel``), else on latents with the flow resized to the latent grid.

    Args:
        weight: multiplier in the total loss.
        space: ``auto`` (pixels if decodable), ``pixel`` or ``latent``.
        weighting: ``none``, or ``snr``: per-clip ``SNR/(1+SNR)``, so that high-noise steps,
            whose clean-clip prediction is a blur, count less.
        max_clips: decode only this many clips of the batch (pixel space): for real video
            VAEs, whose full decode per step costs memory in proportion.
        max_latent_frames: decode only this many leading latent frames (pixel space).

    With a latent design that compresses time (Wan's VAE) and ``space: latent``, the pixel flows
    are summed over the frames each latent frame spans (see :func:`pool_flow`).
    """

    def __init__(self, weight: float = 1.0, space: Literal["auto", "pixel", "latent"] = "auto",
                 weighting: Literal["none", "snr"] = "snr", max_clips: int | None = None,
                 max_latent_frames: int | None = None) -> None:
        super().__init__(weight)
        self.space, self.weighting = space, weighting
        self.max_clips, self.max_latent_frames = max_clips, max_latent_frames

    def forward(self, ctx: LossContext) -> Tensor:
        flow = _need_flow(ctx, "flow_warp").float()  # (B, T-1, 2, H, W) over pixel frames
        occ = ctx.batch.get("occ")
        pixel = self.space == "pixel" or (self.space == "auto" and ctx.latent.decodable)
        b = min(self.max_clips or flow.shape[0], flow.shape[0])
        if pixel and (self.max_clips or self.max_latent_frames):
            frames = decode_subset(ctx, b, self.max_latent_frames)
        else:
            frames = (ctx.pred_video() if pixel else ctx.pred_x0())[:b]
        flow, occ = flow[:b], occ[:b] if occ is not None else None
        t = frames.shape[1]
        if t != flow.shape[1] + 1:  # a decoded prefix, or latents of a time-compressing design
            flow, occ = (flow[:, : t - 1], occ[:, : t - 1] if occ is not None else None) if pixel else \
                pool_flow(flow, occ, t)
        h, w = frames.shape[-2:]
        flat = flow.flatten(0, 1)
        per_clip = warp_consistency(frames.float(), _resize_flow(flat, h, w),
                                    _valid({"occ": occ}, flat.shape[0], h, w, frames.device))
        if self.weighting == "snr":
            per_clip = per_clip * ctx.snr_weight()[:b]
        return per_clip.mean()


def pool_flow(flow: Tensor, occ: Tensor | None, t: int) -> tuple[Tensor, Tensor | None]:
    """Pixel-frame flows ``(B, T-1, 2, H, W)`` -> flows between the ``t`` latent frames of a
    design that compresses time ``c``-fold (latent frame ``k`` stands for pixel frame ``c k``):
    the sum of the ``c`` pixel flows in between (a small-motion approximation; occlusion is the
    union of theirs)."""
    pairs = flow.shape[1]
    if t < 2 or pairs % (t - 1):
        raise TcplugError(f"flow of {pairs + 1} frames does not fit {t} (latent) frames")
    c = pairs // (t - 1)
    flow = flow.unflatten(1, (t - 1, c)).sum(2)
    if occ is not None:
        occ = occ.unflatten(1, (t - 1, c)).amax(2)
    return flow, occ


def decode_subset(ctx: LossContext, clips: int, latent_frames: int | None) -> Tensor:
    """Decode the predicted clean latents of the first ``clips`` clips (and the first
    ``latent_frames`` latent frames) only: ``(clips, T, 3, H, W)``. (Checkpointing the decode
    was measured and dropped: the loss's backward starts with the decoder, so its recomputed
    activations meet the same peak, at twice the decode time; docs/benchmarks.md.)"""
    z = ctx.pred_x0()[:clips]
    if latent_frames:
        z = z[:, :latent_frames]
    return ctx.latent.decode(z)


class PerceptualTemporal(LossTerm):
    """Flow-compensated temporal loss in a feature space.

    The predicted clean clip is decoded to pixels, mapped per frame to features, and frame
    ``n+1``'s features, warped back with the flow (resized to the feature grid), are compared
    with frame ``n``'s on non-occluded positions.

    Args:
        weight: multiplier in the total loss.
        features: the feature space, from most to least meaningful:

            - ``path``: a feature network the user gives (a TorchScript file saved with
              ``torch.jit.save``, loaded from ``network_path``; e.g. a VGG or DINO trunk):
              the only truly *perceptual* choice, since nothing can be downloaded here;
            - ``latent_encoder``: the latent design's encoder, learned by its autoencoder
              (``two_tier``, ``vae``, ``video_ldm``); on ``pixel`` latents it is the identity
              and the term equals ``flow_warp``;
            - ``discriminator``: the trunk of the module's discriminator, learned only when an
              ``adversarial`` term trains it (otherwise it is a fixed random trunk);
            - ``random_trunk``: a fixed, randomly initialized two-layer conv net (seed 0)
              owned by the term: random features, not perceptual, kept as a control.
        network_path: local file of the user-supplied feature network (``features: path``);
            it maps ``(N, 3, H, W)`` in ``[-1, 1]`` to ``(N, C, h, w)``. Never downloaded.
        weighting: ``none`` or ``snr`` (see ``flow_warp``).
        max_clips: decode only this many clips of the batch (see ``flow_warp``): for real video VAEs.
        max_latent_frames: decode only this many leading latent frames.
    """

    def __init__(self, weight: float = 1.0,
                 features: Literal["path", "latent_encoder", "discriminator", "random_trunk"] = "latent_encoder",
                 network_path: str | None = None, weighting: Literal["none", "snr"] = "snr",
                 max_clips: int | None = None, max_latent_frames: int | None = None) -> None:
        super().__init__(weight)
        self.features, self.network_path, self.weighting = features, network_path, weighting
        self.max_clips, self.max_latent_frames = max_clips, max_latent_frames
        self.net = None
        if features == "random_trunk":
            gen = torch.Generator().manual_seed(0)
            self.net = nn.Sequential(nn.Conv2d(3, 16, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(16, 32, 3, 1, 1))
            with torch.no_grad():
                for p in self.net.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * (0.1 if p.dim() == 1 else (1.0 / p[0].numel()) ** 0.5))
                    p.requires_grad_(False)
        if features == "path":
            if not network_path:
                raise TcplugError("perceptual_temporal with features: path needs network_path (a local file)")
            try:
                self.net = torch.jit.load(network_path, map_location="cpu").eval()
            except Exception as exc:
                raise TcplugError(f"cannot load feature network {network_path}: {exc}") from None
            for p in self.net.parameters():
                p.requires_grad_(False)

    def feature_frames(self, ctx: LossContext, video: Tensor) -> Tensor:
        """``(B, T, 3, H, W)`` -> per-frame features ``(B, T, C, h, w)``."""
        b, t = video.shape[:2]
        if self.features == "latent_encoder":
            return ctx.latent.encode(video)
        if self.features == "discriminator":
            d = ctx.discriminator
            if d is None or not hasattr(d, "trunk"):
                raise TcplugError("perceptual_temporal with features: discriminator needs a discriminator with a trunk")
            return d.trunk(video)
        out = self.net(video.flatten(0, 1))
        return out.view(b, t, *out.shape[1:])

    def forward(self, ctx: LossContext) -> Tensor:
        flow = _need_flow(ctx, "perceptual_temporal").float()  # (B, T-1, 2, H, W)
        occ = ctx.batch.get("occ")
        b = min(self.max_clips or flow.shape[0], flow.shape[0])
        if self.max_clips or self.max_latent_frames:
            video = decode_subset(ctx, b, self.max_latent_frames)
        else:
            video = ctx.pred_video()[:b]
        flow, occ = flow[:b, : video.shape[1] - 1], occ[:b, : video.shape[1] - 1] if occ is not None else None
        feats = self.feature_frames(ctx, video).float()
        if feats.shape[1] != video.shape[1]:  # features at a coarser time grid (a video VAE's encoder)
            flow, occ = pool_flow(flow, occ, feats.shape[1])
        h, w = feats.shape[-2:]
        flat = flow.flatten(0, 1)
        per_clip = warp_consistency(feats, _resize_flow(flat, h, w), _valid({"occ": occ}, flat.shape[0], h, w,
                                                                             feats.device))
        if self.weighting == "snr":
            per_clip = per_clip * ctx.snr_weight()[:b]
        return per_clip.mean()


def random_clip(video: Tensor, frames: int, generator: torch.Generator | None = None) -> Tensor:
    """A window of ``frames`` consecutive frames of ``(B, T, C, H, W)`` (all if shorter)."""
    t = video.shape[1]
    if frames >= t:
        return video
    start = int(torch.randint(0, t - frames + 1, (1,), generator=generator))
    return video[:, start: start + frames]


class Adversarial(LossTerm):
    """Hinge adversarial term against a clip discriminator (e.g. ``conv3d``).

    Generator side: ``-mean(D(fake))`` on a random window of ``clip_frames`` frames of the
    decoded clean-clip prediction. Discriminator side (:meth:`discriminator_loss`, its own
    optimizer): ``mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))``. Before ``start_step``
    the term is 0 and the discriminator is not trained (warm-up).

    Args:
        weight: multiplier in the total loss.
        clip_frames: frames per judged clip.
        start_step: global step at which adversarial training starts.
    """

    def __init__(self, weight: float = 0.1, clip_frames: int = 4, start_step: int = 0) -> None:
        super().__init__(weight)
        self.clip_frames, self.start_step = clip_frames, start_step

    def active(self, ctx: LossContext) -> bool:
        return ctx.step >= self.start_step

    def forward(self, ctx: LossContext) -> Tensor:
        if ctx.discriminator is None:
            raise TcplugError("the adversarial loss needs model.discriminator (e.g. class_path: conv3d)")
        if not self.active(ctx):
            return ctx.pred.new_zeros(())
        fake = random_clip(ctx.pred_video(), self.clip_frames)
        return -ctx.discriminator(fake).mean()

    def discriminator_loss(self, ctx: LossContext, discriminator) -> Tensor | None:
        """Hinge loss of the discriminator on real data clips vs the (detached) prediction."""
        if not self.active(ctx):
            return None
        real = random_clip(ctx.batch["video"], self.clip_frames)
        fake = random_clip(ctx.pred_video().detach(), self.clip_frames)
        return F.relu(1 - discriminator(real)).mean() + F.relu(1 + discriminator(fake)).mean()


class Reconstruction(LossTerm):
    """L1 reconstruction of the data clip through the latent design: ``|decode(encode(v)) - v|``.

    Trains a trainable latent design (``two_tier``, a trainable ``vae``, the ``video_ldm``
    decoder); the diffusion terms never move the latent space (the module detaches the
    encoded clip they see).
    """

    def forward(self, ctx: LossContext) -> Tensor:
        video = ctx.batch["video"]
        return (ctx.latent.decode(ctx.latent.encode(video)) - video).abs().mean()


@hookimpl
def tcplug_register_components(register):
    register(Denoise, name="denoise")
    register(FlowWarp, name="flow_warp")
    register(PerceptualTemporal, name="perceptual_temporal")
    register(Adversarial, name="adversarial")
    register(Reconstruction, name="reconstruction")
