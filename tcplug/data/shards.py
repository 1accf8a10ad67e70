"""webdataset shards: writing clips, decoding samples robustly, inspecting folders.

A sample is one clip: ``frames.npy`` or ``frames.mp4`` (uint8 ``T x H x W x 3``), ``json``
(metadata), and any key of the schema (:mod:`tcplug.data.schema`): the engine's ground truth
(``flow.npy``, ``flow_bwd.npy``, ``occ.npy``, ``depth.npy``, ``skeleton.npy``, ``static.npy``,
``state.json``, ``txt``), what ``tcplug data encode`` precomputes (``latents.npy``,
``text_emb.npy``, ``text_mask.npy``), and the keys components declare.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from tcplug.data.schema import BUILTIN, PRECOMPUTED, known_keys, load_npy
from tcplug.data.strides import batch_stride, meta_stride
from tcplug.errors import TcplugError
from tcplug.kinds import DataKey

#: the engine's own keys (the schema adds those components declare)
ALL_KEYS = tuple(BUILTIN)
PRECOMPUTED_KEYS = tuple(k.name for k in PRECOMPUTED)


class DataSkipWarning(UserWarning):
    """A sample or shard was skipped because it could not be read."""


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _mp4_bytes(frames: np.ndarray, fps: int = 8) -> bytes:
    import tempfile

    from tcplug.video import write_video

    with tempfile.TemporaryDirectory() as d:
        path = write_video(frames, Path(d) / "clip.mp4", fps=fps, crf=10)
        return path.read_bytes()


CHECKSUMS = "crc.json"  # a sample's entries' CRC-32s, written with every sample and checked on reading


def with_checksums(sample: dict) -> dict:
    """``sample`` with a :data:`CHECKSUMS` entry: the CRC-32 of every other entry's bytes."""
    import zlib

    crcs = {k: zlib.crc32(v) for k, v in sample.items() if not k.startswith("__") and k != CHECKSUMS
            and isinstance(v, bytes | bytearray)}
    return {**sample, CHECKSUMS: json.dumps(crcs, sort_keys=True).encode()}


def check_sample(sample: dict) -> None:
    """Raise ``ValueError`` naming the first entry whose bytes do not match the checksum written
    with it (a sample written without checksums passes)."""
    import zlib

    if CHECKSUMS not in sample:
        return
    try:
        crcs = json.loads(sample[CHECKSUMS])
    except ValueError:
        raise ValueError(f"{CHECKSUMS}: cannot decode") from None
    for entry, crc in crcs.items():
        if entry in sample and zlib.crc32(sample[entry]) != crc:
            raise ValueError(f"{entry}: damaged (its bytes do not match the checksum written with them)")


def encode_sample(key: str, clip: dict, video_format: str = "npy", meta: dict | None = None) -> dict:
    """A webdataset sample dict (bytes per extension) from a clip dict of arrays."""
    sample = {"__key__": key}
    if video_format == "npy":
        sample["frames.npy"] = _npy_bytes(clip["frames"])
    elif video_format == "mp4":
        sample["frames.mp4"] = _mp4_bytes(clip["frames"])
    else:
        raise TcplugError(f"unknown video format {video_format!r}: use npy or mp4")
    for key in BUILTIN.values():
        if key.name not in clip:
            continue
        value = clip[key.name]
        if key.entry.endswith(".npy"):
            sample[key.entry] = _npy_bytes(np.asarray(value))
        elif key.entry.endswith(".json"):
            sample[key.entry] = json.dumps(value).encode()
        else:
            sample[key.entry] = str(value).encode()
    sample["json"] = json.dumps(meta or {}).encode()
    return sample


WRITE_MODES = ("new", "append", "overwrite")


def check_out_folder(out: str | Path, mode: str = "new") -> list[Path]:
    """The shards already in ``out``, after checking that a writer in ``mode`` may write there
    (a file is no folder; a folder with shards needs ``append`` or ``overwrite``)."""
    if mode not in WRITE_MODES:
        raise TcplugError(f"write mode {mode!r}: use one of {', '.join(WRITE_MODES)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TcplugError(f"--out {out} is a file, not a folder")
    existing = sorted(out.glob("*.tar")) if out.is_dir() else []
    if existing and mode == "new":
        raise TcplugError(f"{out} already holds {len(existing)} shard(s): give --append to add to them or "
                          "--overwrite to replace them (or another --out)")
    return existing


def write_shards(out: str | Path, samples: Iterable[dict], prefix: str = "clips", maxcount: int = 128,
                 mode: str = "new") -> list[Path]:
    """Write samples into ``out/{prefix}-%06d.tar`` with webdataset's ``ShardWriter``; returns
    the shards written (none when there was no sample: the folder is left as it was).

    A folder that already holds shards is never silently overwritten: ``mode`` ``new`` (default)
    refuses it, ``append`` continues the shard numbering after the existing ones, ``overwrite``
    replaces them. The shards are written beside the folder's content first and moved in only
    when complete, so an interrupted writer leaves the dataset as it was.
    """
    import re
    import shutil
    import tempfile

    import webdataset as wds

    out = Path(out)
    existing = check_out_folder(out, mode)
    out.mkdir(parents=True, exist_ok=True)
    numbers = [int(m.group(1)) for p in existing if (m := re.fullmatch(rf"{re.escape(prefix)}-(\d+)\.tar", p.name))]
    start = max(numbers) + 1 if mode == "append" and numbers else 0
    tmp = Path(tempfile.mkdtemp(prefix=".writing-", dir=out))
    try:
        count = 0
        with wds.ShardWriter(str(tmp / f"{prefix}-%06d.tar"), maxcount=maxcount, start_shard=start, verbose=0) as sink:
            for sample in samples:
                sink.write(with_checksums(sample))
                count += 1
        if count == 0:
            return []
        if mode == "overwrite":
            for old in existing:
                old.unlink()
        written = sorted(tmp.glob("*.tar"))
        for shard in written:
            shard.replace(out / shard.name)
        return [out / shard.name for shard in written]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----- reading -------------------------------------------------------------------------------
def _load_mp4(data: bytes) -> np.ndarray:
    import av

    with av.open(io.BytesIO(data)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise ValueError("no decodable frames")
    return np.stack(frames)


def decode_clip(sample: dict, keys: Iterable[str] = (), frames: int | None = None,
                size: int | None = None, schema: dict[str, DataKey] | None = None) -> dict:
    """Decode one raw sample into tensors; raises ``ValueError`` naming the bad key.

    Returns ``{"video": (T, 3, H, W) float in [-1, 1], "__key__": str, "__url__": str}`` plus
    each of ``keys`` decoded by its :class:`~tcplug.DataKey` in ``schema`` (default: the engine's
    keys, then :func:`~tcplug.data.schema.known_keys`): ``flow``, ``flow_bwd`` ``(T-1, 2, H, W)``,
    ``occ`` ``(T-1, 1, H, W)``, ``depth`` ``(T, 1, H, W)``, ``skeleton`` ``(T, K, H, W)``,
    ``static`` ``(1, H, W)``, ``state`` (dict), ``txt`` (str), ..., each cut to the first
    ``frames`` frames. ``size`` checks the frame size. A keyframe clip (its metadata says
    ``stride`` K > 1) carries ``frame_stride`` K.
    """
    check_sample(sample)
    name = "frames.npy" if "frames.npy" in sample else "frames.mp4" if "frames.mp4" in sample else None
    if name is None:
        raise ValueError("missing key frames.npy/frames.mp4")
    try:
        raw = load_npy(sample[name]) if name.endswith("npy") else _load_mp4(sample[name])
    except Exception as exc:
        raise ValueError(f"{name}: cannot decode ({type(exc).__name__}: {exc})") from None
    if raw.ndim != 4 or raw.shape[-1] != 3 or raw.dtype != np.uint8:
        raise ValueError(f"{name}: expected uint8 (T, H, W, 3), got {raw.dtype} {raw.shape}")
    t = frames or raw.shape[0]
    if raw.shape[0] < t:
        raise ValueError(f"{name}: {raw.shape[0]} frames, need {t}")
    h, w = raw.shape[1:3]
    if size is not None and (h, w) != (size, size):
        raise ValueError(f"{name}: frames are {h}x{w}, expected {size}x{size}")
    out: dict = {"__key__": sample.get("__key__", "?"), "__url__": sample.get("__url__", "?")}
    stride = meta_stride(sample)
    if stride > 1:  # a keyframe clip: its frames lie `stride` steps apart (tcplug.data.strides)
        out["frame_stride"] = stride
    out["video"] = torch.from_numpy(raw[:t].copy()).permute(0, 3, 1, 2).float() / 127.5 - 1
    for k in keys:
        spec = (schema or BUILTIN).get(k)
        if spec is None:
            known = known_keys()
            spec = known.get(k)
            if spec is None:
                raise TcplugError(f"unknown data key {k!r}; known keys: {', '.join(known)}")
        if spec.entry not in sample:
            raise ValueError(f"missing key {spec.entry}")
        try:
            out[k] = spec.decode(sample[spec.entry], t, h, w)
        except ValueError as exc:
            raise ValueError(f"{spec.entry}: {exc}") from None
    return out


def iter_tar(path: str | Path) -> Iterator[tuple[dict | None, str | None]]:
    """Raw samples of one tar, grouped by key; yields ``(None, error)`` once if the tar breaks
    (truncated, corrupt), after the samples that were complete before the break."""
    import tarfile

    current: dict | None = None
    try:
        with tarfile.open(path, "r") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = Path(member.name).name
                key, _, ext = base.partition(".")
                data = tar.extractfile(member).read()
                if current is not None and current["__key__"] != key:
                    yield current, None
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": str(path)}
                current[ext] = data
    except (tarfile.TarError, OSError, EOFError) as exc:
        # the sample being read when the tar broke is incomplete: it is not yielded
        where = f" while reading sample {current['__key__']!r}" if current is not None else ""
        yield None, f"{type(exc).__name__}: {exc}{where}"
        return
    if current is not None:
        yield current, None


def list_shards(spec: str | Path) -> list[str]:
    """Shard paths from a folder, a single tar, or a brace pattern (``data-{000..009}.tar``)."""
    from braceexpand import braceexpand

    p = Path(str(spec))
    if p.is_dir():
        shards = sorted(str(s) for s in p.glob("*.tar"))
        if not shards:
            raise TcplugError(f"no shards found at {spec} (a folder without .tar files)")
        return shards
    shards = [s for s in braceexpand(str(spec))]
    present = [s for s in shards if Path(s).exists()]
    if not present:
        what = "does not exist" if len(shards) == 1 else f"names {len(shards)} shards and none exists"
        raise TcplugError(f"data shards {spec} {what} (give a folder of .tar shards, a .tar, or a brace pattern)")
    if len(present) < len(shards):
        missing = sorted(set(shards) - set(present))
        raise TcplugError(f"{len(missing)} of the {len(shards)} shards of {spec} do not exist (e.g. {missing[0]})")
    return shards


def inspect_shards(spec: str | Path, keys: Iterable[str] | None = None) -> dict:
    """Clip count, keys, shapes and every unreadable sample of a shard folder (``keys``: those
    to decode, default every key of the schema).

    A sample is bad if a key does not decode or has the wrong shape, if the tar breaks, if
    it lacks a key that most samples carry, or if its frame size differs from most samples'.
    """
    from collections import Counter

    schema = known_keys()
    keys = list(schema) if keys is None else list(keys)
    shards = list_shards(spec)
    report = {"shards": len(shards), "clips": 0, "keys": {}, "shapes": {}, "bad": []}
    good: list[tuple[str, str, frozenset, tuple]] = []
    for shard in shards:
        for raw, err in iter_tar(shard):
            if raw is None:
                report["bad"].append({"shard": shard, "key": None, "error": err})
                continue
            present = frozenset(k for k in raw if not k.startswith("__"))
            wanted = [k for k in keys if k in schema and schema[k].entry in raw]
            try:
                clip = decode_clip(raw, wanted, schema=schema)
            except ValueError as exc:
                report["bad"].append({"shard": shard, "key": raw["__key__"], "error": str(exc)})
                continue
            good.append((shard, raw["__key__"], present, tuple(clip["video"].shape[-2:])))
            for k, v in clip.items():
                if torch.is_tensor(v):
                    report["shapes"].setdefault(k, list(v.shape))
    if good:
        common_keys = Counter(g[2] for g in good).most_common(1)[0][0]
        common_size = Counter(g[3] for g in good).most_common(1)[0][0]
        for shard, key, present, hw in good:
            if present != common_keys and common_keys - present:
                report["bad"].append({"shard": shard, "key": key,
                                      "error": f"missing key(s) {', '.join(sorted(common_keys - present))}"})
            elif hw != common_size:
                report["bad"].append({"shard": shard, "key": key,
                                      "error": f"frames are {hw[0]}x{hw[1]}, most clips are {common_size[0]}x{common_size[1]}"})
            else:
                report["clips"] += 1
                for k in present:
                    report["keys"][k] = report["keys"].get(k, 0) + 1
    return report


class SampleDecoder:
    """Picklable webdataset stage: decode raw samples, skip bad ones with one warning line.

    Skips are counted per worker; every decoded sample carries the worker's running count in
    ``__skipped__`` so the training loop can log ``data/skipped``.
    """

    def __init__(self, keys: Iterable[str], frames: int, size: int | None,
                 schema: dict[str, DataKey] | None = None) -> None:
        self.keys, self.frames, self.size, self.schema = tuple(keys), frames, size, schema
        self.skipped = self.decoded = 0
        self.last_error: str | None = None

    def skip(self, shard: str, key: str | None, error: str) -> None:
        self.skipped += 1
        self.last_error = f"sample {key!r}: {error}" if key else error
        warnings.warn(f"skipping sample {key!r} of shard {shard}: {error}", DataSkipWarning, stacklevel=2)

    def __call__(self, source: Iterable[dict]) -> Iterator[dict]:
        for raw in source:
            try:
                clip = decode_clip(raw, self.keys, self.frames, self.size, self.schema)
            except ValueError as exc:
                self.skip(raw.get("__url__", "?"), raw.get("__key__"), str(exc))
                continue
            self.decoded += 1
            clip["__skipped__"] = self.skipped
            info = torch.utils.data.get_worker_info()
            clip["__worker__"] = info.id if info is not None else 0
            yield clip


class TarSamples:
    """Picklable webdataset stage: shard dicts ``{"url": ...}`` -> raw samples, tolerant of
    truncated or unreadable tars (one warning line each, counted by the decoder).

    When every one of the ``num_shards`` shards it may read has been visited and none gave the
    decoder a single readable sample, it stops the run naming them (resampling would otherwise
    loop over them forever)."""

    def __init__(self, decoder: SampleDecoder, num_shards: int = 0) -> None:
        self.decoder, self.num_shards = decoder, num_shards

    def __call__(self, shards: Iterable[dict]) -> Iterator[dict]:
        barren: dict[str, str] = {}  # shards that gave no readable sample (until one does)
        fertile = False
        for shard in shards:
            url, error = shard["url"], "no readable sample"
            before = self.decoder.decoded
            for raw, err in iter_tar(url):
                if raw is None:
                    self.decoder.skip(url, None, f"unreadable shard ({err})")
                    error = f"unreadable ({err})"
                    break
                yield raw
            fertile = fertile or self.decoder.decoded > before
            if not fertile and self.num_shards:
                barren.setdefault(url, self.decoder.last_error or error)
                if len(barren) >= self.num_shards:
                    first, why = next(iter(barren.items()))
                    raise TcplugError(f"none of the {self.num_shards} training shard(s) holds a readable sample (e.g. "
                                      f"{first}: {why}); `tcplug data inspect` lists every bad one")


def collate(samples: list[dict]) -> dict:
    """Stack tensors; keep dicts/strings as lists; ``skipped`` = max running count;
    ``frame_stride`` the clips' one stride (kept only above 1; mixed strides are refused)."""
    out: dict = {}
    stride = batch_stride(samples)
    if stride > 1:
        out["frame_stride"] = stride
    for k in samples[0]:
        if k == "frame_stride":
            continue
        vals = [s[k] for s in samples]
        if k == "__skipped__":
            out["skipped"] = torch.tensor(max(vals))
        elif k == "__worker__":
            out["worker"] = vals[0]
        elif torch.is_tensor(vals[0]):
            out[k] = torch.stack(vals)
        else:
            out[k] = vals
    return out


def slice_batch(batch: dict, rows: slice) -> dict:
    """The clips ``rows`` of a collated batch: tensors and per-clip lists sliced, the rest as is."""
    return {k: v[rows] if torch.is_tensor(v) or isinstance(v, list) else v for k, v in batch.items()}
