"""The base class (interface) of every kind of component.

A component's *kind* is the base class it subclasses; the registry infers it when a plugin
registers the class. Tensor layout everywhere: video ``(B, T, C, H, W)`` with pixels in
``[-1, 1]``; latents ``(B, T, c, h, w)``. Components must be picklable (DDP spawns processes):
no lambdas, no local classes, no plugin manager kept as an attribute.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

if TYPE_CHECKING:  # pragma: no cover
    from tcplug.sampling import NoiseSchedule

__all__ = [
    "AttentionVariant",
    "Backbone",
    "Discriminator",
    "KINDS",
    "LatentDesign",
    "LossContext",
    "LossTerm",
    "MotionLocker",
    "Router",
    "WorldConditioner",
]


class Backbone(nn.Module):
    """A denoiser over latents.

    ``forward(x, timesteps, context=None) -> Tensor``

    - ``x``: noisy latents ``(B, T, C, h, w)`` with ``C == self.in_channels``.
    - ``timesteps``: diffusion time per clip ``(B,)``, per frame ``(B, T)`` or per token
      ``(B, T, N)`` where ``N`` is the number of tokens of one frame. Float or integer, in
      the schedule's range ``[0, num_train_timesteps)``.
    - ``context``: optional dict of extra inputs (structural conditioning, captions) made by
      a :class:`WorldConditioner`; a backbone ignores keys it does not know.
    - returns the model prediction ``(B, T, C, h, w)`` (epsilon, v, x0 or velocity: the
      schedule decides what it is trained to mean).
    """

    in_channels: int = 3

    def forward(self, x: Tensor, timesteps: Tensor, context: dict[str, Any] | None = None) -> Tensor:
        raise NotImplementedError


class AttentionVariant(nn.Module):
    """Which frames' keys/values each frame's queries see.

    ``forward(q, k, v, kv_index=None) -> Tensor``

    - ``q``: ``(B, Tq, H, N, D)``: batch, query frames, heads, tokens per frame, head dim.
    - ``k``, ``v``: ``(B, Tk, H, N, D)`` with ``Tk >= Tq``; the queries are the *last* ``Tq`` key
      frames. In training ``Tk == Tq``.
    - ``kv_index``: absolute frame index of each key frame ``(Tk,)`` (long). ``None`` means
      ``arange(Tk)``. While streaming long videos, ``k``/``v`` hold the frames kept from
      earlier chunks (see :meth:`memory`) followed by the current chunk's frames.
    - returns ``(B, Tq, H, N, D)``.

    Implementations use :func:`torch.nn.functional.scaled_dot_product_attention` and never
    materialize the score matrix themselves. ``causal`` is true when frame ``n``'s output never
    depends on frames after ``n``.
    """

    causal: ClassVar[bool] = False

    def forward(self, q: Tensor, k: Tensor, v: Tensor, kv_index: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def memory(self) -> tuple[int, bool]:
        """Frames to keep from earlier chunks when streaming: ``(window, first_frame)``.

        ``window`` previous frames, plus the video's first frame if ``first_frame``. A variant
        that cannot stream (it looks at future frames) raises :class:`NotImplementedError`.
        """
        raise NotImplementedError(f"{type(self).__name__} does not support streaming")


class LatentDesign(nn.Module):
    """Encodes video to the space diffusion runs in, and back.

    - ``encode(video (B, T, 3, H, W)) -> latents (B, T, latent_channels, H/f, W/f)``
    - ``decode(latents) -> video (B, T, 3, H, W)`` in ``[-1, 1]``
    - ``downsample`` is ``f``; ``decodable`` is false for designs whose decode is lossy
      enough that pixel-space losses should not be applied to it.
    """

    latent_channels: int = 3
    downsample: int = 1
    decodable: ClassVar[bool] = True

    def encode(self, video: Tensor) -> Tensor:
        raise NotImplementedError

    def decode(self, latents: Tensor) -> Tensor:
        raise NotImplementedError

    def decode_stream(self, latents: Tensor, state: dict[str, Any]) -> Tensor:
        """Decode one chunk of a streamed video; ``state`` persists across the chunks.

        The default decodes each chunk alone. A design with a per-clip code (``two_tier``)
        stores the first chunk's code in ``state`` and decodes every later chunk with it, so
        a long video keeps one global code.
        """
        return self.decode(latents)


@dataclass
class LossContext:
    """Everything a :class:`LossTerm` may look at in one training step.

    Attributes:
        batch: the data batch (``batch["video"]`` is ``(B, T, 3, H, W)`` in ``[-1, 1]``;
            ground truth such as ``flow`` when the data has it).
        x0: clean latents ``(B, T, C, h, w)``.
        noise: the noise that was added, same shape as ``x0``.
        xt: noisy latents fed to the backbone, same shape.
        timesteps: ``(B,)``, ``(B, T)`` or ``(B, T, N)`` as given to the backbone.
        pred: the backbone's prediction, same shape as ``x0``.
        target: what ``pred`` should equal under the schedule's parameterization.
        schedule: the :class:`~tcplug.sampling.NoiseSchedule` (e.g. ``schedule.pred_x0``).
        latent: the :class:`LatentDesign` (to decode predictions to pixels).
        discriminator: the module's :class:`Discriminator`, if any.
        step: the global training step (for warm-ups).
        extras: scratch space shared between terms within one step (e.g. a decoded clip).
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


class LossTerm(nn.Module):
    """A weighted term of the training objective.

    ``forward(ctx: LossContext) -> Tensor`` returns the *unweighted* scalar term; the module
    multiplies by ``self.weight`` and logs each term as ``train/loss_<name>``.

    A term that also trains the discriminator (an adversarial term) implements
    ``discriminator_loss(ctx, discriminator) -> Tensor``; the module then switches to manual
    optimization and alternates a discriminator step with its own optimizer.
    """

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        if weight < 0:
            raise ValueError(f"loss weight must be >= 0, got {weight}")
        self.weight = float(weight)

    def forward(self, ctx: LossContext) -> Tensor:
        raise NotImplementedError


class Discriminator(nn.Module):
    """Judges clips for the adversarial term.

    ``forward(video (B, T, C, H, W)) -> logits`` of any shape starting with ``B``
    (a PatchGAN returns one logit per space-time patch).
    """

    def forward(self, video: Tensor) -> Tensor:
        raise NotImplementedError


class Router(nn.Module):
    """Sends each noise level to its expert(s).

    ``forward(timesteps (B,)) -> weights (B, num_experts)``; rows sum to one, a hard router
    returns one-hot rows. Training and sampling call it with the same timesteps, so both
    route identically.
    """

    num_experts: int = 1

    def forward(self, timesteps: Tensor) -> Tensor:
        raise NotImplementedError


class WorldConditioner(nn.Module):
    """Structural inputs (depth, skeleton, physical state) for the backbone.

    ``forward(batch: dict, latent_shape: tuple) -> dict[str, Tensor]``: reads ground truth
    from the batch and returns a context dict merged into the backbone's ``context``.
    ``latent_shape`` is ``(B, T, C, h, w)``.
    """

    def forward(self, batch: dict[str, Any], latent_shape: tuple[int, ...]) -> dict[str, Tensor]:
        raise NotImplementedError


class MotionLocker(nn.Module):
    """Per-region mask of what may move between frames.

    ``forward(batch: dict) -> mask (B, 1, H, W)`` with values in ``[0, 1]``; 1 means locked
    (static: tied to the anchor frame), 0 means free to move.
    """

    def forward(self, batch: dict[str, Any]) -> Tensor:
        raise NotImplementedError


KINDS: dict[str, type[nn.Module]] = {
    "backbone": Backbone,
    "attention": AttentionVariant,
    "latent": LatentDesign,
    "loss": LossTerm,
    "discriminator": Discriminator,
    "router": Router,
    "conditioner": WorldConditioner,
    "motion_lock": MotionLocker,
}
