"""Built-in motion lockers: ``none``, ``mask``, ``auto``.

A locker returns a mask ``(B, 1, H, W)``: 1 where the scene is static. The engine reduces it
to whole backbone tokens and the sampler ties locked tokens of later frames to the anchor
frame (same noise, near-zero per-token timestep), so backgrounds stay exactly still while
dynamic tokens take the full step (LTX / Wan / Open-Sora per-token timesteps).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch.nn.functional as F
from torch import Tensor

from tcplug import MotionLocker, TcplugError, hookimpl

__version__ = "0.1.0"


def _frame_size(batch: dict[str, Any]) -> tuple[int, int, int]:
    """``(B, H, W)`` of the clips a batch describes (data video, or the sampler's request)."""
    if batch.get("video") is not None:
        b, _, _, h, w = batch["video"].shape
        return b, h, w
    if batch.get("frame_size") is not None and batch.get("num_clips") is not None:
        h, w = batch["frame_size"]
        return int(batch["num_clips"]), int(h), int(w)
    raise TcplugError("motion lock: the batch says neither the video nor the frame size")


def _dilate(moving: Tensor, pixels: int) -> Tensor:
    if pixels <= 0:
        return moving
    return F.max_pool2d(moving, 2 * pixels + 1, stride=1, padding=pixels)


class NoLock(MotionLocker):
    """Nothing is locked (the default behaviour, as a named component for ablations)."""

    def forward(self, batch: dict[str, Any], context: dict[str, Any] | None = None, preview: Any = None) -> None:
        return None


class Mask(MotionLocker):
    """A given mask (1 = locked), from one of three sources:

    - ``first_frame`` (default): what frame 0 shows as background, less a ``margin`` around
      every object there, read from the data's first-frame depth (batch key ``depth``,
      background = 1; the synthetic world carries it). It sees no later frame, so it is what a
      user could give at sampling time from a first frame.
    - ``image``: a user image (white = locked), resized to the frame size.
    - ``static``: the data's ``static`` mask, the union over **all** frames of where no
      object ever goes. **An oracle**: it encodes the clip's future motion, so a recipe using
      it is not comparable with an unconditional one (``oracle`` is True; the ablation marks it).

    Args:
        source: ``first_frame``, ``image`` or ``static``.
        image: path of a grayscale/RGB image for ``source: image`` (giving it selects that
            source); pixels brighter than ``threshold`` are locked.
        threshold: in ``[0, 1]``.
        margin: ``first_frame``: pixels kept free around each object of frame 0 (objects move
            into them).
    """

    def __init__(self, source: Literal["first_frame", "image", "static"] = "first_frame",
                 image: str | None = None, threshold: float = 0.5, margin: int = 3) -> None:
        super().__init__()
        if image is not None:
            source = "image"
        if source == "image" and image is None:
            raise TcplugError("motion lock mask(source=image) needs image=PATH")
        self.source, self.image, self.threshold, self.margin = source, image, threshold, margin
        self._cached: Tensor | None = None
        if image is not None and not Path(image).is_file():
            raise TcplugError(f"motion lock mask image {image!r} does not exist")

    @property
    def oracle(self) -> bool:
        """True when the mask is read from the clip's future (the data's all-frame static mask)."""
        return self.source == "static"

    @property
    def needs(self) -> tuple[str, ...]:
        """What the mask is read from at sampling: frame 0's depth, the static mask, or nothing
        (an image)."""
        return {"first_frame": ("depth",), "static": ("static",), "image": ()}[self.source]

    def _load(self) -> Tensor:
        if self._cached is None:
            from tcplug import read_mask

            self._cached = read_mask(self.image)
        return self._cached

    def forward(self, batch: dict[str, Any], context: dict[str, Any] | None = None, preview: Any = None) -> Tensor:
        if self.source == "image":
            b, h, w = _frame_size(batch)
            img = F.interpolate(self._load(), size=(h, w), mode="area")
            return (img >= self.threshold).float().expand(b, 1, h, w)
        if self.source == "first_frame":
            depth = batch.get("depth")
            if depth is None:
                raise TcplugError("motion lock mask(source=first_frame) needs the data's depth (batch key 'depth', "
                                  "background = 1; the synthetic world carries it): use source=image or auto")
            objects = (depth[:, 0].float() < 0.999).float()  # (B, 1, H, W): what frame 0 shows in front
            return 1 - _dilate(objects, self.margin)
        if batch.get("static") is None:
            raise TcplugError("motion lock mask(source=static) needs the data's static mask (batch key 'static'; "
                              "the synthetic world carries it), or use source=first_frame or image=PATH")
        return (batch["static"].float() >= self.threshold).float()


class Auto(MotionLocker):
    """A mask estimated from motion magnitude: what never moves is locked.

    Sources:

    - ``conditioning``: temporal change of the conditioners' maps (``context["maps"]``,
      e.g. the world model's rendered objects or depth), max over frames and channels.
    - ``flow``: the data's flow magnitude (batch key ``flow``), in pixels.
    - ``first_pass``: a cheap first sampling pass (few steps, no lock); its frame-to-frame
      change. In training, where there is no first pass, the data's static mask stands in
      (no lock if the data has none).

    Args:
        source: one of the above.
        threshold: change above which a pixel moves (maps and video in ``[-1, 1]``; flow in
            pixels).
        dilate: grow the moving region by this many pixels before locking the rest.
    """

    def __init__(self, source: Literal["conditioning", "flow", "first_pass"] = "conditioning",
                 threshold: float = 0.05, dilate: int = 1) -> None:
        super().__init__()
        self.source, self.threshold, self.dilate = source, threshold, dilate

    @property
    def needs(self) -> tuple[str, ...]:
        """The data's flow for ``source: flow``; nothing else comes from the batch."""
        return ("flow",) if self.source == "flow" else ()

    def motion(self, batch: dict[str, Any], context: dict[str, Any] | None, preview: Any) -> Tensor | None:
        """Motion magnitude ``(B, 1, H, W)`` (None: nothing to estimate it from in training)."""
        if self.source == "conditioning":
            maps = (context or {}).get("maps")
            if maps is None:
                raise TcplugError("motion lock auto(source=conditioning) needs a conditioner that renders maps "
                                  "(depth, skeleton, physics_state)")
            return (maps[:, 1:] - maps[:, :-1]).abs().amax(dim=(1, 2)).unsqueeze(1)
        if self.source == "flow":
            if batch.get("flow") is None:
                raise TcplugError("motion lock auto(source=flow) needs the data's flow (batch key 'flow')")
            return batch["flow"].float().norm(dim=2).amax(dim=1, keepdim=True)
        if preview is None:  # training: no first pass; the data's static mask stands in, if any
            if batch.get("static") is not None:
                return 1 - batch["static"].float()
            return None
        video = preview()
        return (video[:, 1:] - video[:, :-1]).abs().mean(2).amax(1, keepdim=True)

    def forward(self, batch: dict[str, Any], context: dict[str, Any] | None = None,
                preview: Any = None) -> Tensor | None:
        motion = self.motion(batch, context, preview)
        if motion is None:
            return None
        moving = (motion > self.threshold).float()
        return 1 - _dilate(moving, self.dilate)


@hookimpl
def tcplug_register_components(register):
    register(NoLock, name="none")
    register(Mask, name="mask")
    register(Auto, name="auto")
