"""Built-in attention variants: which frames each frame's queries see.

=================  =========================================================  ==========
name               keys/values seen by the queries of frame ``n``             causal
=================  =========================================================  ==========
``per_frame``      frame ``n`` only (no temporal mixing; the baseline)        yes
``first_frame``    frame ``0`` only (Text2Video-Zero)                         yes
``sparse_causal``  frames ``0`` and ``n-1`` (Tune-A-Video)                    yes
``cross_frame``    frames ``n-window .. n``, optionally plus frame ``0``      yes
                   (or ``sink`` frames), and pooled older frames (``history``)
``temporal``       the same token position in every frame (per-location;     option
                   rotary frame-position encoding), optionally causal/window
``full3d``         every token of every frame                                 no
``shot``           every frame of its shot, other shots' keyframes; shot      option
                   positions (:mod:`tcplug_attention.shots`)
=================  =========================================================  ==========

Shapes: ``q, k, v`` are ``(B, T, H, N, D)`` (see :class:`tcplug.AttentionVariant`). All
variants call :func:`torch.nn.functional.scaled_dot_product_attention`. In training (no
``kv_index``) the fast paths gather keys/values as strided *views* where the frames are
contiguous (``first_frame``, ``cross_frame`` without anchor, ``full3d``, ``per_frame``);
``sparse_causal`` and an anchored ``cross_frame`` gather non-contiguous frames, which copies.
With ``kv_index`` (streaming), one general masked path serves every variant: SDPA with a boolean
frame mask on CPU, and on a GPU PyTorch's ``flex_attention`` with a block-sparse mask built from
the variant's frame rule, so blocks of frames the rule hides are skipped, not computed and masked
(``FrameRule.backend``: ``auto``, ``sdpa`` or ``flex``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from tcplug import AttentionVariant, TcplugError, hookimpl

__version__ = "0.1.0"


def to_bh(x: Tensor) -> Tensor:
    """``(B, T, H, N, D)`` -> ``(B*H, T, N, D)``: a view when the heads-first layout is contiguous."""
    y = x.transpose(1, 2)
    if not y.is_contiguous():
        y = y.contiguous()
    b, h, t, n, d = y.shape
    return y.view(b * h, t, n, d)


def from_bh(y: Tensor, b: int, h: int) -> Tensor:
    """``(B*H, T, N, D)`` -> ``(B, T, H, N, D)`` (a view)."""
    bh, t, n, d = y.shape
    return y.view(b, h, t, n, d).transpose(1, 2)


_FLEX = {}


def frame_block_mask(mask: Tensor, n: int, device: torch.device | str):
    """A ``flex_attention`` ``BlockMask`` over frame-major tokens (``n`` per frame) from a frame
    visibility matrix ``mask (Tq, Tk)``: a block of tokens whose frames are all hidden is absent
    from it (never computed)."""
    from torch.nn.attention.flex_attention import create_block_mask

    mask = mask.to(device)
    tq, tk = mask.shape

    def mask_mod(bi, hi, qi, ki):
        return mask[qi // n, ki // n]

    return create_block_mask(mask_mod, None, None, tq * n, tk * n, device=device)


def flex_frames(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Attention of query frames ``q (B, Tq, H, N, D)`` to key frames ``k, v (B, Tk, H, N, D)``
    where ``mask (Tq, Tk)`` (bool) says which key frames each query frame sees, through
    ``flex_attention`` with a block-sparse mask: blocks of hidden frames are skipped. Compiled
    on a GPU; eager (a reference implementation, for checking) on a CPU."""
    b, tq, h, n, d = q.shape
    flat = [y.permute(0, 2, 1, 3, 4).reshape(b, h, -1, d) for y in (k, v)]  # frame-major tokens per head
    return _flex(q, *flat, frame_block_mask(mask, n, q.device))


def _flex(q: Tensor, k: Tensor, v: Tensor, block, score_mod=None) -> Tensor:
    """``flex_attention`` of query frames ``q (B, Tq, H, N, D)`` over key tokens ``k, v (B, H, M, D)``
    with ``block`` (a ``BlockMask``): compiled on a GPU, eager on a CPU; back to ``(B, Tq, H, N, D)``."""
    from torch.nn.attention.flex_attention import flex_attention

    b, tq, h, n, d = q.shape
    fn = flex_attention
    if q.is_cuda:
        fn = _FLEX.setdefault("compiled", torch.compile(flex_attention))
    out = fn(q.permute(0, 2, 1, 3, 4).reshape(b, h, -1, d), k, v, score_mod=score_mod, block_mask=block)
    return out.view(b, h, tq, n, d).permute(0, 2, 1, 3, 4)


def flex_biased(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """Attention of query frames ``q (B, Tq, H, N, D)`` to key tokens ``k, v (B, H, M, D)`` with an
    additive bias ``bias (Tq, M)`` per query frame (``-inf``: hidden) through ``flex_attention``:
    the bias as its ``score_mod``, blocks of hidden tokens absent from its block mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, tq, h, n, d = q.shape
    bias = bias.to(q.device)
    seen = bias > float("-inf")

    def mask_mod(bi, hi, qi, ki):
        return seen[qi // n, ki]

    def score_mod(score, bi, hi, qi, ki):
        return score + bias[qi // n, ki]

    return _flex(q, k, v, create_block_mask(mask_mod, None, None, tq * n, k.shape[2], device=q.device), score_mod)


class FrameRule(AttentionVariant):
    """Base for variants defined by a frame-visibility rule ``allowed(q_index, k_index)``.

    Subclasses implement :meth:`allowed` (a boolean ``(Tq, Tk)`` matrix from absolute frame
    indices) and may add a fast path for training. The general path (used when streaming, and
    by a subclass without a fast path) attends, for each query frame, to every token of the
    allowed key frames: through a boolean mask given to SDPA, or (:attr:`backend` ``flex``, the
    ``auto`` choice on a GPU) through ``flex_attention`` with a block-sparse mask, so hidden
    frames cost no compute.
    """

    #: ``auto`` (``flex`` on a GPU, ``sdpa`` elsewhere), ``sdpa`` or ``flex``; set on an instance
    backend: str = "auto"

    def allowed(self, q_index: Tensor, k_index: Tensor) -> Tensor:
        raise NotImplementedError

    def _use_flex(self, q: Tensor) -> bool:
        if self.backend not in ("auto", "sdpa", "flex"):
            raise TcplugError(f"{type(self).__name__}.backend must be auto, sdpa or flex, got {self.backend!r}")
        return self.backend == "flex" or (self.backend == "auto" and q.is_cuda)

    def general(self, q: Tensor, k: Tensor, v: Tensor, kv_index: Tensor) -> Tensor:
        b, tq, h, n, d = q.shape
        tk = k.shape[1]
        q_index = kv_index[tk - tq:]
        mask = self.allowed(q_index[:, None], kv_index[None, :])  # (Tq, Tk)
        if not mask.any(1).all():
            raise TcplugError(f"{type(self).__name__}: a query frame has no key frame to attend to")
        if self._use_flex(q):
            return flex_frames(q, k, v, mask)
        qb = to_bh(q)  # (BH, Tq, N, D)
        kb = to_bh(k).reshape(b * h, 1, tk * n, d).expand(b * h, tq, tk * n, d)
        vb = to_bh(v).reshape(b * h, 1, tk * n, d).expand(b * h, tq, tk * n, d)
        token_mask = mask.repeat_interleave(n, dim=1)[None, :, None, :]  # (1, Tq, 1, Tk*N)
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=token_mask)
        return from_bh(out, b, h)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, kv_index: Tensor | None = None) -> Tensor:
        if kv_index is None and q.shape[1] == k.shape[1]:
            return self.fast(q, k, v)
        if kv_index is None:
            kv_index = torch.arange(k.shape[1], device=k.device)
        return self.general(q, k, v, kv_index)

    def fast(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self.general(q, k, v, torch.arange(k.shape[1], device=k.device))


class PerFrame(FrameRule):
    """Each frame attends to its own tokens only: plain spatial self-attention (the baseline)."""

    causal = True

    def allowed(self, qi, ki):
        return ki == qi

    def fast(self, q, k, v):
        b, _, h, _, _ = q.shape
        return from_bh(F.scaled_dot_product_attention(to_bh(q), to_bh(k), to_bh(v)), b, h)

    def memory(self):
        return 0, False


class FirstFrame(FrameRule):
    """Every frame's queries see the first frame's keys/values (Text2Video-Zero).

    The fast path runs one SDPA call with all frames' queries against frame 0's keys; only
    frame 0's keys/values (``1/T`` of them) are copied, to keep SDPA on its fused kernel.
    """

    causal = True

    def allowed(self, qi, ki):
        return (ki == 0).expand(qi.shape[0], ki.shape[1])

    def fast(self, q, k, v):
        b, t, h, n, d = q.shape
        qb = to_bh(q).reshape(b * h, 1, t * n, d)
        # 4D inputs with a contiguous (tiny) first frame keep SDPA on its fused kernel
        k0, v0 = to_bh(k)[:, :1].contiguous(), to_bh(v)[:, :1].contiguous()
        out = F.scaled_dot_product_attention(qb, k0, v0)
        return from_bh(out.view(b * h, t, n, d), b, h)

    def memory(self):
        return 0, True


class SparseCausal(FrameRule):
    """Queries of frame ``n`` see frames ``0`` and ``max(n-1, 0)`` (Tune-A-Video)."""

    causal = True

    def allowed(self, qi, ki):
        return (ki == 0) | (ki == (qi - 1).clamp_min(0))

    def fast(self, q, k, v):
        b, t, h, n, d = q.shape
        former = (torch.arange(t, device=q.device) - 1).clamp_min(0)
        idx = torch.stack([torch.zeros_like(former), former], 1).flatten()  # [0, n-1] per frame
        kb = to_bh(k)[:, idx].reshape(b * h, t, 2 * n, d)
        vb = to_bh(v)[:, idx].reshape(b * h, t, 2 * n, d)
        return from_bh(F.scaled_dot_product_attention(to_bh(q), kb, vb), b, h)

    def memory(self):
        return 1, True


class CrossFrame(FrameRule):
    """Queries of frame ``n`` see a buffer of the ``window`` previous frames and frame ``n``.

    Args:
        window: previous frames in the buffer (0 = per-frame attention).
        anchor: also attend to the first frame (a fixed reference across the whole video).
        sink: also attend to the first ``sink`` frames (an attention sink, StreamingLLM-style: a
            long video keeps them in every window; ``anchor`` is ``sink: 1``).
        sink_positions: where a streamed video's sink frames sit for a family with rotary
            positions (Wan, LTX): ``absolute`` (their own positions, ever farther from the window,
            beyond any distance seen in training) or ``rolling`` (just before the window's oldest
            frame, as in a training clip; StreamingLLM's positions within the cache). ``dit``'s
            frames carry no rotary position in this variant: both are the same there.
        history: compressed history (FramePack-style): frames older than the window still seen,
            their keys/values averaged over runs of consecutive tokens. An int ``h``: the ``h``
            frames before the window, runs of ``pool`` tokens; a list ``[h1, h2, ...]``: ``h1``
            frames pooled ``pool``-fold, the ``h2`` before them ``pool**2``-fold, and so on (older
            frames compressed more). A pooled token's logit gets ``+ log(run length)``
            (proportional attention), so it weighs as the run it stands for: where a run's tokens
            are equal, compressed history is exactly the uncompressed window. Each query frame
            attends to ``(window + 1 + sink) N + sum(h_i N / pool**i)`` tokens, whatever the
            video's length; the stream keeps ``window + sum(h_i)`` frames.
        pool: the token-run length of the first history level (tokens in raster order, so ``dit``
            pools along image rows); ``>= 2``.

    Without anchor, the training fast path takes each frame's window as a strided view of
    the keys/values (frames are contiguous in the heads-first layout): no copy.
    """

    causal = True

    def __init__(self, window: int = 2, anchor: bool = False, sink: int = 0,
                 sink_positions: Literal["absolute", "rolling"] = "absolute",
                 history: int | list[int] = 0, pool: int = 2) -> None:
        super().__init__()
        if window < 0 or sink < 0:
            raise TcplugError(f"cross_frame window and sink must be >= 0, got {window} and {sink}")
        if sink_positions not in ("absolute", "rolling"):
            raise TcplugError(f"cross_frame sink_positions {sink_positions!r}: use absolute or rolling")
        levels = [history] if isinstance(history, int) else list(history)
        if any(not isinstance(h, int) or h < 0 for h in levels) or pool < 2:
            raise TcplugError(f"cross_frame history is frames >= 0 (an int or a list) and pool >= 2, "
                              f"got history {history!r}, pool {pool}")
        self.window, self.anchor, self.sink, self.sink_positions = window, anchor, sink, sink_positions
        self.history, self.pool = tuple(h for h in levels if h), pool

    @property
    def sink_frames(self) -> int:
        """Leading frames every frame sees: ``sink``, at least 1 with ``anchor``."""
        return max(self.sink, 1 if self.anchor else 0)

    def allowed(self, qi, ki):
        """Frames seen: as they are (:meth:`dense`) or pooled (:meth:`level` ``> 0``)."""
        ok = self.dense(qi, ki)
        return ok | (self.level(qi, ki) > 0) if self.history else ok

    def dense(self, qi, ki):
        """Frames seen as they are: the window, the sink."""
        ok = (ki <= qi) & (ki >= qi - self.window)
        return ok | ((ki < self.sink_frames) & (ki <= qi)) if self.sink_frames else ok

    def level(self, qi, ki):
        """Compressed-history level of key frame ``ki`` for query frame ``qi`` (``(Tq, Tk)`` ints):
        ``i >= 1`` where it is seen through level ``i``'s pooled tokens, 0 elsewhere."""
        dist = qi - ki
        out = torch.zeros(qi.shape[0], ki.shape[1], dtype=torch.long, device=ki.device)
        lo = self.window
        for i, h in enumerate(self.history, 1):
            out[(dist > lo) & (dist <= lo + h)] = i
            lo += h
        if self.sink_frames:
            out[(ki < self.sink_frames).expand_as(out)] = 0
        return out

    def general(self, q, k, v, kv_index):
        if not self.history:
            return super().general(q, k, v, kv_index)
        b, tq, h, n, d = q.shape
        tk = k.shape[1]
        q_index = kv_index[tk - tq:]
        dense = self.dense(q_index[:, None], kv_index[None, :])  # (Tq, Tk)
        level = self.level(q_index[:, None], kv_index[None, :])
        kb, vb = to_bh(k), to_bh(v)  # (BH, Tk, N, D)
        full = dense.any(0).nonzero().flatten()  # key frames some query sees as they are (not the pooled ones)
        keys, values = [kb[:, full].reshape(b * h, -1, d)], [vb[:, full].reshape(b * h, -1, d)]
        zero = torch.zeros((), dtype=q.dtype, device=q.device)
        hidden = torch.tensor(float("-inf"), dtype=q.dtype, device=q.device)
        bias = [torch.where(dense[:, full], zero, hidden).repeat_interleave(n, dim=1)]  # (Tq, F*N)
        for i in range(1, len(self.history) + 1):
            frames = (level == i).any(0).nonzero().flatten()
            if not len(frames):
                continue
            (pk, pv), runs = pool_runs([kb[:, frames], vb[:, frames]], self.pool ** i)  # (BH, F, R, D)
            keys.append(pk.reshape(b * h, -1, d))
            values.append(pv.reshape(b * h, -1, d))
            seen = (level[:, frames] == i)[:, :, None]  # (Tq, F, 1)
            bias.append(torch.where(seen, runs.log().to(q.dtype), hidden).reshape(tq, -1))
        kc, vc, mask = torch.cat(keys, 1), torch.cat(values, 1), torch.cat(bias, 1)
        m = kc.shape[1]
        if self._use_flex(q):
            return flex_biased(q, kc.view(b, h, m, d), vc.view(b, h, m, d), mask)
        out = F.scaled_dot_product_attention(to_bh(q), kc[:, None].expand(b * h, tq, m, d),
                                             vc[:, None].expand(b * h, tq, m, d), attn_mask=mask[None, :, None, :])
        return from_bh(out, b, h)

    def fast(self, q, k, v):
        if self.sink_frames > 1 or self.history:  # several sink frames, compressed history: the masked path
            return self.general(q, k, v, torch.arange(k.shape[1], device=k.device))
        b, t, h, n, d = q.shape
        w = self.window
        qb, kb, vb = to_bh(q), to_bh(k), to_bh(v)
        out = torch.empty_like(qb)
        start = w + 1 if self.anchor else w  # frames from `start` on have a full window (+ anchor)
        for f in range(min(start, t)):  # the first frames: window [0 .. f], which holds frame 0
            ks = kb[:, max(0, f - w): f + 1].reshape(b * h, -1, d)
            vs = vb[:, max(0, f - w): f + 1].reshape(b * h, -1, d)
            out[:, f] = F.scaled_dot_product_attention(qb[:, f], ks, vs)
        if t > start:
            size, stride = (b * h, t - start, (w + 1) * n, d), (t * n * d, n * d, d, 1)
            offset = (start - w) * n * d  # window of frame f: frames f-w .. f, a strided view
            kw = kb.as_strided(size, stride, kb.storage_offset() + offset)
            vw = vb.as_strided(size, stride, vb.storage_offset() + offset)
            if self.anchor:  # frame 0 is not adjacent to the window: this gathers (copies)
                kw = torch.cat([kb[:, :1].expand(b * h, t - start, n, d), kw], dim=2)
                vw = torch.cat([vb[:, :1].expand(b * h, t - start, n, d), vw], dim=2)
            out[:, start:] = F.scaled_dot_product_attention(qb[:, start:], kw, vw)
        return from_bh(out, b, h)

    def memory(self):
        return self.window + sum(self.history), self.sink_frames


def pool_runs(xs: list[Tensor], p: int) -> tuple[list[Tensor], Tensor]:
    """Each ``x (BH, F, N, D)`` averaged over runs of ``p`` consecutive tokens: ``(BH, F, ceil(N/p), D)``
    (the last run shorter when ``p`` does not divide ``N``), and the run lengths ``(ceil(N/p),)``."""
    n = xs[0].shape[2]
    r = -(-n // p)
    runs = torch.full((r,), float(p), device=xs[0].device)
    runs[-1] = n - p * (r - 1)
    out = []
    for x in xs:
        x = F.pad(x, (0, 0, 0, r * p - n))
        out.append(x.unflatten(2, (r, p)).sum(3) / runs[:, None].to(x.dtype))
    return out, runs


def rope(x: Tensor, pos: Tensor) -> Tensor:
    """Rotary position encoding over the last dim of ``x (..., T, D)`` with positions ``(T,)``."""
    d = x.shape[-1]
    half = d // 2
    if half == 0:
        return x
    freqs = 1.0 / (10000 ** (torch.arange(half, device=x.device, dtype=torch.float32) / half))
    ang = pos.float()[:, None] * freqs[None]  # (T, half)
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half: 2 * half]
    rot = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return torch.cat([rot, x[..., 2 * half:]], dim=-1) if d % 2 else rot


class Temporal(FrameRule):
    """Per-location attention across frames (AnimateDiff-style motion module).

    Each token attends to the same token position in the other frames; a rotary encoding of
    the absolute frame index tells frames apart (relative, so it extends past the training
    length). Pair it with spatial blocks (e.g. ``per_frame``) in a per-block list.

    Args:
        causal: frame ``n`` sees frames ``<= n`` only (needed for streaming).
        window: if set, only frames within ``window`` of ``n`` (before ``n`` when causal).
    """

    def __init__(self, causal: bool = False, window: int | None = None) -> None:
        super().__init__()
        if window is not None and window < 0:
            raise TcplugError(f"temporal window must be >= 0, got {window}")
        self.is_causal, self.window = causal, window

    @property
    def causal(self) -> bool:  # type: ignore[override]
        return self.is_causal

    def allowed(self, qi, ki):
        ok = torch.ones(qi.shape[0], ki.shape[1], dtype=torch.bool, device=ki.device)
        if self.is_causal:
            ok = ok & (ki <= qi)
        if self.window is not None:
            ok = ok & ((qi - ki).abs() <= self.window)
        return ok

    def general(self, q, k, v, kv_index):
        b, tq, h, n, d = q.shape
        tk = k.shape[1]
        q_index = kv_index[tk - tq:]
        mask = self.allowed(q_index[:, None], kv_index[None, :])  # (Tq, Tk)
        # per location: (B*H, N, T, D)
        qb = rope(to_bh(q).transpose(1, 2), q_index)
        kb = rope(to_bh(k).transpose(1, 2), kv_index)
        vb = to_bh(v).transpose(1, 2)
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask)
        return from_bh(out.transpose(1, 2), b, h)

    def memory(self):
        if not self.is_causal or self.window is None:
            raise NotImplementedError("temporal streams only with causal: true and a finite window")
        return self.window, False


class Full3D(FrameRule):
    """Every token attends to every token of every frame (CogVideoX/HunyuanVideo/Wan style).

    Quadratic in ``T * N``; not causal, so it cannot stream.
    """

    causal = False

    def allowed(self, qi, ki):
        return torch.ones(qi.shape[0], ki.shape[1], dtype=torch.bool, device=ki.device)

    def fast(self, q, k, v):
        b, t, h, n, d = q.shape
        flat = lambda x: to_bh(x).reshape(b * h, t * n, d)  # noqa: E731
        out = F.scaled_dot_product_attention(flat(q), flat(k), flat(v))
        return from_bh(out.view(b * h, t, n, d), b, h)


@hookimpl
def tcplug_register_components(register):
    from .shots import ShotAttention

    register(PerFrame, name="per_frame")
    register(FirstFrame, name="first_frame")
    register(SparseCausal, name="sparse_causal")
    register(CrossFrame, name="cross_frame")
    register(Temporal, name="temporal")
    register(Full3D, name="full3d")
    register(ShotAttention, name="shot")
