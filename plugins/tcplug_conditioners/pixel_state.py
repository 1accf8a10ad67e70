"""``pixel_state``: the world model without privilege. The object state it rolls out is *estimated
from the first frame's pixels* by a learned encoder; the simulator's true state is only its
training target, never its input.

``physics_state`` conditions on the exact initial state of the simulator (a privileged input: a
user generating a video from an image does not have it). ``pixel_state`` reads what an
image-to-video user gives, the first frame (``frames_seen: 2``: the first two, from which the
velocity is measured), and estimates each object's position, velocity, size, depth, colour and
class with a small convolutional centre detector (:class:`StateEncoder`); the dynamics and the renderer are ``physics_state``'s.
In training the encoder learns from the true state of the first frame (matched to its slots by the
permutation of lowest position error), the dynamics from the true trajectory, and the denoiser is
conditioned on maps rendered from the *estimated* state, exactly as at sampling.
:meth:`PixelState.estimate_error` is the estimate's position error in pixels, to report beside the
row that uses it.
"""

from __future__ import annotations

from itertools import permutations
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tcplug import TcplugError
from tcplug_conditioners import SHAPES, PhysicsState, _need


def _first_frames(batch: dict[str, Any], n: int) -> Tensor:
    """``(B, n, 3, H, W)`` in [-1, 1]: ``batch["first_frames"]`` (sampling) or the clip's first frames."""
    frames = batch.get("first_frames")
    if frames is None and batch.get("video") is not None:
        frames = batch["video"][:, :n]
    if frames is None:
        raise TcplugError("conditioner 'pixel_state' needs the first frame(s) of the clip: 'first_frames' "
                          "(B, n, 3, H, W) in [-1, 1] in the batch (tcplug sample --first-frame IMAGE, or --clip N)")
    if frames.dim() == 4:
        frames = frames[:, None]
    if frames.shape[1] < n:
        raise TcplugError(f"pixel_state(frames_seen={n}) needs {n} first frames, got {frames.shape[1]} "
                          "(tcplug sample --first-frame VIDEO gives a video's first two frames, --clip N a clip's)")
    return frames[:, :n].float()


def cheapest(cost: Tensor) -> tuple[int, ...]:
    """For ``cost`` ``(n, m)`` (rows to columns), a distinct column for each of the first
    ``min(n, m)`` rows, of lowest total cost (every permutation is tried: slots are few)."""
    n, m = cost.shape
    return min(permutations(range(m), min(n, m)), key=lambda p: float(sum(cost[i, s] for i, s in enumerate(p))))


class StateEncoder(nn.Module):
    """First frames ``(B, n, 3, H, W)`` -> per-slot state estimates.

    A conv trunk over the frames and two coordinate channels, and a centre heat map over its
    features and the pixels themselves (a logit per pixel that an object's centre is there). The
    slots are its ``slots`` strongest peaks, each at least ``peak_px + 1`` pixels from the
    stronger ones; a slot's position is the softmax expectation within ``peak_px`` of its peak
    (sub-pixel, and never between two objects), its presence logit the peak's, and the trunk
    features and pixels under that softmax go through an MLP to velocity (px/frame), size (px),
    depth, colour (RGB in [0, 1]) and class logits.

    With two frames the velocity is *measured*, not guessed: the same detector run on the clip
    played backwards finds frame 1's objects, each slot takes the frame-1 object nearest it in
    position and colour, and the velocity is the difference of the two positions (``pos1 - pos``).
    """

    def __init__(self, frames_seen: int, slots: int, classes: int, channels: int = 32, peak_px: int = 3) -> None:
        super().__init__()
        self.slots, self.classes, self.frames_seen, self.peak_px = slots, classes, frames_seen, peak_px
        c = channels
        self.trunk = nn.Sequential(
            nn.Conv2d(3 * frames_seen + 2, c, 3, padding=1), nn.SiLU(),
            nn.Conv2d(c, c, 3, padding=2, dilation=2), nn.SiLU(),
            nn.Conv2d(c, c, 3, padding=4, dilation=4), nn.SiLU(),
            nn.Conv2d(c, c, 3, padding=1), nn.SiLU())
        self.heat = nn.Conv2d(c + 3 * frames_seen + 2, 1, 1)
        self.head = nn.Sequential(nn.Linear(c + 3 * frames_seen + 2, 2 * c), nn.SiLU(),
                                  nn.Linear(2 * c, 2 + 1 + 1 + 3 + classes + 1))

    def locate(self, frames: Tensor) -> dict[str, Tensor]:
        """The objects of the *first* of ``frames``: the heat logits ``(B, HW)``, per slot the
        position ``(B, K, 2)`` (pixels), the presence logit ``(B, K)`` and the pooled features
        and pixels ``(B, K, C')``."""
        b, n, _, h, w = frames.shape
        ys = torch.linspace(-1, 1, h, device=frames.device).view(1, 1, h, 1).expand(b, 1, h, w)
        xs = torch.linspace(-1, 1, w, device=frames.device).view(1, 1, 1, w).expand(b, 1, h, w)
        x = torch.cat([frames.flatten(1, 2), xs, ys], 1)
        feat = torch.cat([self.trunk(x), x], 1)  # (B, C', H, W)
        logits, feat = self.heat(feat).flatten(2), feat.flatten(2)  # (B, 1, HW), (B, C', HW)
        px = torch.arange(w, device=frames.device, dtype=feat.dtype).repeat(h)
        py = torch.arange(h, device=frames.device, dtype=feat.dtype).repeat_interleave(w)
        free, windows = logits.detach()[:, 0].clone(), []
        for _ in range(self.slots):  # the strongest peak left, then suppress around it
            peak = free.argmax(-1, keepdim=True)  # (B, 1)
            near = ((px - px[peak]).abs() <= self.peak_px) & ((py - py[peak]).abs() <= self.peak_px)
            windows.append(near)
            free = free.masked_fill(near, float("-inf"))
        near = torch.stack(windows, 1)  # (B, K, HW)
        att = logits.masked_fill(~near, float("-inf")).softmax(-1)
        pos = torch.stack([(att * px).sum(-1), (att * py).sum(-1)], -1)
        return {"heat_logits": logits[:, 0], "pos": pos, "present_logit": (att * logits).sum(-1),
                "pooled": torch.einsum("bkn,bcn->bkc", att, feat)}

    def forward(self, frames: Tensor) -> dict[str, Tensor]:
        """The estimate (see the class docstring): ``pos``, ``vel`` ``(B, K, 2)``, ``size``,
        ``depth``, ``present_logit`` ``(B, K)``, ``colour`` ``(B, K, 3)``, ``class_logits``
        ``(B, K, classes)``, ``heat_logits`` ``(B, HW)`` and ``width``; with two frames also
        frame 1's ``pos1`` and ``heat1_logits``."""
        found = self.locate(frames)
        out = self.head(found["pooled"])
        k = self.classes
        res = {"pos": found["pos"], "vel": out[..., 0:2], "size": F.softplus(out[..., 2]) + 1.0,
               "depth": torch.sigmoid(out[..., 3]), "colour": torch.sigmoid(out[..., 4:7]),
               "class_logits": out[..., 7:7 + k], "present_logit": found["present_logit"],
               "heat_logits": found["heat_logits"], "width": frames.shape[-1]}
        if self.frames_seen == 2:
            later = self.locate(frames.flip(1))
            rgb = slice(-5, -2)  # the pooled pixels of the *other* frame under the slot (objects move less than their size)
            cost = (found["pos"][:, :, None] - later["pos"][:, None]).norm(dim=-1) \
                + (found["pooled"][:, :, None, rgb] - later["pooled"][:, None, :, rgb]).abs().sum(-1) * frames.shape[-1] / 4
            order = torch.stack([torch.tensor(cheapest(c)) for c in cost.detach().cpu()]).to(frames.device)  # (B, K)
            res["pos1"] = later["pos"].gather(1, order[..., None].expand(-1, -1, 2))
            res["vel"] = res["pos1"] - res["pos"]
            res["heat1_logits"] = later["heat_logits"]
        return res


class PixelState(PhysicsState):
    """The ``physics_state`` world model, fed with an object state estimated from the first
    frame's pixels (see the module docstring). Reads ``first_frames`` at sampling, never the
    simulator's state; the true ``state`` is a training target only.

    Args:
        frames_seen: first frames the estimator reads: 1 (image-to-video; velocity is then a
            guess from appearance alone) or 2 (a continuation: the velocity is measured, the
            displacement of each object from frame 0 to frame 1).
        slots: objects the estimator can report (absent ones are predicted absent).
        estimator_channels: width of the estimator's conv trunk.
        estimator_weight: weight of the estimation loss in the training objective.
        teacher_prob: in training only, the share of batches whose maps are rendered from the
            *true* state instead of the estimate (teacher forcing). While the estimator is still
            poor, maps from its estimates teach the denoiser that maps are unreliable, and it
            learns to ignore them; batches with true maps keep it following them. Sampling never
            reads the true state (the row's label stays "first-frame pixels").
        Other arguments as ``physics_state``.
    """

    needs = ("first_frames",)

    def __init__(self, frames_seen: int = 1, slots: int = 2, estimator_channels: int = 32,
                 estimator_weight: float = 1.0, teacher_prob: float = 0.0, hidden: int = 128, aux_weight: float = 1.0,
                 softness: float = 0.5, scale: float = 1.0, input_maps: bool = False, shapes: bool = False,
                 prior: bool = True, rollout_loss: bool = True, lr_scale: float = 6.0) -> None:
        super().__init__(hidden, aux_weight, softness, scale, input_maps, shapes, prior, rollout_loss, lr_scale)
        if frames_seen not in (1, 2):
            raise TcplugError(f"pixel_state: frames_seen must be 1 or 2, got {frames_seen}")
        if slots < 1:
            raise TcplugError(f"pixel_state: slots must be >= 1, got {slots}")
        if not 0.0 <= teacher_prob <= 1.0:
            raise TcplugError(f"pixel_state: teacher_prob is a probability in [0, 1], got {teacher_prob}")
        self.frames_seen, self.slots, self.estimator_weight = frames_seen, slots, estimator_weight
        self.teacher_prob = teacher_prob
        self.estimator = StateEncoder(frames_seen, slots, len(SHAPES), estimator_channels)

    def estimate(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """The estimated initial state, in :meth:`parse`'s layout (``pos``/``vel`` ``(B, 1, K, 2)``)."""
        frames = _first_frames(batch, self.frames_seen).to(self.estimator.heat.weight)
        e = self.estimator((frames + 1) / 2)
        b, _, _, h, w = frames.shape
        return {"pos": e["pos"][:, None].float(), "vel": e["vel"][:, None].float(), "size": e["size"].float(),
                "depth": e["depth"].float(), "colour": e["colour"].float(),
                "present": (e["present_logit"] > 0).float(), "shape": e["class_logits"].argmax(-1),
                "gravity": torch.zeros(b, device=frames.device), "world": torch.full((b,), float(w),
                                                                                      device=frames.device)}

    def initial_state(self, batch: dict[str, Any], latent_shape: tuple[int, ...]) -> tuple[dict[str, Tensor], int, int]:
        """The state estimated from the first frames, and the frame size to render at (in training,
        on a ``teacher_prob`` share of batches, the true state: teacher forcing)."""
        if self.training and self.teacher_prob > 0 and batch.get("state") is not None \
                and float(torch.rand(())) < self.teacher_prob:
            return super().initial_state(batch, latent_shape)
        with torch.no_grad():
            st = self.estimate(batch)
        height, width = (batch["video"].shape[-2:] if batch.get("video") is not None
                         else batch.get("frame_size") or _first_frames(batch, self.frames_seen).shape[-2:])
        return st, int(height), int(width)

    def param_groups(self) -> list[dict[str, Any]]:
        """The dynamics and the estimator train at ``lr * lr_scale`` in a group of their own."""
        if self.lr_scale == 1:
            return []
        return [{"params": [*self.dynamics.parameters(), *self.estimator.parameters()], "lr_scale": self.lr_scale}]

    def _matched(self, batch: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        """Estimator outputs, the true first-frame state, and per clip the slot of each true
        object ``(B, K_true)`` (the permutation of lowest position error; -1: no slot)."""
        st = self.parse(_need(batch, "state", "pixel_state"), device=self.estimator.heat.weight.device)
        frames = _first_frames(batch, self.frames_seen).to(self.estimator.heat.weight)
        e = self.estimator((frames + 1) / 2)
        b, k_true = st["present"].shape
        assign = torch.full((b, k_true), -1, dtype=torch.long, device=frames.device)
        with torch.no_grad():
            cost = (e["pos"][:, None, :, :] - st["pos"][:, 0, :, None, :]).norm(dim=-1)  # (B, Kt, S)
            for i in range(b):
                objs = [j for j in range(k_true) if st["present"][i, j] > 0]
                for j, s in zip(objs, cheapest(cost[i, objs]) if objs else ()):
                    assign[i, j] = s
        return e, st, assign

    def estimation_loss(self, batch: dict[str, Any]) -> Tensor:
        """The estimator's error against the true first-frame state (normalized units)."""
        e, st, assign = self._matched(batch)
        s = st["world"].view(-1, 1)
        present = torch.zeros_like(e["present_logit"])
        terms = []
        w = e["width"]
        h = e["heat_logits"].shape[-1] // w

        def centre(i: int, j: int, t: int) -> int:
            x, y = (st["pos"][i, t, j] * w / s[i]).round().long().tolist()
            return min(max(y, 0), h - 1) * w + min(max(x, 0), w - 1)

        def keypoint(logits: Tensor, i: int, j: int, t: int) -> Tensor:
            """The heat map as a classifier of object ``j``'s centre pixel in frame ``t``, the
            other objects' centres left out (they are peaks too)."""
            others = [centre(i, o, t) for o in range(st["present"].shape[1]) if o != j and st["present"][i, o] > 0]
            own = centre(i, j, t)
            others = [c for c in others if c != own]
            masked = logits.index_fill(0, torch.tensor(others, dtype=torch.long, device=logits.device),
                                       float("-inf")) if others else logits
            return F.cross_entropy(masked[None], torch.tensor([own], device=s.device))

        measured, tracked = "pos1" in e, "pos1" in e and st["pos"].shape[1] > 1  # (a one-frame state: no target)
        for i, j in (assign >= 0).nonzero().tolist():
            k = int(assign[i, j])
            present[i, k] = 1
            term = (keypoint(e["heat_logits"][i], i, j, 0)
                    + ((e["pos"][i, k] - st["pos"][i, 0, j]) / s[i] * 2).pow(2).sum()
                    + ((e["size"][i, k] - st["size"][i, j]) / s[i] * 4).pow(2)
                    + (e["depth"][i, k] - st["depth"][i, j]).pow(2)
                    + (e["colour"][i, k] - st["colour"][i, j]).pow(2).sum()
                    + F.cross_entropy(e["class_logits"][i, k][None], st["shape"][i, j][None]))
            if tracked:  # frame 1's position (the velocity is its difference from frame 0's)
                term = term + keypoint(e["heat1_logits"][i], i, j, 1) \
                    + ((e["pos1"][i, k] - st["pos"][i, 1, j]) / s[i] * 2).pow(2).sum()
            elif not measured:  # a guess from one frame
                term = term + ((e["vel"][i, k] - st["vel"][i, 0, j]) / s[i] * 8).pow(2).sum()
            terms.append(term)
        loss = F.binary_cross_entropy_with_logits(e["present_logit"], present)
        if terms:
            loss = loss + torch.stack(terms).mean()
        return loss

    def auxiliary_loss(self, batch: dict[str, Any]) -> Tensor:
        """The dynamics' loss (on the true trajectory, as ``physics_state``) plus the estimator's
        (times ``estimator_weight / aux_weight``, so that ``aux_weight`` scales the dynamics)."""
        loss = super().auxiliary_loss(batch)
        return loss + self.estimator_weight / max(self.aux_weight, 1e-12) * self.estimation_loss(batch)

    @torch.no_grad()
    def estimate_report(self, batch: dict[str, Any]) -> dict[str, float]:
        """Every part of the estimate against the true first-frame state, over the true objects
        matched to a slot: ``position_px``, ``velocity_px`` (px/frame), ``size_px``, ``depth``
        (absolute error), ``colour`` (mean absolute error per channel, in 0-255 levels),
        ``class_accuracy`` and, over all slots, ``presence_accuracy`` (at the sampling threshold).
        Where the state has a second frame, also ``velocity_px_straight``: the velocity error of the
        objects whose first step is not a bounce (their displacement to frame 1 is their velocity),
        and ``bounced``: the share of objects whose first step is one (two frames cannot measure
        their velocity, only their displacement)."""
        e, st, assign = self._matched(batch)
        pairs = [(i, j, int(assign[i, j])) for i, j in (assign >= 0).nonzero().tolist()]
        present = torch.zeros_like(e["present_logit"])
        for i, _, k in pairs:
            present[i, k] = 1
        out = {"presence_accuracy": float(((e["present_logit"] > 0).float() == present).float().mean())}
        if not pairs:
            return out

        def mean(f) -> float:
            return sum(float(f(i, j, k)) for i, j, k in pairs) / len(pairs)

        out.update(position_px=mean(lambda i, j, k: (e["pos"][i, k] - st["pos"][i, 0, j]).norm()),
                   velocity_px=mean(lambda i, j, k: (e["vel"][i, k] - st["vel"][i, 0, j]).norm()),
                   size_px=mean(lambda i, j, k: (e["size"][i, k] - st["size"][i, j]).abs()),
                   depth=mean(lambda i, j, k: (e["depth"][i, k] - st["depth"][i, j]).abs()),
                   colour=mean(lambda i, j, k: (e["colour"][i, k] - st["colour"][i, j]).abs().mean() * 255),
                   class_accuracy=mean(lambda i, j, k: e["class_logits"][i, k].argmax() == st["shape"][i, j]))
        if st["pos"].shape[1] > 1:
            bounce = {(i, j): bool((st["pos"][i, 1, j] - st["pos"][i, 0, j] - st["vel"][i, 0, j]).abs().max() > 1e-3)
                      for i, j, _ in pairs}
            straight = [(e["vel"][i, k] - st["vel"][i, 0, j]).norm() for i, j, k in pairs if not bounce[i, j]]
            out["bounced"] = sum(bounce.values()) / len(pairs)
            if straight:
                out["velocity_px_straight"] = float(torch.stack(straight).mean())
        return out

    @torch.no_grad()
    def estimate_error(self, batch: dict[str, Any]) -> float:
        """Mean distance in pixels between each true object's first-frame position and its
        matched slot's estimate (objects without a slot are left out): :meth:`estimate_report`'s
        ``position_px``."""
        return self.estimate_report(batch).get("position_px", float("nan"))
