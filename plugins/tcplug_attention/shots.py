"""Shot-aware attention: dense within a shot, sparse to other shots' keyframes.

A video of several shots (a wide shot, a close-up, ...) must keep its objects across cuts, which
frame-to-frame propagation cannot give; attending densely to every frame of every shot
(``full3d``) is quadratic in the whole video and lets a shot copy its neighbours' framing. This
variant follows HoloCine and Long Context Tuning: the queries of frame ``n`` (in shot ``s``) see

- every frame of shot ``s`` (frames ``<= n`` of it when ``causal``), and
- the **keyframes** of the other shots: each shot's first frame, or its frames at
  ``keyframe_stride`` from its first; earlier shots only, unless ``later`` (then every other shot's
  keyframes, as when all shots are generated together).

**Shot-aware positions** (``positions: true``): a rotary phase of the *shot index* is applied to the
queries and keys over the whole head dimension, after the model's own rotary embedding. Within a
shot the phases cancel (``q`` and ``k`` turn by the same angle), so a shot's own attention is the
model's unchanged; across shots the scores depend on how many shots apart the frames are, as with
LCT's interleaved shot positions, in any family (the variant sees only ``q, k, v``).

Shots are fixed in frames *as the attention sees them* (latent frames: with a VAE that compresses
time 4x, a 33-frame shot is 9 latent frames): ``shot_frames`` is one length for every shot, or a
list of lengths (its last entry repeats past the list). Frame ``n``'s shot comes from its absolute
index, so the rule is the same whether a clip is attended all at once or from a subset of its
frames (``kv_index``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tcplug import TcplugError

from . import FrameRule, rope


class ShotAttention(FrameRule):
    """Dense attention within a shot, sparse to other shots' keyframes, shot-aware positions.

    Shapes as every variant: ``q, k, v (B, T, H, N, D)`` -> ``(B, T, H, N, D)``.

    Args:
        shot_frames: frames per shot (latent frames); a list gives each shot's length, its last
            entry repeating for the shots after it.
        keyframe_stride: an other shot's frames visible to this shot are its frames
            ``0, stride, 2*stride, ...`` (from the shot's start); ``None``: its first frame only.
        causal: within a shot, frame ``n`` sees frames ``<= n`` only (other shots' keyframes
            follow ``later``).
        later: also see *later* shots' keyframes (all shots generated jointly); with ``false`` a
            shot sees only earlier shots.
        positions: add a rotary phase of the shot index to ``q`` and ``k`` (see the module
            docstring); ``false`` keeps the model's positions only.
    """

    def __init__(self, shot_frames: int | list[int] = 8, keyframe_stride: int | None = None, causal: bool = False,
                 later: bool = False, positions: bool = True) -> None:
        super().__init__()
        lengths = [shot_frames] if isinstance(shot_frames, int) else list(shot_frames)
        if not lengths or any(int(n) < 1 for n in lengths):
            raise TcplugError(f"shot attention: shot_frames must be >= 1 (or a list of such), got {shot_frames!r}")
        if keyframe_stride is not None and keyframe_stride < 1:
            raise TcplugError(f"shot attention: keyframe_stride must be >= 1 or null, got {keyframe_stride}")
        self.lengths = [int(n) for n in lengths]
        self.keyframe_stride, self.is_causal, self.later, self.positions = keyframe_stride, causal, later, positions

    @property
    def causal(self) -> bool:  # type: ignore[override]
        # a frame sees no later frame: causal within its shot and blind to later shots
        return self.is_causal and not self.later

    def shot_of(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """``(shot, frame within its shot)`` of absolute frame indices ``index`` (any shape, long)."""
        starts = torch.tensor([0] + self.lengths[:-1], device=index.device).cumsum(0)  # the listed shots' starts
        listed = (torch.searchsorted(starts, index.reshape(-1), right=True) - 1).view(index.shape)
        tail = index - starts[-1]  # past the last listed start: shots of the last length
        last, n = self.lengths[-1], len(self.lengths)
        past = tail >= 0
        shot = torch.where(past, n - 1 + tail.clamp(min=0) // last, listed)
        within = torch.where(past, tail.clamp(min=0) % last, index - starts[listed.clamp(min=0)])
        return shot, within

    def allowed(self, qi: Tensor, ki: Tensor) -> Tensor:
        qs, qw = self.shot_of(qi)
        ks, kw = self.shot_of(ki)
        same = qs == ks
        if self.is_causal:
            same = same & (ki <= qi)
        key = kw == 0 if self.keyframe_stride is None else kw % self.keyframe_stride == 0
        other = key & ((ks < qs) | ((ks > qs) & self.later))
        return same | other

    def general(self, q: Tensor, k: Tensor, v: Tensor, kv_index: Tensor) -> Tensor:
        if self.positions:
            tk, tq = k.shape[1], q.shape[1]
            shots = self.shot_of(kv_index)[0]

            def turn(x: Tensor, pos: Tensor) -> Tensor:  # (B, T, H, N, D): a phase per frame's shot
                return rope(x.permute(0, 2, 3, 1, 4), pos).permute(0, 3, 1, 2, 4)

            q, k = turn(q, shots[tk - tq:]), turn(k, shots)
        return super().general(q, k, v, kv_index)

    def memory(self):
        raise NotImplementedError("shot attention does not stream (earlier shots' keyframes lie outside a frame "
                                  "window); sample the shots together or keyframes first")


__all__ = ["ShotAttention"]
