"""Clips at several frame strides in one run: each clip says its stride, each batch holds one.

A keyframe clip (``tcplug data synth --stride K``, ``tcplug data ingest --stride K``, or the
built-in world with ``data.frame_stride: K``) shows every ``K``-th frame of the world; its
metadata (the sample's ``json`` entry) says ``{"stride": K}`` and the decoded clip carries
``frame_stride`` (absent for one-step clips). A batch carries the stride of its clips, and the
model places the frames ``K`` apart (``frame_index`` ``0, K, 2K, ...``), so every clip of a batch
must share one stride: :class:`StrideBatches` groups the training stream by stride (as image
trainers bucket by aspect ratio) and :class:`StrideBatchSampler` the validation clips. With a single
stride both are plain consecutive batching, so the order of a one-stride run is unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator

from torch.utils.data import BatchSampler

from tcplug.errors import TcplugError


def meta_stride(sample: dict) -> int:
    """The frame stride a raw sample's metadata (its ``json`` entry) records; 1 when it says none.
    Raises ``ValueError`` (the sample is skipped, with its reason) for a stride that is no
    positive integer."""
    raw = sample.get("json")
    if not raw:
        return 1
    try:
        meta = json.loads(raw)
    except ValueError:
        raise ValueError("json: cannot decode the sample's metadata") from None
    stride = meta.get("stride", 1) if isinstance(meta, dict) else 1
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"json: stride must be a positive integer, got {stride!r}")
    return stride


def bucketed(items: Iterable, key: Callable, size: int, partial: bool = False) -> Iterator[list]:
    """``items`` in groups of ``size`` sharing ``key(item)``, each group leaving as it fills (in
    their order); with ``partial`` the unfilled groups follow at the end."""
    buckets: dict = {}
    for item in items:
        bucket = buckets.setdefault(key(item), [])
        bucket.append(item)
        if len(bucket) == size:
            yield bucket[:]
            bucket.clear()
    if partial:
        yield from (b for b in buckets.values() if b)


def batch_stride(samples: list[dict]) -> int:
    """The one stride of a batch's decoded clips (``frame_stride``, 1 when absent); mixed strides
    are refused: the model could not place the frames of both."""
    strides = sorted({int(s.get("frame_stride", 1)) for s in samples})
    if len(strides) > 1:
        raise TcplugError(f"a batch mixes clips at frame strides {strides}: batch clips of one stride together "
                          "(the datamodule's loaders do: tcplug.data.strides)")
    return strides[0]


class StrideBatches:
    """Picklable webdataset stage: decoded clips -> collated batches of ``batch_size`` clips of
    one stride each. Clips wait in a bucket per stride; a batch leaves when its bucket is full (a
    partial bucket at the end of the stream is dropped, as ``wds.batched(partial=False)`` does)."""

    def __init__(self, batch_size: int, collation_fn: Callable[[list[dict]], dict]) -> None:
        self.batch_size, self.collation_fn = batch_size, collation_fn

    def __call__(self, source: Iterable[dict]) -> Iterator[dict]:
        for batch in bucketed(source, lambda clip: int(clip.get("frame_stride", 1)), self.batch_size):
            yield self.collation_fn(batch)


class StrideBatchSampler(BatchSampler):
    """Batches of at most ``batch_size`` indices of one stride each, for validation: ``strides[i]``
    is clip ``i``'s stride; indices come from ``sampler`` in its order and wait in a bucket per
    stride (the last, partial batch of each stride is kept unless ``drop_last``). A
    ``BatchSampler``, so Lightning can hand it a distributed sampler under DDP."""

    def __init__(self, sampler: Iterable[int], batch_size: int, drop_last: bool = False,
                 strides: list[int] | None = None) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.strides = list(strides or [])

    def __iter__(self) -> Iterator[list[int]]:
        yield from bucketed(self.sampler, self.strides.__getitem__, self.batch_size, partial=not self.drop_last)

    def __len__(self) -> int:
        counts: dict[int, int] = {}
        for i in self.sampler:
            counts[self.strides[i]] = counts.get(self.strides[i], 0) + 1
        per = (lambda n: n // self.batch_size) if self.drop_last else (lambda n: -(-n // self.batch_size))
        return sum(per(n) for n in counts.values())
