"""The model, free of Lightning: :class:`VideoDiffusion` (components wired, context, routing,
denoise, guidance, the noising process), the motion lock's token logic (:mod:`.lock`), the
sampling pipeline (:func:`generate`, :func:`stream`) and the samplers (:mod:`.sampling`)."""

from tcplug.diffusion.lock import LockSettings
from tcplug.diffusion.model import VideoDiffusion
from tcplug.diffusion.pipeline import generate, stream
from tcplug.diffusion.sampling import (
           FrameStream,
           NoiseSchedule,
           frame_noise,
           sample_loop,
           stream_sample,
)

__all__ = ["FrameStream", "LockSettings", "NoiseSchedule", "VideoDiffusion", "frame_noise", "generate",
           "sample_loop", "stream", "stream_sample"]
