"""Data: the built-in synthetic world and the DataModule."""

from tcplug.data.datamodule import VideoDataModule
from tcplug.data.synthetic import SyntheticClips, make_clip

__all__ = ["SyntheticClips", "VideoDataModule", "make_clip"]
