"""Data: the synthetic world, webdataset shards, real-video ingest, and the DataModule."""

from tcplug.data.datamodule import VideoDataModule
from tcplug.data.synthetic import make_clip

__all__ = ["VideoDataModule", "make_clip"]
