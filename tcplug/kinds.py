"""The base class (interface) of every kind of component, and every question the engine asks.

A component's *kind* is the base class it subclasses; the registry infers it when a plugin
registers the class. Tensor layout everywhere: video ``(B, T, C, H, W)`` with pixels in
``[-1, 1]``; latents ``(B, T, c, h, w)``. Components must be picklable (DDP spawns processes):
no lambdas, no local classes, no plugin manager kept as an attribute.

Every capability the engine may use is declared here with its default, on :class:`Component`
(all eight module kinds) or on the kind itself; the engine calls these methods and reads these
attributes, it never probes a component with ``hasattr``. The ninth kind, ``metric``
(:class:`~tcplug.metrics.base.VideoMetric`, a torchmetrics ``Metric``; ``tcplug.VideoMetric``),
lives with the metrics, so that importing the kinds does not import torchmetrics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from tcplug.errors import TcplugError

if TYPE_CHECKING:  # pragma: no cover
    from tcplug.diffusion.sampling import NoiseSchedule
    from tcplug.loss_context import LossContext

__all__ = [
    "AttentionVariant",
    "Backbone",
    "Component",
    "DataKey",
    "Discriminator",
    "LatentDesign",
    "LossTerm",
    "MotionLocker",
    "Router",
    "WorldConditioner",
]


@dataclass(frozen=True)
class DataKey:
    """A key of a shard sample that a component reads, and how to decode it.

    Attributes:
        name: the batch key (``batch[name]``), also what ``data.keys`` lists.
        entry: the sample entry that holds it (``"depth.npy"``, ``"state.json"``, ``"txt"``).
        decode: a module-level function ``decode(raw: bytes, frames: int, height: int, width: int)
            -> Tensor | Any`` (picklable: data-loader workers call it); it raises ``ValueError`` for
            bytes it cannot decode or a shape that does not fit the clip. Tensors are stacked into
            ``(B, ...)`` batches; anything else is collated into a list.
        doc: what the key holds, with its shape (shown by ``tcplug data inspect`` and the docs).
    """

    name: str
    entry: str
    decode: Callable[[bytes, int, int, int], Any]
    doc: str = ""


class Component(nn.Module):
    """What every kind of component may declare. Defaults mean "nothing of the sort".

    Attributes:
        pretrained: the local model folder this component loaded its weights from (None: it
            loaded none). Frozen parameters of such a component, and the stored buffers of one in
            which nothing trains (a VAE's latent statistics), are left out of checkpoints and
            reloaded from the folder.
        oracle: True when the component reads something a user could not give at sampling time
            (the clip's future, the simulator's exact state): results with it are labelled.
        needs: batch keys the component reads at sampling (``txt``, ``state``, ``depth``,
            ``static``...); ``a|b`` means either. ``tcplug sample`` names the flags that give
            missing ones.
        data_keys: shard keys the component reads that the engine does not know
            (:class:`DataKey`); the DataModule decodes them like its own.
    """

    pretrained: str | None = None
    oracle: ClassVar[bool] = False
    needs: ClassVar[tuple[str, ...]] = ()
    data_keys: ClassVar[tuple[DataKey, ...]] = ()

    def param_groups(self) -> list[dict[str, Any]]:
        """Parameters of this component that train with settings of their own: a list of
        ``{"params": [...], "lr_scale": float, ...}``; they train at ``lr * lr_scale`` in their own
        optimizer group (other keys, e.g. ``weight_decay``, go to the group as they are). Every
        other trainable parameter trains in the main group. Default: none."""
        return []


class Backbone(Component):
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
    ``num_blocks``; ``supports_streaming`` (it takes ``context["stream"]``, the K/V frame buffer).
    Capabilities other components ask for (the default raises a clear error):
    :meth:`add_cross_attention`, :meth:`add_ffn_experts`, :meth:`add_map_input`. LoRA adapters go
    into :attr:`lora_target`; :meth:`save_lora_weights` writes them in the family's format. A model
    family whose pipeline sets its sampler's timesteps its own way (LTX-Video's ``sigmas`` and
    resolution-dependent shift ``mu``) defines :meth:`timestep_schedule`.
    """

    in_channels: int = 3
    patch_size: int = 1
    token_dim: int = 0
    num_blocks: int = 0
    supports_streaming: bool = False

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

    def add_map_input(self, channels: int) -> None:
        """Take ``context["input_maps"]`` ``(B, T, channels, h, w)`` at the input (a
        zero-initialized convolution added to the stem, so the model is unchanged until it
        trains). Called once per conditioner that gives input maps, before training."""
        raise TcplugError(f"backbone {type(self).__name__} takes no maps at its input (no add_map_input)")

    @property
    def lora_target(self) -> nn.Module:
        """The module LoRA adapters go into (default: the backbone itself; a family points at the
        wrapped diffusers model, so adapter names are the ones its pipeline loads)."""
        return self

    #: the adapter file formats :meth:`save_lora_weights` writes (the first is the default)
    lora_formats: tuple[str, ...] = ("diffusers",)

    def save_lora_weights(self, out: str, state_dict: dict[str, Tensor], format: str = "diffusers") -> None:
        """Write adapters (a peft state dict of :attr:`lora_target`, the ``alpha / rank`` scale
        already folded into ``lora_B``) to the folder ``out`` in ``format``, one of
        :attr:`lora_formats` (``diffusers``: what the family's pipeline loads). Default: no
        export format."""
        raise TcplugError(f"backbone {type(self).__name__} has no save_lora_weights: its family defines no "
                          "export format for adapters")


class AttentionVariant(Component):
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

    def memory(self) -> tuple[int, bool | int]:
        """Frames to keep from earlier chunks when streaming: ``(window, first_frames)``.

        ``window`` previous frames, plus the video's first frame if ``first_frames`` is True, or
        its first ``first_frames`` frames if it is a number (an attention sink). A variant that
        cannot stream (it looks at future frames) raises :class:`NotImplementedError`.
        """
        raise NotImplementedError(f"{type(self).__name__} does not support streaming")


class LatentDesign(Component):
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


class LossTerm(Component):
    """A weighted term of the training objective.

    ``forward(ctx: LossContext) -> Tensor`` returns the *unweighted* scalar term; the module
    multiplies by ``self.weight`` and logs each term as ``train/loss_<name>``.

    ``ctx`` is a :class:`~tcplug.loss_context.LossContext`. A term that also trains the
    discriminator (an adversarial term) overrides
    :meth:`discriminator_loss`; the module then switches to manual optimization and alternates
    a discriminator step with its own optimizer (:attr:`trains_discriminator` says so).
    """

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        if weight < 0:
            raise ValueError(f"loss weight must be >= 0, got {weight}")
        self.weight = float(weight)

    def forward(self, ctx: LossContext) -> Tensor:
        raise NotImplementedError

    def discriminator_loss(self, ctx: LossContext, discriminator: Discriminator) -> Tensor | None:
        """The discriminator's loss for this step (None: no discriminator step this time, e.g.
        before the term's start step). Default: this term trains no discriminator."""
        return None

    @property
    def trains_discriminator(self) -> bool:
        """Whether the term trains a discriminator: true when it overrides
        :meth:`discriminator_loss`."""
        return type(self).discriminator_loss is not LossTerm.discriminator_loss


class Discriminator(Component):
    """Judges clips for the adversarial term.

    ``forward(video (B, T, C, H, W)) -> logits`` of any shape starting with ``B``
    (a PatchGAN returns one logit per space-time patch).
    """

    def forward(self, video: Tensor) -> Tensor:
        raise NotImplementedError


class Router(Component):
    """Sends each noise level to its expert(s).

    ``forward(timesteps (B,), schedule) -> weights (B, num_experts)``; rows sum to one, a hard
    router returns one-hot rows. ``timesteps`` are in the schedule's timestep space (after any
    flow-matching shift), the same numbers the backbone sees, in training and in the sampler,
    so both route identically. ``schedule`` is the :class:`~tcplug.diffusion.sampling.NoiseSchedule`
    (for routing in SNR space).

    ``experts`` says what is replicated per expert: ``backbone`` (whole backbones) or ``ffn``
    (the feed-forward layer inside each block, see :meth:`Backbone.add_ffn_experts`).

    A router with a training objective of its own (a load-balancing term) overrides
    :meth:`auxiliary_loss`; the module adds ``aux_weight * term`` to the loss and logs it as
    ``train/loss_<aux_name>`` (default: the router's registry name).
    """

    num_experts: int = 1
    experts: str = "backbone"
    aux_weight: float = 1.0
    aux_name: str | None = None

    def forward(self, timesteps: Tensor, schedule: NoiseSchedule) -> Tensor:
        raise NotImplementedError

    def auxiliary_loss(self, timesteps: Tensor, schedule: NoiseSchedule) -> Tensor | None:
        """The router's own training term for timesteps ``(B,)`` (None, the default: none)."""
        return None


class WorldConditioner(Component):
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

    What the engine may ask of a conditioner, with its default: :meth:`setup` (size adapters to
    the backbone), :meth:`stream_context` (one chunk of a streamed video), :meth:`auxiliary_loss` with ``aux_weight`` / ``aux_name`` (a training objective
    of its own, e.g. the world model's dynamics), :meth:`null_context` (the unconditional context
    for classifier-free guidance), :meth:`precompute` / :meth:`precompute_shared` (what
    ``tcplug data encode`` stores in shards), and ``needs`` (batch keys read at sampling).
    """

    aux_weight: float = 1.0
    aux_name: str | None = None

    def setup(self, backbone: Backbone) -> None:
        """Size the conditioner to ``backbone`` or ask it for a capability (``token_dim``,
        ``num_blocks``, ``patch_size``, :meth:`Backbone.add_cross_attention`). Called once by the
        model before training (default: nothing to do)."""

    def forward(self, batch: dict[str, Any], latent_shape: tuple[int, ...]) -> dict[str, Tensor]:
        raise NotImplementedError

    #: context entries that hold one value per frame (their dim 1 is the latent frame axis)
    PER_FRAME: ClassVar[tuple[str, ...]] = ("maps", "input_maps", "residuals")

    def stream_context(self, batch: dict[str, Any], latent_shape: tuple[int, ...], start: int,
                       state: dict[str, Any]) -> dict[str, Any]:
        """The context for one chunk of a streamed video: latent frames ``start .. start + T`` of
        ``latent_shape`` ``(B, T, C, h, w)`` (the chunk's). ``batch`` is what :meth:`forward` gets
        at sampling, with ``frames`` (the chunk's pixel frames, a ``range``) and ``num_frames``
        (their count); ``state`` is this conditioner's, kept across the chunks of one video (what
        it rolls forward: a world model's object state), so memory does not grow with the length.

        Default: :meth:`forward`'s context, right for a condition that does not change with time
        (a caption). A conditioner whose context has per-frame entries (:attr:`PER_FRAME`) must
        override this; without it, streaming past the first chunk raises a clear error."""
        ctx = self(batch, latent_shape)
        if start > 0 and any(k in ctx for k in self.PER_FRAME):
            raise TcplugError(f"conditioner {type(self).__name__} gives per-frame conditioning but defines no "
                              "stream_context: a video longer than one chunk cannot be streamed with it (sample it "
                              "all at once, or give it a stream_context that rolls its condition forward)")
        return ctx

    def auxiliary_loss(self, batch: dict[str, Any]) -> Tensor | None:
        """A training term of the conditioner itself, logged as ``train/loss_<aux_name>``
        (default: the registry name) and weighted by ``aux_weight``; None (the default): none."""
        return None

    def null_context(self, context: dict[str, Any]) -> dict[str, Any] | None:
        """``context`` with this conditioner's condition dropped, for classifier-free guidance (a
        caption conditioner puts the empty caption's embedding in place); None (the default):
        this conditioner has no unconditional form, and a model with none samples unguided."""
        return None

    def precompute(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Per-clip arrays ``{key: (B, ...)}`` that ``tcplug data encode`` stores in the shards
        (a text encoder's ``text_emb``), so training never runs the encoder. Default: none."""
        return {}

    def precompute_shared(self) -> dict[str, Tensor]:
        """Arrays stored once for the whole shard folder (the negative prompt's embedding); the
        DataModule adds them to every batch. Default: none."""
        return {}


class MotionLocker(Component):
    """Per-region mask of what may move between frames.

    ``forward(batch, context=None, preview=None) -> mask (B, 1, H, W)`` at pixel resolution,
    values in ``[0, 1]``; 1 means locked (static: tied to the anchor frame 0), 0 means free.
    ``None`` means no lock for this batch.

    - ``batch``: the data batch (``static`` mask, ``flow``...) or what the sampler was given.
    - ``context``: the conditioners' context (``maps`` ``(B, T, K, H, W)``), if any.
    - ``preview``: a callable returning a cheap first-pass sample ``(B, T, 3, H, W)`` (few
      sampler steps, no lock), for lockers that estimate motion from it.

    The model reduces the mask to whole backbone tokens (a token is locked only if all its
    pixels are) and the sampler gives locked tokens of frames after the anchor the anchor's
    noise and a near-zero per-token timestep (``model.lock_timestep``) while free tokens get
    the full step; training uses the same per-token timesteps (:mod:`tcplug.diffusion.lock`).
    """

    def forward(self, batch: dict[str, Any], context: dict[str, Any] | None = None,
                preview: Any = None) -> Tensor | None:
        raise NotImplementedError


# ----- the kinds by name (the registry infers a component's kind from these) --------------------
MODULE_KINDS: dict[str, type[Component]] = {
    "backbone": Backbone,
    "attention": AttentionVariant,
    "latent": LatentDesign,
    "loss": LossTerm,
    "discriminator": Discriminator,
    "router": Router,
    "conditioner": WorldConditioner,
    "motion_lock": MotionLocker,
}
