"""Precomputation: ``tcplug data encode`` runs a recipe's latent design and conditioners once
over shards and writes their outputs next to each clip, so training never runs (or loads) them.

For every clip of the input shards the output shards hold the clip's original entries plus
``latents.npy`` (the latent design's ``encode``, ``(T', C, h, w)``) and what each conditioner
with a ``precompute(batch) -> {key: (B, ...)}`` method returns (``text_emb.npy`` for a text
encoder). Conditioners may also return shared arrays from ``precompute_shared()`` (a negative
prompt's embedding), written once as ``OUT/<key>.npy`` and listed as ``shared`` in
``OUT/encode.json`` (which also records what made the shards); the DataModule adds them to every
batch read from that folder.

One output shard per input shard, written to a temporary name and renamed when complete, so
an interrupted run resumes where it stopped (finished shards are skipped). Under DDP
(``RANK``/``WORLD_SIZE`` set, or ``--rank``/``--world``) shard ``i`` goes to rank ``i % world``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tcplug.errors import TcplugError


def build_encoders(cfg: dict) -> tuple[Any, list]:
    """Only the recipe's latent design and conditioners (never its backbone)."""
    from tcplug.kinds import LatentDesign, WorldConditioner
    from tcplug.recipe import instantiate

    model = cfg.get("model") or {}
    try:
        ns = instantiate(model, components={"latent": LatentDesign | None,
                                            "conditioner": list[WorldConditioner] | WorldConditioner | None})
    except (ValueError, TypeError) as exc:
        raise TcplugError(f"cannot build the recipe's latent design / conditioners: {exc}") from None
    latent = ns.latent
    if latent is None:
        raise TcplugError("the recipe has no model.latent: nothing to precompute")
    conds = [] if ns.conditioner is None else ns.conditioner if isinstance(ns.conditioner, list) else [ns.conditioner]
    return latent, conds


def encode_shards(configs: Sequence[str], shards: str, out: str, batch_size: int = 4, dtype: str = "float32",
                  rank: int = 0, world: int = 1, device: str = "cpu", progress: bool = True) -> dict:
    """Write precomputed shards; returns ``{"clips", "shards", "skipped_shards", "bad"}``."""
    import webdataset as wds
    from tqdm.auto import tqdm

    from tcplug.data.shards import (
        CHECKSUMS,
        PRECOMPUTED_KEYS,
        _npy_bytes,
        decode_clip,
        iter_tar,
        list_shards,
        with_checksums,
    )

    if dtype not in ("float32", "float16"):
        raise TcplugError(f"--dtype must be float32 or float16, got {dtype}")
    from tcplug.recipe import load

    cfg = load(configs)
    inputs = list_shards(shards)
    latent, conds = build_encoders(cfg)
    latent.to(device).eval()
    for c in conds:
        c.to(device).eval()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = {"latent": type(latent).__name__, "latent_channels": int(latent.latent_channels),
            "downsample": int(latent.downsample), "temporal_compression": int(latent.temporal_compression),
            "source": str(shards), "recipes": [str(c) for c in configs]}
    shared = {}
    for c in conds:
        with torch.no_grad():
            shared.update(c.precompute_shared())
    info["shared"] = sorted(shared)
    if rank == 0:
        for key, arr in shared.items():
            np.save(out_dir / f"{key}.npy", torch.as_tensor(arr).float().cpu().numpy())
        (out_dir / "encode.json").write_text(json.dumps(info, indent=2))
    mine = [s for i, s in enumerate(inputs) if i % world == rank]
    report = {"clips": 0, "shards": 0, "skipped_shards": 0, "bad": []}
    bar = tqdm(desc=f"encode (rank {rank})" if world > 1 else "encode", unit="clip", disable=not progress)
    np_dtype = np.float16 if dtype == "float16" else np.float32

    def flush(pending: list[dict], writer) -> None:
        if not pending:
            return
        clips = [p["clip"] for p in pending]
        batch = {"video": torch.stack([c["video"] for c in clips]).to(device)}
        if all("txt" in c for c in clips):
            batch["txt"] = [c["txt"] for c in clips]
        with torch.no_grad():
            extra = {"latents": latent.encode(batch["video"])}
            for c in conds:
                extra.update(c.precompute(batch))
        for i, p in enumerate(pending):
            sample = dict(p["raw"])
            for key, value in extra.items():
                sample[f"{key}.npy"] = _npy_bytes(value[i].float().cpu().numpy().astype(np_dtype))
            writer.write(with_checksums(sample))
        bar.update(len(pending))
        report["clips"] += len(pending)
        pending.clear()

    for shard in mine:
        target = out_dir / Path(shard).name
        if target.exists():
            report["skipped_shards"] += 1
            continue
        tmp = target.with_name(target.name + ".partial")
        pending: list[dict] = []
        with wds.TarWriter(str(tmp)) as writer:
            for raw, error in iter_tar(shard):
                if raw is None:
                    report["bad"].append({"shard": shard, "error": error})
                    break
                try:
                    clip = decode_clip(raw, ["txt"] if "txt" in raw else [])
                except ValueError as exc:
                    report["bad"].append({"shard": shard, "key": raw.get("__key__"), "error": str(exc)})
                    continue
                if pending and clip["video"].shape != pending[0]["clip"]["video"].shape:
                    flush(pending, writer)
                clean = {k: v for k, v in raw.items()
                         if k not in ("__url__", CHECKSUMS) and k not in {f"{key}.npy" for key in PRECOMPUTED_KEYS}}
                pending.append({"raw": clean, "clip": clip})
                if len(pending) >= batch_size:
                    flush(pending, writer)
            flush(pending, writer)
        tmp.rename(target)
        report["shards"] += 1
    bar.close()
    return report


__all__ = ["build_encoders", "encode_shards"]
