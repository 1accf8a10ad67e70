"""Per-shot captions, shared by every text conditioner that knows shots (the ``dit``'s
``caption``, the Wan and LTX text encoders): the shots of a multi-shot state
(:mod:`tcplug.data.shots`), their captions, and which caption tokens each latent frame sees.
Light: torch is imported on first use."""

from __future__ import annotations


def shot_spans(state: dict, frames: int) -> list[tuple[int, dict, int, int]]:
    """``(k, shot, start, stop)`` of each shot of a multi-shot state (``state["shots"]``) within a
    video of ``frames`` frames, the last shot running on to the end; empty for a one-camera state."""
    out, shots = [], state.get("shots") or []
    for k, shot in enumerate(shots):
        start = int(shot["start"])
        if start >= frames:
            break
        stop = frames if k == len(shots) - 1 else min(frames, start + int(shot["frames"]))
        out.append((k, shot, start, stop))
    return out


def shot_captions(states: list[dict], drop: list[bool] | None = None) -> tuple[list[list[str]], int]:
    """Each clip's shot captions (``state["shots"][k]["caption"]``), padded with ``""`` to the most
    shots of any clip ``n`` (at least 1), and ``n``; a dropped clip's are all ``""``."""
    shots = [s.get("shots") or [] for s in states]
    n = max(1, max((len(s) for s in shots), default=0))
    drop = drop or [False] * len(states)
    return [[("" if d else str(s.get("caption", ""))) for s in sh] + [""] * (n - len(sh))
            for sh, d in zip(shots, drop)], n


def shot_text_mask(states: list[dict], frames: int, latent_frames: int, tokens):
    """Which caption tokens each latent frame sees: ``tokens`` ``(B, 1 + n, L)`` bool are the tokens
    of the video's caption (segment 0) and of each shot's (segment ``1 + k``), laid end to end in the
    text sequence; returns ``(B, T', (1 + n) L)``: a latent frame sees the video's caption and its
    own shot's (latent frame ``j`` stands for pixel frame ``round(j (T - 1) / (T' - 1))``)."""
    import torch

    b, segments, _ = tokens.shape
    t = latent_frames
    pix = torch.linspace(0, frames - 1, t).round().long() if t > 1 else torch.zeros(1, dtype=torch.long)
    see = torch.zeros(b, t, segments, dtype=torch.bool, device=tokens.device)
    see[:, :, 0] = True
    for i, state in enumerate(states):
        for k, _, start, stop in shot_spans(state, frames):
            if 1 + k < segments:
                see[i, ((pix >= start) & (pix < stop)).to(tokens.device), 1 + k] = True
    return (see[..., None] & tokens[:, None]).flatten(2)
