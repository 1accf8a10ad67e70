"""Built-in conditioners: ``depth``, ``skeleton`` (ControlNet-style adapters), ``physics_state``
(a small world model), ``pixel_state`` (the same world model fed with a state estimated from the
first frame's pixels, :mod:`tcplug_conditioners.pixel_state`) and ``caption`` (text through cross-attention, with classifier-free
guidance).

Structural maps enter the backbone as zero-initialized residuals, one per block (the
ControlNet recipe: at initialization the conditioned model *is* the unconditioned one). The
world model encodes the objects' state of the first frame, advances it with learned dynamics
and renders conditioning maps for every frame, which then go through the same adapter.
"""

from __future__ import annotations

import re
import zlib
from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from tcplug import (
    Backbone,
    TcplugError,
    WorldConditioner,
    hookimpl,
    shot_captions,
    shot_spans,
    shot_text_mask,
)

__version__ = "0.1.0"


def _need(batch: dict[str, Any] | None, key: str, who: str) -> Any:
    if batch is None or key not in batch:
        raise TcplugError(
            f"conditioner {who!r} needs {key!r} in the batch: train on data that carries it "
            f"(the synthetic world does; set data.keys to include {key!r}), or give it at sampling"
        )
    return batch[key]


# ----- ControlNet-style adapter ------------------------------------------------------------------
class ControlAdapter(nn.Module):
    """Maps ``(B, T, K, h, w)`` at latent resolution -> one residual per backbone block.

    Patchified like the backbone's tokens (``patch``), embedded to ``dim``, refined by a small
    residual MLP per block; each block's residual leaves through a zero-initialized linear
    layer, so the adapter adds exactly zero until it trains. Returns a list of
    ``(B, T, N, dim)`` tensors.
    """

    def __init__(self, in_channels: int, patch: int, dim: int, num_blocks: int) -> None:
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(in_channels * patch * patch, dim)
        self.mix = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
            for _ in range(num_blocks)
        )
        self.zero = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_blocks))
        for layer in self.zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, maps: Tensor) -> list[Tensor]:
        p = self.patch
        x = self.embed(rearrange(maps, "b t k (hh p1) (ww p2) -> b t (hh ww) (p1 p2 k)", p1=p, p2=p))
        out = []
        for mix, zero in zip(self.mix, self.zero):
            x = x + mix(x)
            out.append(zero(x))
        return out


def pool_frames(maps: Tensor, t: int, who: str = "conditioner", first: bool = True) -> Tensor:
    """Pixel-frame maps ``(B, T, K, H, W)`` -> one per latent frame ``(B, t, K, H, W)``.

    A latent design that compresses time ``c``-fold (``T = c (t - 1) + 1``, a causal video VAE)
    codes frame 0 alone and frames ``c(k-1)+1 .. ck`` in latent frame ``k``: each latent frame
    gets the mean of the maps of the frames it codes. ``T == t`` returns the maps unchanged.
    ``first=False``: the maps start after frame 0 (a later chunk of a streamed video, ``T = c t``)."""
    frames = maps.shape[1]
    if frames == t:
        return maps
    if not first:
        if frames % t:
            raise TcplugError(f"{who}: {frames} frames of conditioning maps do not fit {t} latent frames")
        return maps.unflatten(1, (t, frames // t)).mean(2)
    if t < 2 or (frames - 1) % (t - 1):
        raise TcplugError(f"{who}: {frames} frames of conditioning maps do not fit {t} latent frames")
    c = (frames - 1) // (t - 1)
    rest = maps[:, 1:].unflatten(1, (t - 1, c)).mean(2)
    return torch.cat([maps[:, :1], rest], dim=1)


class MapConditioner(WorldConditioner):
    """Base of conditioners whose input is a stack of maps ``(B, T, K, H, W)``.

    Subclasses set ``channels`` and implement :meth:`maps`. :meth:`setup` sizes the adapter
    to the backbone; the context carries ``maps`` (pixel resolution, for motion lockers) and
    ``residuals`` (one per block).

    Args:
        scale: multiplier of the residuals (a ControlNet "conditioning scale").
        input_maps: also hand the maps, at latent resolution, to the backbone's input
            (``context["input_maps"]``, channel-concatenated like an inpainting model's mask):
            pixel-exact shapes then reach the output without passing through the patch tokens.
            The backbone must offer ``add_map_input(channels)`` (the built-in ``dit`` does).
    """

    channels: int = 1

    def __init__(self, scale: float = 1.0, input_maps: bool = False) -> None:
        super().__init__()
        self.scale, self.input_maps = scale, input_maps
        self.adapter: ControlAdapter | None = None

    def setup(self, backbone: Backbone) -> None:
        if not backbone.token_dim or not backbone.num_blocks:
            raise TcplugError(f"backbone {type(backbone).__name__} exposes no token_dim/num_blocks: "
                              "a ControlNet-style adapter cannot size itself to it")
        if self.adapter is None:
            self.adapter = ControlAdapter(self.channels, backbone.patch_size, backbone.token_dim, backbone.num_blocks)
            if self.input_maps:
                if not hasattr(backbone, "add_map_input"):
                    raise TcplugError(f"{type(self).__name__}(input_maps=True): backbone {type(backbone).__name__} "
                                      "takes no input maps (it has no add_map_input)")
                backbone.add_map_input(self.channels)

    def maps(self, batch: dict[str, Any], latent_shape: tuple[int, ...]) -> Tensor:
        """Conditioning maps ``(B, T, channels, H, W)`` for the clip."""
        raise NotImplementedError

    def forward(self, batch: dict[str, Any], latent_shape: tuple[int, ...]) -> dict[str, Any]:
        return self._context(self.maps(batch, latent_shape), latent_shape)

    def stream_maps(self, batch: dict[str, Any], frames: range, latent_shape: tuple[int, ...],
                    state: dict[str, Any]) -> Tensor:
        """Maps ``(B, len(frames), K, H, W)`` for the pixel frames ``frames`` of a streamed video;
        ``state`` persists across its chunks. Default: the maps of the clip given (a data clip's
        depth or keypoints), cut to the frames; past the clip's end, a clear error. A conditioner
        that can roll its condition forward (the world model) overrides this."""
        maps = self.maps({**batch, "num_frames": frames.stop}, latent_shape)
        if maps.shape[1] < frames.stop:
            raise TcplugError(f"{type(self).__name__}: the conditioning given covers {maps.shape[1]} frames, so a "
                              f"streamed video cannot go past them (frame {frames.stop - 1} was asked)")
        return maps[:, frames.start:frames.stop]

    def stream_context(self, batch: dict[str, Any], latent_shape: tuple[int, ...], start: int,
                       state: dict[str, Any]) -> dict[str, Any]:
        """The chunk's maps (:meth:`stream_maps`, for ``batch["frames"]``) through the adapter."""
        frames = batch["frames"]
        return self._context(self.stream_maps(batch, frames, latent_shape, state), latent_shape,
                             first=frames.start == 0)

    def _context(self, maps: Tensor, latent_shape: tuple[int, ...], first: bool = True) -> dict[str, Any]:
        if self.adapter is None:
            raise TcplugError(f"{type(self).__name__}.setup(backbone) was not called")
        b, t, _, h, w = latent_shape
        maps = maps.to(self.adapter.embed.weight)
        small = pool_frames(maps, t, type(self).__name__, first)
        if small.shape[:2] != (b, t):
            raise TcplugError(f"{type(self).__name__}: conditioning maps {tuple(maps.shape)} do not match "
                              f"latents of {b} clips x {t} frames")
        small = F.adaptive_avg_pool2d(small.flatten(0, 1), (h, w)).unflatten(0, (b, t))
        out = {"maps": maps, "residuals": [r * self.scale for r in self.adapter(small)]}
        if self.input_maps:
            out["input_maps"] = small
        return out


class Depth(MapConditioner):
    """Depth maps (batch key ``depth``, ``(B, T, 1, H, W)``, 0 near .. 1 far) through a
    zero-initialized adapter. Reference: ControlNet depth, Cosmos Transfer.

    ``oracle`` is true: every frame's depth is given, so the clip's motion is given too."""

    channels = 1
    oracle = True
    needs = ("depth",)

    def maps(self, batch: dict[str, Any], latent_shape: tuple[int, ...]) -> Tensor:
        return _need(batch, "depth", "depth").float() * 2 - 1


class Skeleton(MapConditioner):
    """Keypoint heatmaps (batch key ``skeleton``, ``(B, T, K, H, W)`` in ``[0, 1]``; the
    synthetic world gives object centres and bounding-box corners, ``K = 2``). ``oracle`` is
    true: every frame's keypoints are given, so the clip's motion is given too.

    Args:
        channels: ``K``, the number of heatmap channels.
        scale: residual multiplier.
        input_maps: also hand the maps to the backbone's input (see :class:`MapConditioner`).
    """

    oracle = True
    needs = ("skeleton",)

    def __init__(self, channels: int = 2, scale: float = 1.0, input_maps: bool = False) -> None:
        super().__init__(scale, input_maps)
        self.channels = channels

    def maps(self, batch: dict[str, Any], latent_shape: tuple[int, ...]) -> Tensor:
        sk = _need(batch, "skeleton", "skeleton").float()
        if sk.shape[2] != self.channels:
            raise TcplugError(f"skeleton conditioner has channels={self.channels} but the data has {sk.shape[2]}")
        return sk * 2 - 1


# ----- the world model ---------------------------------------------------------------------------
SHAPES = ("circle", "square", "triangle", "diamond")


class PhysicsState(MapConditioner):
    """A world model: object state -> learned dynamics -> rendered conditioning maps.

    The state of the first frame (per object: position, velocity, size, depth, colour; and the
    world's gravity; the synthetic world's ``state.json``) is advanced frame by frame by a
    free flight plus a learned correction, ``s_{n+1} = flight(s_n) + f(s_n)`` (``f`` an MLP,
    zero at the start, that learns the bounces), and rendered to five maps per frame
    (occupancy, depth, RGB colour; objects as soft discs, or as their own silhouettes with
    ``shapes``, near over far). The maps enter the
    backbone through a zero-initialized adapter. In training the dynamics learn from the
    true trajectory (one-step and rollout prediction errors, ``auxiliary_loss``), and the denoiser is
    conditioned on the *rolled-out* maps, exactly as at sampling, where the rollout starts
    from a state given in a file (``tcplug sample --state``) or taken from a data clip.

    Args:
        hidden: width of the dynamics MLP.
        aux_weight: weight of the dynamics loss in the training objective.
        softness: edge width of the rendered discs, in pixels.
        scale: residual multiplier.
        input_maps: also hand the maps to the backbone's input (see :class:`MapConditioner`).
        prior: advance the state by free flight (velocity, gravity) and learn only the
            correction (zero at the start); without it the MLP must learn all of the motion,
            and its rollout drifts from the true positions within a few frames at the main
            job's budget (the denoiser then learns to distrust the maps).
        rollout_loss: also train on the error of the whole rollout from the first frame (the
            one-step error alone lets small velocity errors after a bounce compound).
        lr_scale: the learning rate of the dynamics as a multiple of ``model.lr`` (declared in
            :meth:`param_groups`): the dynamics are a small regression that the denoiser's step
            size leaves far from fit at the main job's budget.
        shapes: render each object as its class's silhouette (``circle``, ``square``,
            ``triangle``, ``diamond``: the synthetic world's shapes, as it draws them) instead
            of a disc of its size; an object without a class is a disc.
        correction: what the learned part of a step is (with ``prior``): ``additive`` (a
            position and velocity offset: a smooth net rounds every bounce off, so over a long
            rollout the objects slow down) or ``reflect`` (a bounce is a reflection: per axis a
            gate ``f`` flips the velocity, ``v' = v (1 - 2f)``, and a learned offset moves the
            position back inside; ``f`` is soft in training and 0 or 1 when sampling, so speed is
            kept exactly over any length; ``benchmarks/world_rollout.py`` measures both).
    """

    channels = 5
    state_dim = 6  # x, y, vx, vy, size, gravity (normalized)

    needs = ("state",)

    def __init__(self, hidden: int = 128, aux_weight: float = 1.0, softness: float = 0.5, scale: float = 1.0,
                 input_maps: bool = False, shapes: bool = False, prior: bool = True, rollout_loss: bool = True,
                 lr_scale: float = 6.0, correction: Literal["additive", "reflect"] = "additive") -> None:
        super().__init__(scale, input_maps)
        if correction not in ("additive", "reflect") or (correction == "reflect" and not prior):
            raise TcplugError(f"physics_state correction {correction!r}: use additive, or reflect (with prior: true)")
        self.correction = correction
        self.aux_weight, self.softness, self.shapes, self.prior = aux_weight, softness, shapes, prior
        self.rollout_loss = rollout_loss
        self.aux_name = "dynamics"
        # ReLU: a bounce is a kink (a reflection), which piecewise-linear units draw exactly
        self.dynamics = nn.Sequential(nn.Linear(self.state_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                      nn.ReLU(), nn.Linear(hidden, 4))
        self.lr_scale = lr_scale
        if prior:  # the correction starts at zero: free flight from the first step
            nn.init.zeros_(self.dynamics[-1].weight)
            nn.init.zeros_(self.dynamics[-1].bias)
            if correction == "reflect":  # the flip gates start closed
                nn.init.constant_(self.dynamics[-1].bias[2:], -4.0)

    # state.json -> tensors
    @staticmethod
    def parse(states: list[dict[str, Any]], frames: int | None = None, device=None) -> dict[str, Tensor]:
        """Batch the ``state.json`` dicts: ``pos``/``vel`` ``(B, T, K, 2)`` (pixels), ``size``,
        ``depth``, ``present``, ``shape`` (index into :data:`SHAPES`; a disc without a class)
        ``(B, K)``, ``colour`` ``(B, K, 3)`` in [0, 1], ``gravity``
        ``(B,)``, ``world`` (frame size in pixels, ``(B,)``). ``T`` is the number of frames
        given (1 for an initial state), cut to ``frames``."""
        if isinstance(states, dict):
            states = [states]
        try:
            k = max(len(s["objects"]) for s in states)
            t = min(len(s["position"]) for s in states)
        except (KeyError, TypeError) as exc:
            raise TcplugError(f"physics_state: a state needs 'objects' and 'position' (got {exc!r})") from None
        t = min(t, frames) if frames else t
        b = len(states)
        out = {"pos": torch.zeros(b, t, k, 2), "vel": torch.zeros(b, t, k, 2), "size": torch.zeros(b, k),
               "depth": torch.ones(b, k), "colour": torch.zeros(b, k, 3), "present": torch.zeros(b, k),
               "shape": torch.zeros(b, k, dtype=torch.long),
               "gravity": torch.zeros(b), "world": torch.zeros(b), "frame": torch.zeros(b)}
        for i, s in enumerate(states):
            n = len(s["objects"])
            out["pos"][i, :, :n] = torch.tensor(s["position"], dtype=torch.float32)[:t]
            vel = s.get("velocity") or [[[0, 0]] * n] * t
            out["vel"][i, :, :n] = torch.tensor(vel, dtype=torch.float32)[:t]
            units = float(s.get("canvas", s.get("size", 32))) / float(s.get("size", 32))  # world units a frame pixel
            for j, o in enumerate(s["objects"]):
                out["size"][i, j] = float(o["size"]) * units
                out["depth"][i, j] = float(o.get("depth", 0.5))
                out["colour"][i, j] = torch.tensor(o.get("colour", [255, 255, 255]), dtype=torch.float32) / 255
                kind = o.get("class", "circle")
                if kind not in SHAPES:
                    raise TcplugError(f"physics_state: object class {kind!r} is not one of {SHAPES}")
                out["shape"][i, j] = SHAPES.index(kind)
                out["present"][i, j] = 1
            out["gravity"][i] = float(s.get("gravity", 0))
            out["world"][i] = float(s.get("canvas", s.get("size", 32)))
            out["frame"][i] = float(s.get("size", 32))
        return {key: v.to(device) for key, v in out.items()}

    @staticmethod
    def cameras(states: list[dict[str, Any]], frames: int, device=None, clips: int | None = None) -> dict[str, Tensor]:
        """Each video frame's world time and camera, ``(B, frames)``: ``time`` (long), ``scale``
        (world units per frame pixel) and ``offset`` ``(B, frames, 2)`` (the view's corner in world
        units). A one-camera state: ``time = frame``, scale 1, offset 0; a multi-shot state
        (``shots``: each shot's ``start``, ``frames``, camera ``scale`` and ``offset`` and world
        ``time`` of its first frame, :mod:`tcplug.data.shots`) its shots, the last one running on
        past its frames. One state for ``clips`` clips is repeated for each."""
        if isinstance(states, dict):
            states = [states]
        if clips is not None and len(states) == 1:
            states = list(states) * clips
        b = len(states)
        out = {"time": torch.arange(frames).repeat(b, 1), "scale": torch.ones(b, frames),
               "offset": torch.zeros(b, frames, 2)}
        for i, s in enumerate(states):
            for _, shot, start, stop in shot_spans(s, frames):
                out["time"][i, start:stop] = int(shot["time"]) + torch.arange(stop - start)
                out["scale"][i, start:stop] = float(shot["scale"])
                out["offset"][i, start:stop] = torch.tensor([float(v) for v in shot["offset"]])
        return {key: v.to(device) for key, v in out.items()}

    def _vector(self, pos: Tensor, vel: Tensor, st: dict[str, Tensor]) -> Tensor:
        """Normalized dynamics input ``(B, K, 6)`` from pixel positions/velocities ``(B, K, 2)``."""
        s = st["world"].view(-1, 1, 1)
        size = (st["size"] / st["world"][:, None])[..., None]
        grav = (st["gravity"] / st["world"]).view(-1, 1, 1).expand_as(size)
        return torch.cat([pos / s * 2 - 1, vel / s * 8, size * 4, grav * 8], -1)

    def step(self, pos: Tensor, vel: Tensor, st: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """One step: ``(pos, vel)`` ``(B, K, 2)`` in pixels -> the next frame's.

        Free flight (``vel += (0, gravity)``, then ``pos += vel``, semi-implicit Euler) plus
        the learned correction, which starts at zero and learns what free flight misses (the
        bounces off the walls); see ``prior`` and ``correction``."""
        s = st["world"].view(-1, 1, 1)
        delta = self.dynamics(self._vector(pos, vel, st).to(self.dynamics[0].weight))
        if self.prior:
            g = torch.zeros_like(vel)
            g[..., 1] = st["gravity"].view(-1, 1)
            vel = vel + g
            pos = pos + vel
        if self.correction == "reflect":  # per axis: flip the velocity (a bounce) or keep it
            flip = torch.sigmoid(delta[..., 2:].float())
            if not torch.is_grad_enabled():
                flip = (flip > 0.5).float()
            return pos + flip * delta[..., :2].float() * s / 2, vel * (1 - 2 * flip)
        return pos + delta[..., :2].float() * s / 2, vel + delta[..., 2:].float() * s / 8

    def rollout(self, st: dict[str, Tensor], frames: int) -> tuple[Tensor, Tensor]:
        """Positions and velocities ``(B, frames, K, 2)`` rolled out from frame 0."""
        pos, vel = st["pos"][:, 0], st["vel"][:, 0]
        ps, vs = [pos], [vel]
        for _ in range(frames - 1):
            pos, vel = self.step(pos, vel, st)
            ps.append(pos)
            vs.append(vel)
        return torch.stack(ps, 1), torch.stack(vs, 1)

    def render(self, pos: Tensor, st: dict[str, Tensor], height: int, width: int,
               cams: dict[str, Tensor] | None = None) -> Tensor:
        """Soft discs (or silhouettes) ``(B, T, 5, H, W)``: occupancy, depth, RGB; near objects over
        far ones; world positions ``pos`` ``(B, T, K, 2)`` seen through each frame's camera
        (:meth:`cameras`; None: the whole world, one camera)."""
        b, t, k, _ = pos.shape
        frame = st.get("frame", st["world"])  # the frame size (a state without one: the world's)
        if cams is None:
            cams = {"scale": st["world"].view(b, 1).expand(b, t) / frame.view(b, 1),
                    "offset": torch.zeros(b, t, 2, device=pos.device)}
        view = cams["scale"].to(pos).view(b, t, 1)  # world units per frame pixel
        scale_x, scale_y = width / frame.view(b, 1, 1) / view, height / frame.view(b, 1, 1) / view
        ys = torch.arange(height, device=pos.device, dtype=torch.float32).view(1, 1, 1, height, 1)
        xs = torch.arange(width, device=pos.device, dtype=torch.float32).view(1, 1, 1, 1, width)
        off = cams["offset"].to(pos).view(b, t, 1, 2)
        cx = ((pos[..., 0] - off[..., 0]) * scale_x)[..., None, None]
        cy = ((pos[..., 1] - off[..., 1]) * scale_y)[..., None, None]
        r = (st["size"].view(b, 1, k) * scale_x)[..., None, None]  # (B, T, K, 1, 1)
        dx, dy = xs - cx, ys - cy
        margin = r - (dx**2 + dy**2).sqrt()  # > 0 inside, in pixels
        if self.shapes:  # each class as the synthetic world draws it (edge pixels inclusive)
            square = r - torch.maximum(dx.abs(), dy.abs())
            triangle = torch.minimum(torch.minimum(r - dy, dy + r), (dy + r) / 2 - dx.abs())
            diamond = 1.3 * r - (dx.abs() + dy.abs())
            kind = st["shape"].view(b, 1, k, 1, 1)
            margin = torch.where(kind == 1, square, torch.where(kind == 2, triangle,
                                 torch.where(kind == 3, diamond, margin))) + 0.5
        occ = torch.sigmoid(margin / self.softness) * st["present"].view(b, 1, k, 1, 1)  # (B, T, K, H, W)
        canvas = torch.zeros(b, t, 5, height, width, device=pos.device)
        canvas[:, :, 1] = 1  # background depth
        rows = torch.arange(b, device=pos.device)
        for j in st["depth"].argsort(dim=1, descending=True).unbind(1):  # far to near, per clip
            a = occ[rows, :, j].unsqueeze(2)  # (B, T, 1, H, W)
            value = torch.cat([torch.ones(b, 1, device=pos.device), st["depth"][rows, j, None], st["colour"][rows, j]],
                              1).view(b, 1, 5, 1, 1)
            canvas = canvas * (1 - a) + value * a
        return canvas * 2 - 1

    def initial_state(self, batch: dict[str, Any], latent_shape: tuple[int, ...]) -> tuple[dict[str, Tensor], int, int]:
        """The state to roll out (in :meth:`parse`'s layout, one row per clip) and the frame size
        ``(height, width)`` to render at."""
        b = latent_shape[0]
        st = self.parse(_need(batch, "state", "physics_state"), device=self.dynamics[0].weight.device)
        if st["pos"].shape[0] == 1 and b > 1:
            st = {k: v.expand(b, *v.shape[1:]) for k, v in st.items()}
        if batch.get("video") is not None:
            height, width = batch["video"].shape[-2:]
        else:  # at sampling the module passes the requested frame size
            height, width = batch.get("frame_size") or (int(st["frame"][0]), int(st["frame"][0]))
        return st, int(height), int(width)

    def maps(self, batch: dict[str, Any], latent_shape: tuple[int, ...]) -> Tensor:
        # pixel frames: the clip's, or what the sampler asks for (a latent design may compress time)
        t = batch["video"].shape[1] if batch.get("video") is not None else batch.get("num_frames") or latent_shape[1]
        with torch.no_grad():
            st, height, width = self.initial_state(batch, latent_shape)
            cams = self.cameras(batch.get("state") or [{}], t, st["pos"].device, clips=st["pos"].shape[0])
            pos = self.seen(self.rollout(st, int(cams["time"].max()) + 1)[0], cams["time"])
        return self.render(pos, st, height, width, cams)

    @staticmethod
    def seen(world: Tensor, time: Tensor) -> Tensor:
        """The rollout ``(B, T_world, K, 2)`` at each video frame's world time ``(B, T)``: the world
        runs on between shots (a cut may jump forward), its state carried across cuts."""
        return torch.gather(world, 1, time.long().view(*time.shape, 1, 1).expand(-1, -1, *world.shape[2:]))

    @torch.no_grad()
    def stream_maps(self, batch: dict[str, Any], frames: range, latent_shape: tuple[int, ...],
                    state: dict[str, Any]) -> Tensor:
        """The rollout continued chunk by chunk: ``state`` holds the object state of the next
        frame, so the maps of frames ``frames`` cost the same whatever the video's length, and
        equal :meth:`maps` of the whole video cut to them."""
        if not state:
            st, height, width = self.initial_state(batch, latent_shape)
            state.update(st=st, size=(height, width), pos=st["pos"][:, 0], vel=st["vel"][:, 0], frame=0,
                         traj={0: st["pos"][:, 0]}, world=0)
        st, pos, vel = state["st"], state["pos"], state["vel"]
        if frames.start != state["frame"]:
            raise TcplugError(f"{type(self).__name__}: streamed chunks must follow each other (frame "
                              f"{state['frame']} next, asked for {frames.start})")
        b = st["pos"].shape[0]
        cams = {k: v[:, frames.start:] for k, v in
                self.cameras(batch.get("state") or [{}], frames.stop, st["pos"].device, clips=b).items()}
        time, traj = cams["time"], state["traj"]  # traj: world time -> positions (B, K, 2), from the first needed
        while state["world"] < int(time.max()):  # the world runs on between the frames seen (and across cuts)
            pos, vel = self.step(pos, vel, st)
            state["world"] += 1
            traj[state["world"]] = pos
        out = torch.stack([torch.stack([traj[int(w)][i] for w in time[i]]) for i in range(b)])  # (B, T, K, 2)
        for w in [w for w in traj if w < int(time[:, -1].min())]:  # later chunks need no earlier time
            del traj[w]
        state.update(pos=pos, vel=vel, frame=frames.stop)
        return self.render(out, st, *state["size"], cams)

    def param_groups(self) -> list[dict[str, Any]]:
        """The dynamics train at ``lr * lr_scale`` in a parameter group of their own."""
        if self.lr_scale == 1:
            return []
        return [{"params": list(self.dynamics.parameters()), "lr_scale": self.lr_scale}]

    def auxiliary_loss(self, batch: dict[str, Any]) -> Tensor:
        """Prediction error of the dynamics on the true trajectory (normalized units): of one
        step from every true frame, plus (``rollout_loss``) of the whole rollout from the first
        frame, which is what the maps are rendered from."""
        states = _need(batch, "state", "physics_state")
        st = self.parse(states, device=self.dynamics[0].weight.device)
        if st["pos"].shape[1] < 2:
            return self.dynamics[0].weight.sum() * 0
        t = st["pos"].shape[1] - 1
        time = self.cameras(states, t + 1, device=st["pos"].device)["time"]  # (B, T): a cut may jump on
        one = (time[:, 1:] == time[:, :-1] + 1).flatten()  # pairs one world step apart (within a shot)
        rep = {k: v.repeat_interleave(t, 0) for k, v in st.items() if k != "pos" and k != "vel"}
        true_pos, true_vel = st["pos"][:, 1:].flatten(0, 1), st["vel"][:, 1:].flatten(0, 1)
        p1, v1 = self.step(st["pos"][:, :-1].flatten(0, 1)[one], st["vel"][:, :-1].flatten(0, 1)[one],
                           {k: v[one] for k, v in rep.items()})
        loss = self._error(p1, v1, true_pos[one], true_vel[one], {k: v[one] for k, v in rep.items()})
        if self.rollout_loss:
            p, v = self.rollout(st, int(time.max()) + 1)
            p, v = self.seen(p, time), self.seen(v, time)
            loss = loss + self._error(p[:, 1:].flatten(0, 1), v[:, 1:].flatten(0, 1), true_pos, true_vel, rep)
        return loss

    @staticmethod
    def _error(pos: Tensor, vel: Tensor, true_pos: Tensor, true_vel: Tensor, st: dict[str, Tensor]) -> Tensor:
        """Mean squared normalized error of positions and velocities ``(N, K, 2)`` over present objects."""
        s = st["world"].view(-1, 1, 1)
        err = ((pos - true_pos) / s * 2) ** 2 + ((vel - true_vel) / s * 8) ** 2
        mask = st["present"][..., None]
        return (err * mask).sum() / (mask.sum() * 2).clamp_min(1)


# ----- captions ------------------------------------------------------------------------------
def hash_tokenize(texts: list[str], vocab: int, max_length: int) -> tuple[Tensor, Tensor]:
    """Word-level hashing tokenizer: ids ``(B, L)`` (0 = padding, 1 = start) and mask ``(B, L)``.

    Every sequence starts with the start token, so the empty caption is one valid token.
    Deterministic across processes (crc32, not Python's salted ``hash``).
    """
    rows = []
    for text in texts:
        words = re.findall(r"[a-z0-9]+", str(text).lower())[: max_length - 1]
        rows.append([1] + [2 + zlib.crc32(w.encode()) % (vocab - 2) for w in words])
    length = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    return ids, ids != 0


class Caption(WorldConditioner):
    """The clip's caption (batch key ``txt``) through cross-attention in every backbone block.

    By default a small trainable text encoder (hashed words, a 2-layer transformer); with
    ``pretrained`` a local transformers text encoder (frozen), loaded only from the path given.
    Captions are dropped (replaced by the empty caption) with probability ``dropout`` in
    training, which is what makes classifier-free guidance possible at sampling
    (``model.guidance_scale``).

    Context keys: ``text`` ``(B, L, token_dim)``, ``text_mask`` ``(B, L)``; with ``per_shot``
    ``text_mask`` is ``(B, T', L)``: which caption tokens each latent frame sees.

    **Per-shot captions** (``per_shot: true``, HoloCine's per-shot prompts): a video of several
    shots has a caption for the whole video (``txt``) and one per shot (the state's
    ``shots[k]["caption"]``, :mod:`tcplug.data.shots`). They are encoded separately and
    concatenated into one text sequence, and each frame's tokens attend to the video's caption and
    to its own shot's only (the mask); a clip without shots sees its caption alone. The backbone
    must take a per-frame ``text_mask`` (``dit`` does).

    Args:
        width: width of the small encoder.
        layers: transformer layers of the small encoder.
        heads: attention heads of the small encoder.
        vocab: hash buckets of the small tokenizer.
        max_length: tokens per caption (longer captions are cut).
        dropout: caption dropout probability in training.
        pretrained: local directory of a transformers text encoder and its tokenizer
            (``save_pretrained`` output); never downloaded.
        per_shot: also each shot's own caption, seen by that shot's frames only (above).
    """

    needs = ("txt",)

    def __init__(self, width: int = 128, layers: int = 2, heads: int = 4, vocab: int = 4096, max_length: int = 32,
                 dropout: float = 0.1, pretrained: str | None = None, per_shot: bool = False) -> None:
        super().__init__()
        if not 0 <= dropout < 1:
            raise TcplugError(f"caption dropout must be in [0, 1), got {dropout}")
        self.per_shot = per_shot
        if per_shot:
            self.needs = ("txt", "state")
        self.vocab, self.max_length, self.dropout, self.pretrained = vocab, max_length, dropout, pretrained
        self.tokenizer = None
        if pretrained is None:
            self.embed = nn.Embedding(vocab, width)
            self.pos = nn.Parameter(torch.zeros(max_length, width))
            nn.init.normal_(self.pos, std=0.02)
            layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.out_width = width
        else:
            self.encoder = self._load_pretrained(pretrained)
            self.out_width = int(self.encoder.config.hidden_size if hasattr(self.encoder.config, "hidden_size")
                                 else self.encoder.config.d_model)
        self.proj: nn.Linear | None = None

    def _load_pretrained(self, path: str) -> nn.Module:
        from pathlib import Path

        if not Path(path).is_dir():
            raise TcplugError(f"caption pretrained={path!r} is not a local directory (weights are never downloaded)")
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError:
            raise TcplugError("caption pretrained= needs the transformers package (pip install transformers)") from None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModel.from_pretrained(path, local_files_only=True)
        except Exception as exc:
            raise TcplugError(f"cannot load a text encoder from {path}: {type(exc).__name__}: {exc}") from None
        if getattr(model.config, "is_encoder_decoder", False):
            model = model.get_encoder()
        model.requires_grad_(False)
        return model.eval()

    def __getstate__(self):  # a tokenizer may hold unpicklable rust objects: reload it instead
        state = self.__dict__.copy()
        state["tokenizer"] = None
        return state

    def setup(self, backbone: Backbone) -> None:
        backbone.add_cross_attention()
        if self.proj is None:
            self.proj = nn.Linear(self.out_width, backbone.token_dim)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.pretrained is not None:
            self.encoder.eval()  # frozen
        return self

    def encode(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Captions -> ``(text (B, L, token_dim), mask (B, L))``."""
        if self.proj is None:
            raise TcplugError("Caption.setup(backbone) was not called")
        device = self.proj.weight.device
        if self.pretrained is None:
            ids, mask = hash_tokenize(texts, self.vocab, self.max_length)
            ids, mask = ids.to(device), mask.to(device)
            h = self.embed(ids) + self.pos[: ids.shape[1]]
            h = self.encoder(h, src_key_padding_mask=~mask)
        else:
            if self.tokenizer is None:
                from transformers import AutoTokenizer

                self.tokenizer = AutoTokenizer.from_pretrained(self.pretrained, local_files_only=True)
            tok = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(device)
            mask = tok["attention_mask"].bool()
            with torch.no_grad():
                h = self.encoder(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state
            if not bool(mask.any(1).all()):
                mask[:, 0] = True
        return self.proj(h.to(self.proj.weight.dtype)), mask

    def forward(self, batch: dict[str, Any], latent_shape: tuple[int, ...]) -> dict[str, Any]:
        b = latent_shape[0]
        texts = _need(batch, "txt", "caption")
        texts = [texts] if isinstance(texts, str) else list(texts)
        if len(texts) == 1 and b > 1:
            texts = texts * b
        if len(texts) != b:
            raise TcplugError(f"caption conditioner got {len(texts)} captions for {b} clips")
        drop = [False] * b
        if self.training and self.dropout > 0:
            drop = (torch.rand(b) < self.dropout).tolist()
            texts = ["" if d else s for s, d in zip(texts, drop)]
        if self.per_shot:
            return self.shot_context(texts, batch, latent_shape, drop)
        text, mask = self.encode(texts)
        return {"text": text, "text_mask": mask}

    def shot_context(self, texts: list[str], batch: dict[str, Any], latent_shape: tuple[int, ...],
                     drop: list[bool]) -> dict[str, Any]:
        """The video's caption and each shot's, as one sequence ``(B, (1 + S) L, D)`` with the
        per-frame mask ``(B, T', (1 + S) L)`` (frame of shot ``k``: segments 0 and ``1 + k``)."""
        b, t_lat = latent_shape[0], latent_shape[1]
        states = _need(batch, "state", "caption (per_shot)")
        states = [states] * b if isinstance(states, dict) else list(states)
        if len(states) == 1 and b > 1:
            states = states * b
        frames = batch["video"].shape[1] if batch.get("video") is not None else batch.get("num_frames") or t_lat
        per, n = shot_captions(states, drop)
        text, mask = self.encode(list(texts) + [c for row in per for c in row])  # (B + B n, L, D)
        length = text.shape[1]
        text = torch.cat([text[:b, None], text[b:].view(b, n, length, -1)], 1).flatten(1, 2)  # (B, (1+n) L, D)
        tokens = torch.cat([mask[:b, None], mask[b:].view(b, n, length)], 1)  # (B, 1+n, L)
        return {"text": text, "text_mask": shot_text_mask(states, frames, t_lat, tokens)}  # (B, T', (1+n) L)

    def stream_context(self, batch: dict[str, Any], latent_shape: tuple[int, ...], start: int,
                       state: dict[str, Any]) -> dict[str, Any]:
        """The caption, encoded once for the whole streamed video."""
        if self.per_shot:
            raise TcplugError("caption: per-shot captions are sampled all at once, not streamed")
        if "context" not in state:
            state["context"] = self(batch, latent_shape)
        return state["context"]

    def null_context(self, context: dict[str, Any]) -> dict[str, Any]:
        """The same context with the empty caption (the unconditional branch of guidance)."""
        b = context["text"].shape[0]
        text, mask = self.encode([""] * b)
        return {**context, "text": text, "text_mask": mask}


@hookimpl
def tcplug_register_components(register):
    register(Depth, name="depth")
    register(Skeleton, name="skeleton")
    register(PhysicsState, name="physics_state")
    from tcplug_conditioners.pixel_state import PixelState  # needs this module's PhysicsState

    register(PixelState, name="pixel_state")
    register(Caption, name="caption")
