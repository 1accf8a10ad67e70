"""The LightningDataModule over webdataset shards (the synthetic world by default)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, SequentialSampler

from tcplug.data.schema import known_keys
from tcplug.data.shards import SampleDecoder, TarSamples, collate, iter_tar, list_shards
from tcplug.data.strides import StrideBatches, StrideBatchSampler
from tcplug.errors import TcplugError

SYNTH_VERSION = 2  # bump when the synthetic world changes, to invalidate caches


def default_cache_dir() -> Path:
    return Path(os.environ.get("TCPLUG_CACHE", Path.home() / ".cache" / "tcplug"))


def synth_params(frames: int, size: int, clips: int, val_clips: int, num_shapes: int, gravity: float,
                 seed: int, video_format: str, shard_size: int, world: str = "textured", shots: int = 1,
                 frame_stride: int | list[int] = 1) -> dict:
    params = {"version": SYNTH_VERSION, "frames": frames, "size": size, "clips": clips, "val_clips": val_clips,
              "num_shapes": num_shapes, "gravity": gravity, "seed": seed, "video_format": video_format,
              "shard_size": shard_size}
    if world != "textured":  # the textured world keeps the cache folders it always had
        params["world"] = world
    if shots > 1:  # the multi-shot world (one-shot worlds keep their cache folders)
        params["shots"] = shots
    strides = [frame_stride] if isinstance(frame_stride, int) else list(frame_stride)
    if strides != [1]:  # keyframe clips, each stride's meta written (one-step clips keep their cache folders)
        params["frame_strides"] = strides
    return params


def clip_stride(p: dict, index: int) -> int:
    """The frame stride of clip ``index`` of the synthetic world ``p``: with several strides the
    clips take them in turn."""
    strides = p.get("frame_strides", [1])
    return strides[index % len(strides)]


def synthetic_clip(p: dict, seed: int, index: int) -> dict:
    """Clip ``index`` of the synthetic world with parameters ``p`` (:func:`synth_params`): the
    one-camera world, or with ``shots`` the multi-shot one (``frames / shots`` frames a shot)."""
    from tcplug.data.shots import make_shots
    from tcplug.data.synthetic import make_clip

    world = p.get("world", "textured")
    if p.get("shots", 1) > 1:
        return make_shots(seed, index, p["shots"], p["frames"] // p["shots"], p["size"], p["num_shapes"],
                          p["gravity"], world=world)
    return make_clip(seed, index, p["frames"], p["size"], p["num_shapes"], p["gravity"], world=world,
                     stride=clip_stride(p, index))


def synth_cache_path(cache_dir: Path, params: dict) -> Path:
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir / f"synthetic-{digest}"


def generate_synthetic(out: Path, params: dict, progress: bool = True) -> Path:
    """Write the synthetic world's train/val shards into ``out`` (atomically; reused if done)."""
    from tqdm.auto import tqdm

    from tcplug.data.shards import encode_sample, write_shards

    if (out / "params.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    p = params
    one = encode_sample("probe", synthetic_clip(p, p["seed"], 0), p["video_format"], {})
    per_clip = sum(len(v) for k, v in one.items() if k != "__key__")
    total_mb = per_clip * (p["clips"] + p["val_clips"]) / 1e6
    if progress:
        print(f"tcplug: generating the synthetic world once ({p['clips']} + {p['val_clips']} clips of {p['frames']} "
              f"frames at {p['size']}x{p['size']}, about {total_mb:,.{0 if total_mb >= 10 else 1}f} MB) into {out}; "
              "later runs reuse it "
              "(set TCPLUG_CACHE or data.cache_dir to put it elsewhere)", file=sys.stderr, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        for split, n, seed in (("train", p["clips"], p["seed"]), ("val", p["val_clips"], p["seed"] + 1_000_003)):
            bar = tqdm(range(n), desc=f"synthetic world ({split})", disable=not progress, leave=False)
            samples = (encode_sample(f"{split}{i:07d}", synthetic_clip(p, seed, i), p["video_format"],
                                     {"source": "synthetic", "seed": seed, "index": i,
                                      **({"stride": clip_stride(p, i)} if clip_stride(p, i) > 1 else {})})
                       for i in bar)
            write_shards(tmp / split, samples, prefix=split, maxcount=p["shard_size"])
        (tmp / "params.json").write_text(json.dumps(p, indent=2))
        try:
            tmp.rename(out)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def detect_keys(shard: str | list[str], schema: dict | None = None) -> list[str]:
    """The schema's keys carried by the first readable sample of a shard (or of a list of shards:
    the first that has one, so an empty or broken first shard does not hide the others' keys)."""
    schema = known_keys() if schema is None else schema
    for path in [shard] if isinstance(shard, str) else shard:
        for raw, _ in iter_tar(path):
            if raw is None:
                break
            return [k for k, spec in schema.items() if spec.entry in raw]
    return []


class ClipList(Dataset):
    """A small in-memory list of decoded clips (validation)."""

    def __init__(self, clips: list[dict]) -> None:
        self.clips = clips

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> dict:
        return self.clips[i]


class ResumableLoader:
    """The training loader, with its position in the data saved in every checkpoint.

    Each ``iter()`` is one epoch: a fresh webdataset pipeline seeded by ``(seed, rank,
    epoch)``. Lightning stores :meth:`state_dict` (the epoch and the batches already served in
    it) in checkpoints and calls :meth:`load_state_dict` when a run resumes, so a run killed
    mid-epoch continues with the very next batch: the served batches are read again and
    dropped (reading is an order of magnitude faster than training on them), never trained on
    twice. ``len()`` is the fixed number of batches per epoch.
    """

    def __init__(self, datamodule: VideoDataModule, rank: int = 0, world: int = 1) -> None:
        self.dm, self.rank, self.world = datamodule, rank, world
        self._next_epoch, self._skip = 0, 0
        self._epoch, self._served = -1, 0

    def __len__(self) -> int:
        return self.dm.epoch_batches

    def loader(self, epoch: int) -> DataLoader:
        """The plain DataLoader of one epoch."""
        return DataLoader(self.dm.train_dataset(self.rank, self.world, epoch), batch_size=None,
                          num_workers=self.dm.num_workers)

    def __iter__(self):
        # a generator: the epoch starts at the first batch asked for, not at iter() (Lightning
        # calls iter() once just to check that the loader is iterable)
        self._epoch, skip = self._next_epoch, self._skip
        self._next_epoch, self._skip, self._served = self._epoch + 1, 0, skip
        it = iter(self.loader(self._epoch))
        for _ in range(skip):
            next(it, None)
        for batch in it:
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        if self._epoch < 0:  # not iterated yet (or just restored)
            return {"epoch": self._next_epoch, "batches": self._skip}
        if self._served >= len(self):
            return {"epoch": self._epoch + 1, "batches": 0}
        return {"epoch": self._epoch, "batches": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._next_epoch, self._skip = int(state["epoch"]), int(state["batches"])
        self._epoch, self._served = -1, 0


class VideoDataModule(pl.LightningDataModule):
    """Clips ``(B, T, 3, H, W)`` in ``[-1, 1]`` plus ground truth, from webdataset shards.

    With ``shards`` unset, the built-in synthetic world is generated once into
    ``cache_dir/synthetic-<hash of its parameters>`` and reused (the embedded default).

    Training reads shards split by node (rank ``r`` of ``W`` reads shards ``r, r+W, ...``:
    disjoint), resampled with replacement inside that subset, shuffled, and cut to a fixed
    ``epoch_batches`` per rank, so every DDP rank runs the same number of steps; the order
    is deterministic for ``seed``. Bad samples are skipped with a warning and counted
    (``data/skipped``).

    Args:
        shards: folder of ``.tar`` shards, a tar, or a brace pattern; None = synthetic world.
        val_shards: validation shards; None = the synthetic validation split, or the first
            ``val_clips`` clips of ``shards``.
        frames: frames per clip ``T`` (longer clips are cut).
        size: expected frame size (checked).
        batch_size: clips per batch per process.
        epoch_batches: batches per epoch per process.
        val_clips: validation clips.
        keys: ground-truth keys to load (``flow``, ``flow_bwd``, ``occ``, ``depth``, ``skeleton``,
            ``static``, ``state``, ``txt``, and any key a component declares in ``data_keys``);
            None = every known key the shards carry. A sample that lacks a requested key is skipped.
        num_workers: DataLoader workers per process.
        shuffle_buffer: samples in the shuffle buffer.
        seed: data order seed, and the synthetic world's seed.
        train_clips: synthetic world: training clips.
        num_shapes: synthetic world: moving shapes per clip.
        gravity: synthetic world: downward acceleration in pixels/frame^2.
        world: synthetic world: ``simple`` (smooth striped background, flat shapes: a small
            model learns it in minutes) or ``textured`` (high-frequency background and
            striped shapes: harder).
        shots: synthetic world: shots of one scene per clip (the multi-shot world,
            :mod:`tcplug.data.shots`: cuts between cameras, ``frames / shots`` frames a shot, with
            ``cuts`` and ``ids``); 1 = one continuous camera.
        frame_stride: synthetic world: render every ``frame_stride``-th step of a world simulated
            ``frames * frame_stride`` steps long (clips at a keyframe stride, to train a
            keyframes pass: see "Keyframes first"); 1 = every step. A list (``[1, 4]``): the
            clips take the strides in turn and every batch holds clips of one stride
            (:mod:`tcplug.data.strides`), so one model learns both passes. Shards say their clips'
            stride themselves (``tcplug data synth/ingest --stride``).
        video_format: synthetic world: frames stored as ``npy`` (exact) or ``mp4``.
        shard_size: synthetic world: clips per shard.
        cache_dir: where the synthetic world is cached (default ``$TCPLUG_CACHE`` or
            ``~/.cache/tcplug``).
    """

    def __init__(
        self,
        shards: str | None = None,
        val_shards: str | None = None,
        frames: int = 8,
        size: int = 32,
        batch_size: int = 8,
        epoch_batches: int = 250,
        val_clips: int = 8,
        keys: list[str] | None = None,
        num_workers: int = 0,
        shuffle_buffer: int = 64,
        seed: int = 0,
        train_clips: int = 1024,
        num_shapes: int = 2,
        gravity: float = 0.0,
        world: Literal["simple", "textured"] = "simple",
        video_format: str = "npy",
        shard_size: int = 64,
        cache_dir: str | None = None,
        shots: int = 1,
        frame_stride: int | list[int] = 1,
    ) -> None:
        super().__init__()
        if frames < 2:
            raise TcplugError(f"data.frames must be >= 2 for temporal training, got {frames}")
        if size < 8 or size % 2:
            raise TcplugError(f"data.size must be an even number >= 8, got {size}")
        if min(batch_size, epoch_batches, val_clips, train_clips, shard_size) < 1:
            raise TcplugError("data.batch_size, epoch_batches, val_clips, train_clips and shard_size must be >= 1")
        if shots < 1 or frames % shots or frames // shots < 2:
            raise TcplugError(f"data.shots must divide data.frames into shots of >= 2 frames, got {shots} shots "
                              f"of {frames} frames")
        strides = [frame_stride] if isinstance(frame_stride, int) else list(frame_stride)
        if not strides or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in strides) \
                or len(set(strides)) < len(strides) or (strides != [1] and (shards or shots > 1)):
            raise TcplugError(f"data.frame_stride must be an integer >= 1 or a list of distinct ones, and applies to "
                              f"the one-camera synthetic world, got {frame_stride} (shards carry their clips' "
                              "stride: `tcplug data synth/ingest --stride`)")
        if keys is not None:
            known = known_keys()
            unknown = sorted(set(keys) - set(known))
            if unknown:
                raise TcplugError(f"unknown data.keys {unknown}; known keys: {', '.join(known)}")
        for spec in (shards, val_shards):  # a wrong path fails now, before any run folder exists
            if spec:
                list_shards(spec)
        self.save_hyperparameters()
        self.shards, self.val_shards, self.frames, self.size = shards, val_shards, frames, size
        self.batch_size, self.epoch_batches, self.val_clips = batch_size, epoch_batches, val_clips
        self.keys, self.num_workers, self.shuffle_buffer, self.seed = keys, num_workers, shuffle_buffer, seed
        self.synth = synth_params(frames, size, train_clips, val_clips, num_shapes, gravity, seed, video_format,
                                  shard_size, world, shots, frame_stride)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._val: ClipList | None = None

    def schema(self) -> dict:
        """The keys this DataModule can decode: the engine's and every registered component's
        declared ``data_keys`` (:func:`~tcplug.data.schema.known_keys`), looked up once."""
        if getattr(self, "_schema", None) is None:
            self._schema = known_keys()
        return self._schema

    # ----- where the shards are -------------------------------------------------------
    def synthetic_dir(self) -> Path:
        return synth_cache_path(self.cache_dir or default_cache_dir(), self.synth)

    def train_shard_list(self) -> list[str]:
        return list_shards(self.shards) if self.shards else list_shards(self.synthetic_dir() / "train")

    def val_shard_list(self) -> list[str]:
        if self.val_shards:
            return list_shards(self.val_shards)
        return list_shards(self.shards) if self.shards else list_shards(self.synthetic_dir() / "val")

    def prepare_data(self) -> None:
        if self.shards is None:
            generate_synthetic(self.synthetic_dir(), self.synth)

    def setup(self, stage: str | None = None) -> None:
        if self.keys is None:
            self.keys = detect_keys(self.train_shard_list(), self.schema())

    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    # ----- loaders --------------------------------------------------------------------
    def train_dataset(self, rank: int = 0, world: int = 1, epoch: int = 0):
        """The webdataset pipeline of one rank for one epoch (see the class docstring).

        Its order is a function of ``(seed, rank, epoch)`` (and the worker), so a resumed run
        replays exactly the batches an uninterrupted one would have seen."""
        import webdataset as wds

        shards = self.train_shard_list()
        if len(shards) < world:
            raise TcplugError(
                f"{len(shards)} training shard(s) for {world} processes: every process needs its own "
                "shards (write more, smaller shards: `tcplug data synth/ingest --shard-size`)"
            )
        mine = shards[rank::world]
        decoder = SampleDecoder(self.keys or (), self.frames, self.size, self.schema())
        per_worker = math.ceil(self.epoch_batches / max(1, self.num_workers))
        epoch_seed = self.seed * 100_003 + epoch
        pipeline = wds.DataPipeline(
            wds.ResampledShards(mine, seed=epoch_seed, deterministic=True),
            TarSamples(decoder, num_shards=len(mine)),
            decoder,
            wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, seed=epoch_seed * 1009 + rank),
            StrideBatches(self.batch_size, collate),  # one stride a batch (plain batching for one)
        )
        pipeline = pipeline.with_epoch(nbatches=per_worker)
        with warnings.catch_warnings():  # the length is exact here: with_epoch fixes it
            warnings.simplefilter("ignore", UserWarning)
            return pipeline.with_length(per_worker * max(1, self.num_workers))

    def train_dataloader(self) -> ResumableLoader:
        rank, world = self._rank()
        return ResumableLoader(self, rank, world)

    def _val_set(self) -> ClipList:
        if self._val is None:
            decoder = SampleDecoder(self.keys or (), self.frames, self.size, self.schema())
            clips: list[dict] = []
            for shard in self.val_shard_list():
                clips += list(decoder(raw for raw, err in iter_tar(shard) if raw is not None))
                if len(clips) >= self.val_clips:
                    break
            if not clips:
                raise TcplugError("no readable validation clips")
            for c in clips:
                c.pop("__skipped__", None)
            self._val = ClipList(clips[: self.val_clips])
        return self._val

    def shared_arrays(self) -> dict[str, torch.Tensor]:
        """Arrays ``tcplug data encode`` wrote once for all clips (e.g. the negative prompt's
        embedding), listed as ``shared`` in the shards folder's ``encode.json``; every batch
        carries them with a leading batch dimension of 1."""
        if getattr(self, "_shared", None) is None:
            self._shared = {}
            folder = Path(self.shards) if self.shards and Path(self.shards).is_dir() else None
            info = folder / "encode.json" if folder is not None else None
            if info is not None and info.is_file():
                for key in json.loads(info.read_text()).get("shared", []):
                    path = folder / f"{key}.npy"
                    if not path.is_file():
                        raise TcplugError(f"{info} lists {key} but {path} is missing: re-run `tcplug data encode`")
                    self._shared[key] = torch.from_numpy(np.load(path)).float().unsqueeze(0)
        return self._shared

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        for key, value in self.shared_arrays().items():
            if isinstance(batch, dict) and key not in batch:
                batch[key] = value.to(batch["video"].device)
        return batch

    def val_dataloader(self) -> DataLoader:
        clips = self._val_set()
        strides = [int(c.get("frame_stride", 1)) for c in clips.clips]
        if len(set(strides)) == 1:
            return DataLoader(clips, batch_size=self.batch_size, shuffle=False, num_workers=0, collate_fn=collate)
        sampler = StrideBatchSampler(SequentialSampler(clips), self.batch_size, strides=strides)  # one stride a batch
        return DataLoader(clips, batch_sampler=sampler, num_workers=0, collate_fn=collate)

    test_dataloader = val_dataloader
    predict_dataloader = val_dataloader
