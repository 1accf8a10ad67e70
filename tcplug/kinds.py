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
from torchmetrics import Metric

from tcplug.errors import TcplugError

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
    "VideoMetric",
    "WorldConditioner",
]


class Backbone(nn.Module):
    """A denoiser over latents.

    ``forward(x, timesteps, context=None) -> Tensor``

    - ``x``: noisy latents ``(B, T, C, h, w)`` with ``C == self.in_channels``.
    - ``timesteps``: diffusion time per clip ``(B,)``, per frame ``(B, T)`` or per token
      ``(B, T, N)`` where ``N`` is the number of tokens of one frame (``N = h*w / patch_size**2``).
      Float or integer, in the schedule's range ``[0, num_train_timesteps)``.
    - ``context``: optional dict of extra inputs made by :class:`WorldConditioner` s; a backbone
      ignores keys it does not know. Keys the built-in ``dit`` reads: ``residuals`` (one tensor
      per block, broadcastable to ``(B, T, N, token_dim)``, added after the block), ``text``
      ``(B, L, token_dim)`` with ``text_mask`` ``(B, L)`` bool (cross-attention),
      ``expert_weights`` ``(B, E)`` (feed-forward experts), ``stream`` (a FrameStream),
      ``input_maps`` ``(B, T, K, h, w)`` (maps at latent resolution added at the input, after
      ``add_map_input(K)``).
    - returns the model prediction ``(B, T, C, h, w)`` (epsilon, v, x0 or velocity: the
      schedule decides what it is trained to mean).

    Attributes a backbone exposes so conditioners and routers can size themselves:
    ``in_channels``, ``patch_size`` (latent pixels per token side), ``token_dim`` (token width),
    ``num_blocks``. Optional capabilities, asked for by other components when a recipe needs
    them (the default raises a clear error): :meth:`add_cross_attention`, :meth:`add_ffn_experts`.
    A model family whose pipeline sets its sampler's timesteps its own way (LTX-Video's
    ``sigmas`` and resolution-dependent shift ``mu``) defines :meth:`timestep_schedule`.
    """

    in_channels: int = 3
    patch_size: int = 1
    token_dim: int = 0
    num_blocks: int = 0

    def forward(self, x: Tensor, timesteps: Tensor, context: dict[str, Any] | None = None) -> Tensor:
        raise NotImplementedError

    def check_latents(self, x: Tensor, name: str | None = None) -> tuple[int, int, int, int, int]:
        """``x``'s shape ``(B, T, C, h, w)`` after checking it fits: ``C == in_channels`` and
        ``h, w`` multiples of ``patch_size`` (a clear error otherwise)."""
        name = name or type(self).__name__
        if x.dim() != 5:
            raise TcplugError(f"{name} expects latents (B, T, C, h, w), got shape {tuple(x.shape)}")
        b, t, c, h, w = x.shape
        if c != self.in_channels:
            raise TcplugError(f"{name} expects {self.in_channels} latent channels, got {c}")
        if h % self.patch_size or w % self.patch_size:
            raise TcplugError(f"latent size {h}x{w} is not a multiple of the {name} patch size {self.patch_size}")
        return b, t, c, h, w

    def timestep_schedule(self, scheduler: Any, steps: int, latent_shape: tuple[int, ...]) -> dict | None:
        """Keyword arguments for ``scheduler.set_timesteps`` when sampling ``steps`` steps of
        latents ``(B, T, C, h, w)``, as the model's own pipeline passes them; None (the
        default) calls ``set_timesteps(steps)``."""
        return None

    def add_cross_attention(self) -> None:
        """Give every block a cross-attention to ``context["text"]`` (zero-initialized output,
        so the model is unchanged until it trains). Called once, before training."""
        raise TcplugError(f"backbone {type(self).__name__} cannot attend to captions (no add_cross_attention)")

    def add_ffn_experts(self, num_experts: int) -> None:
        """Replace every block's feed-forward layer by ``num_experts`` copies mixed by
        ``context["expert_weights"]`` ``(B, E)``. Called once, before training."""
        raise TcplugError(f"backbone {type(self).__name__} has no feed-forward experts (no add_ffn_experts)")


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

    - ``encode(video (B, T, 3, H, W)) -> latents (B, T', latent_channels, H/f, W/f)``
    - ``decode(latents) -> video (B, T, 3, H, W)`` in ``[-1, 1]``
    - ``downsample`` is ``f``; ``temporal_compression`` is the time factor (``T' < T`` when > 1,
      see :meth:`latent_frames`; the engine asks the design, never assumes ``T' == T``);
      ``decodable`` is false for designs whose decode is lossy
      enough that pixel-space losses should not be applied to it.
    """

    latent_channels: int = 3
    downsample: int = 1
    temporal_compression: int = 1
    decodable: ClassVar[bool] = True

    def latent_frames(self, frames: int) -> int:
        """Latent frames ``T'`` for ``frames`` pixel frames; raises a clear error for a count the
        design cannot take. With ``temporal_compression`` ``c > 1`` (a causal video VAE: the first
        frame alone, then groups of ``c``) ``T`` must be ``c*k + 1`` and ``T' = (T - 1)/c + 1``."""
        c = self.temporal_compression
        if frames < 1:
            raise TcplugError(f"need at least 1 frame, got {frames}")
        if c == 1:
            return frames
        if (frames - 1) % c:
            lo = (frames - 1) // c * c + 1
            raise TcplugError(
                f"{type(self).__name__} compresses time {c}x: a clip needs {c}k+1 frames (e.g. {lo} or {lo + c}), "
                f"got {frames}"
            )
        return (frames - 1) // c + 1

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
        timesteps: ``(B,)`` per clip, or ``(B, T, 1, h, w)`` per latent pixel when a motion
            lock gives locked tokens their own timestep (what the schedule's methods take).
        pred: the backbone's prediction, same shape as ``x0``.
        target: what ``pred`` should equal under the schedule's parameterization.
        schedule: the :class:`~tcplug.sampling.NoiseSchedule` (e.g. ``schedule.pred_x0``).
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

    ``forward(timesteps (B,), schedule) -> weights (B, num_experts)``; rows sum to one, a hard
    router returns one-hot rows. ``timesteps`` are in the schedule's timestep space (after any
    flow-matching shift), the same numbers the backbone sees, in training and in the sampler,
    so both route identically. ``schedule`` is the :class:`~tcplug.sampling.NoiseSchedule`
    (for routing in SNR space).

    ``experts`` says what is replicated per expert: ``backbone`` (whole backbones) or ``ffn``
    (the feed-forward layer inside each block, see :meth:`Backbone.add_ffn_experts`).

    A router with a training objective of its own (a load-balancing term) implements
    ``auxiliary_loss(timesteps, schedule) -> Tensor`` and sets ``aux_weight``; the module adds
    ``aux_weight * term`` to the loss and logs it as ``train/loss_<aux_name>`` (default: the
    router's registry name).
    """

    num_experts: int = 1
    experts: str = "backbone"

    def forward(self, timesteps: Tensor, schedule: NoiseSchedule) -> Tensor:
        raise NotImplementedError


class WorldConditioner(nn.Module):
    """Structural inputs (depth, skeleton, physical state, captions) for the backbone.

    ``forward(batch: dict, latent_shape: tuple) -> dict[str, Tensor]``: reads its inputs from
    the batch (ground truth in training; a data clip, a state file or a caption at sampling)
    and returns a context dict merged into the backbone's ``context``. ``latent_shape`` is
    ``(B, T, C, h, w)``. Several conditioners may be stacked: their ``residuals`` are summed
    block by block, their ``maps`` and ``input_maps`` concatenated along ``K``; other keys must
    not clash.

    Conventions: conditioning maps at pixel resolution go under ``maps`` ``(B, T, K, H, W)``
    (motion lockers may read them); ControlNet-style residuals under ``residuals``; maps for
    the backbone's input, at latent resolution, under ``input_maps`` ``(B, T, K, h, w)``.

    Optional methods:

    - ``setup(backbone)``: called once by the module before training, to size adapters to
      the backbone (``token_dim``, ``num_blocks``, ``patch_size``) or ask it for a capability.
    - ``auxiliary_loss(batch) -> Tensor`` with ``aux_weight``: a training objective of its own
      (the world model's dynamics), logged as ``train/loss_<aux_name>`` (default: the
      conditioner's registry name).
    - ``null_context(context) -> dict``: the unconditional context for classifier-free
      guidance (a caption conditioner replaces the caption by the empty one).
    """

    #: batch keys the conditioner reads at sampling (``txt``, ``state``, ``depth``, ``skeleton``,
    #: ...); ``a|b`` means either. ``tcplug sample`` names the flags that give missing ones.
    needs: ClassVar[tuple[str, ...]] = ()

    def setup(self, backbone: Backbone) -> None:
        """Size the conditioner to ``backbone`` (default: nothing to do)."""

    def forward(self, batch: dict[str, Any], latent_shape: tuple[int, ...]) -> dict[str, Tensor]:
        raise NotImplementedError


class MotionLocker(nn.Module):
    """Per-region mask of what may move between frames.

    ``forward(batch, context=None, preview=None) -> mask (B, 1, H, W)`` at pixel resolution,
    values in ``[0, 1]``; 1 means locked (static: tied to the anchor frame 0), 0 means free.
    ``None`` means no lock for this batch.

    - ``batch``: the data batch (``static`` mask, ``flow``...) or what the sampler was given.
    - ``context``: the conditioners' context (``maps`` ``(B, T, K, H, W)``), if any.
    - ``preview``: a callable returning a cheap first-pass sample ``(B, T, 3, H, W)`` (few
      sampler steps, no lock), for lockers that estimate motion from it.

    The module reduces the mask to whole backbone tokens (a token is locked only if all its
    pixels are) and the sampler gives locked tokens of frames after the anchor the anchor's
    noise and a near-zero per-token timestep (``model.lock_timestep``) while free tokens get
    the full step; training uses the same per-token timesteps.
    """

    def forward(self, batch: dict[str, Any], context: dict[str, Any] | None = None,
                preview: Any = None) -> Tensor | None:
        raise NotImplementedError


class VideoMetric(Metric):
    """A measurement of clips, picked by name in a recipe (``model.metrics``) and in
    ``tcplug score --metrics``, and computed the same way in both.

    A torchmetrics :class:`~torchmetrics.Metric`: states are reduced across DDP processes, so 1
    and N processes agree. The caller feeds it:

    - ``update(video, flows=None, batch=None)``: the clips judged. ``video`` ``(B, T, C, H, W)``
      float in ``[0, 1]``; ``flows`` the pair ``(fwd, bwd)`` of ``(B, T-1, 2, H, W)`` optical
      flows in pixels, estimated once per clip by the caller (OpenCV DIS) and shared by every
      metric that sets ``needs_flow``; ``batch`` what the data knows about the clips (a
      ``static`` mask ``(B, 1, H, W)``, an object ``state``), or None.
    - ``update_reference(video, flows=None, batch=None)``: reference clips (real footage of
      the same world), for metrics that compare with them (``needs_reference``). Called
      before or after ``update``; both feed the same ``compute``.
    - ``compute()``: a scalar tensor; NaN when nothing could be measured (the caller then
      reports nothing rather than a number).

    Attributes: ``higher_is_better`` (True, False, or None when the target is 1, as for a
    ratio to the reference); ``needs_flow``; ``needs_reference``.
    """

    full_state_update: ClassVar[bool] = False
    higher_is_better: ClassVar[bool | None] = None
    needs_flow: ClassVar[bool] = False
    needs_reference: ClassVar[bool] = False

    def update(self, video: Tensor, flows: tuple[Tensor, Tensor] | None = None,
               batch: dict[str, Any] | None = None) -> None:
        raise NotImplementedError

    def update_reference(self, video: Tensor, flows: tuple[Tensor, Tensor] | None = None,
                         batch: dict[str, Any] | None = None) -> None:
        """Feed reference clips (default: this metric has no use for them)."""

    def compute(self) -> Tensor:
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
    "metric": VideoMetric,
}
