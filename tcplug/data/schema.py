"""The keys a shard sample may carry besides its frames, each with how to decode it.

The engine's own keys are declared here exactly as a component declares the keys it reads
(:attr:`tcplug.Component.data_keys`, a tuple of :class:`~tcplug.DataKey`): the schema is their
union (:func:`known_keys`), so a third-party conditioner reads a key of its own from shards with
no change to the engine. Decoders get the entry's bytes and the clip's ``frames``, ``height``,
``width``; they raise ``ValueError`` for bytes they cannot read or a shape that does not fit.
"""

from __future__ import annotations

import io
import json

import numpy as np
import torch

from tcplug.kinds import DataKey


def load_npy(data: bytes) -> np.ndarray:
    """A ``.npy`` entry's array (never unpickled)."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:
        raise ValueError(f"cannot decode ({type(exc).__name__}: {exc})") from None


def _array(data: bytes, shape: tuple) -> torch.Tensor:
    """A float tensor of a ``.npy`` entry, checked against ``shape`` (None = any size)."""
    arr = load_npy(data)
    if shape and shape[0] is not None and arr.ndim == len(shape):
        arr = arr[: shape[0]]  # longer clips are cut to the frames asked for
    if arr.ndim != len(shape) or any(a != b for a, b in zip(arr.shape, shape) if b is not None):
        raise ValueError(f"shape {arr.shape}, expected {tuple(x if x is not None else 'K' for x in shape)}")
    return torch.from_numpy(np.ascontiguousarray(arr)).float()


def decode_flow(data: bytes, t: int, h: int, w: int) -> torch.Tensor:
    """``(T-1, H, W, 2)`` -> ``(T-1, 2, H, W)`` pixels."""
    return _array(data, (t - 1, h, w, 2)).permute(0, 3, 1, 2)


def decode_occlusion(data: bytes, t: int, h: int, w: int) -> torch.Tensor:
    """``(T-1, H, W)`` -> ``(T-1, 1, H, W)``."""
    return _array(data, (t - 1, h, w))[:, None]


def decode_depth(data: bytes, t: int, h: int, w: int) -> torch.Tensor:
    """``(T, H, W)`` -> ``(T, 1, H, W)``."""
    return _array(data, (t, h, w))[:, None]


def decode_skeleton(data: bytes, t: int, h: int, w: int) -> torch.Tensor:
    """``(T, K, H, W)``."""
    return _array(data, (t, None, h, w))


def decode_static(data: bytes, t: int, h: int, w: int) -> torch.Tensor:
    """``(H, W)`` -> ``(1, H, W)``."""
    arr = load_npy(data)
    if arr.shape != (h, w):
        raise ValueError(f"shape {arr.shape}, expected {(h, w)}")
    return torch.from_numpy(np.ascontiguousarray(arr)).float()[None]


def decode_cuts(data: bytes, t: int, h: int, w: int) -> torch.Tensor:
    """``(T-1,)``: 1 where frames ``n, n+1`` lie in different shots."""
    return _array(data, (t - 1,))


def decode_ids(data: bytes, t: int, h: int, w: int) -> torch.Tensor:
    """``(T, H, W)`` object index of each pixel (-1: background)."""
    return _array(data, (t, h, w)).long()


def decode_json(data: bytes, t: int, h: int, w: int):
    try:
        return json.loads(data)
    except Exception as exc:
        raise ValueError(f"cannot decode ({exc})") from None


def decode_text(data: bytes, t: int, h: int, w: int) -> str:
    return data.decode() if isinstance(data, bytes) else str(data)


def _precomputed(ndim: int, shape: str):
    def check(data: bytes) -> torch.Tensor:
        arr = load_npy(data)
        if arr.ndim != ndim:
            raise ValueError(f"shape {arr.shape}, expected {shape}")
        return torch.from_numpy(np.ascontiguousarray(arr)).float()
    return check


_latents, _text_emb, _text_mask = _precomputed(4, "(T, C, h, w)"), _precomputed(2, "(L, D)"), _precomputed(1, "(L,)")


def decode_latents(data: bytes, t: int, h: int, w: int) -> torch.Tensor:
    return _latents(data)


def decode_text_emb(data: bytes, t: int, h: int, w: int) -> torch.Tensor:
    return _text_emb(data)


def decode_text_mask(data: bytes, t: int, h: int, w: int) -> torch.Tensor:
    return _text_mask(data)


#: ground truth of the synthetic world and of ingested video
GROUND_TRUTH = (
    DataKey("flow", "flow.npy", decode_flow, "forward optical flow (T-1, 2, H, W), pixels"),
    DataKey("flow_bwd", "flow_bwd.npy", decode_flow, "backward optical flow (T-1, 2, H, W), pixels"),
    DataKey("occ", "occ.npy", decode_occlusion, "occlusion mask of the forward flow (T-1, 1, H, W), 1 = occluded"),
    DataKey("depth", "depth.npy", decode_depth, "depth (T, 1, H, W), background = 1"),
    DataKey("skeleton", "skeleton.npy", decode_skeleton, "keypoint heatmaps (T, K, H, W)"),
    DataKey("static", "static.npy", decode_static, "where no object ever goes (1, H, W), 1 = static"),
    DataKey("state", "state.json", decode_json, "object state per frame (JSON)"),
    DataKey("txt", "txt", decode_text, "caption (text)"),
)
#: the multi-shot world's (``tcplug data synth --shots``) and, ``cuts``, ingested video's
SHOTS = (
    DataKey("cuts", "cuts.npy", decode_cuts, "shot boundaries (T-1,), 1 where frames n, n+1 lie in different shots"),
    DataKey("ids", "ids.npy", decode_ids, "object index of each pixel (T, H, W), -1 = background"),
)
#: written by ``tcplug data encode``: VAE latents, text embeddings and, for text encoders whose
#: model reads a mask over the tokens (LTX-Video), that mask; float
PRECOMPUTED = (
    DataKey("latents", "latents.npy", decode_latents, "VAE latents (T', C, h, w)"),
    DataKey("text_emb", "text_emb.npy", decode_text_emb, "text embeddings (L, D)"),
    DataKey("text_mask", "text_mask.npy", decode_text_mask, "text token mask (L,), 1 = a real token"),
)
BUILTIN: dict[str, DataKey] = {k.name: k for k in GROUND_TRUTH + SHOTS + PRECOMPUTED}
RESERVED = {"frames", "video", "json"}  # the frames themselves and the sample's metadata


def known_keys() -> dict[str, DataKey]:
    """Every key the engine can decode: its own, then those the registered components declare
    (the first declaration of a name wins; a declaration may not take a reserved name)."""
    from tcplug.registry import KINDS, get_registry

    keys = dict(BUILTIN)
    registry = get_registry()
    for kind in KINDS:
        for entry in registry.entries(kind):
            for key in entry.cls.data_keys:
                if key.name not in RESERVED:
                    keys.setdefault(key.name, key)
    return keys


__all__ = ["BUILTIN", "GROUND_TRUTH", "PRECOMPUTED", "SHOTS", "known_keys", "load_npy"]
