"""Validation: samples conditioned on data clips, the metric suite with its data floor, and the
clips written into the run folder.

Each validation samples ``num_val_samples`` clips conditioned on the first clips of its first
batch (their pixels withheld) and measures them (``val/<name>``) and, the same way (DIS flow),
the data clips they were conditioned on (``val/<name>_data``, the data floor), each against the
same reference: the rest of the validation batch. ``val/tvs_data_gt`` is the data's TVS with
ground-truth flow where the data has it. ``val/gate`` is the fidelity gate
(:func:`tcplug.metrics.gate.judge`) of the sampled clips against that data floor: 1 pass, 0 fail
(with a few clips per validation it is a coarse signal; ``tcplug score`` judges a whole set).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn

from tcplug.data.shards import slice_batch
from tcplug.metrics import (
    DEFAULT_METRICS,
    MetricSuite,
    TemporalVarianceScore,
    build_metrics,
    to_unit,
)
from tcplug.video import add_video_gif, to_uint8, write_video

#: what validation measures when the recipe names no metrics (the data-dependent two report only
#: when the data has a static mask / object state)
VALIDATION_METRICS = DEFAULT_METRICS + ("bg_flicker", "trajectory_error")


class ValidationMetrics(nn.Module):
    """The metric suite for sampled clips, the same suite for the data floor, and the data's TVS
    with ground-truth flow. Metric states are torchmetrics states: reduced across DDP processes,
    never saved in checkpoints.

    Args:
        metrics: ``{name: metric}`` (default: :data:`VALIDATION_METRICS` from the registry).
    """

    def __init__(self, metrics: dict[str, Any] | None = None) -> None:
        super().__init__()
        named = build_metrics(VALIDATION_METRICS) if metrics is None else metrics
        self.generated = MetricSuite(named)
        self.data = MetricSuite(copy.deepcopy(named))
        self.tvs_data_gt = TemporalVarianceScore()
        self.measured = False
        self.clips = self.reference_clips = 0  # what this process measured since the last reset

    def update(self, video: Tensor, sub: dict[str, Any], batch: dict[str, Any]) -> None:
        """Feed the sampled clips ``video`` ``(n, T, 3, H, W)`` in [-1, 1], the data clips they
        were conditioned on (``sub``, the first ``n`` of ``batch``) and the reference: the rest
        of the validation batch (all of it when the batch holds only the sampled clips)."""
        gen, data = to_unit(video), to_unit(sub["video"])
        n = gen.shape[0]
        ref = to_unit(batch["video"][n:] if batch["video"].shape[0] > n else batch["video"])
        ref_flows = self.generated.flows(ref)
        for suite, clips in ((self.generated, gen), (self.data, data)):
            suite.update_reference(ref, flows=ref_flows)
            suite.update(clips, batch=sub)
        if sub.get("flow") is not None and sub.get("flow_bwd") is not None:
            self.tvs_data_gt.update(data, (sub["flow"], sub["flow_bwd"]))
        self.measured = True
        self.clips += n
        self.reference_clips += ref.shape[0]

    def compute(self) -> dict[str, float]:
        """``{"val/<name>": ..., "val/<name>_data": ..., "val/tvs_data_gt": ..., "val/gate": ...}``
        (what measured)."""
        from tcplug.metrics.gate import judge, metric_bands

        gen, data = self.generated.compute(), self.data.compute()
        values = {f"val/{k}": v for k, v in gen.items()}
        values.update({f"val/{k}_data": v for k, v in data.items()})
        if gen and data:  # the fidelity gate against the data floor (1 pass, 0 fail)
            values["val/gate"] = float(judge(gen, data, metric_bands(dict(self.generated.metrics)))["pass"])
        gt = float(self.tvs_data_gt.compute())
        if gt == gt:
            values["val/tvs_data_gt"] = gt
        return values

    def reset(self) -> None:
        self.generated.reset()
        self.data.reset()
        self.tvs_data_gt.reset()
        self.measured = False
        self.clips = self.reference_clips = 0


def sample_name(stage: str, step: int) -> str:
    """``step_<N>.mp4`` for samples made while fitting, ``<stage>_step_<N>.mp4`` otherwise."""
    return f"step_{step:07d}.mp4" if stage == "fit" else f"{stage}_step_{step:07d}.mp4"


def sample_like(module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
    """``module.num_val_samples`` clips sampled by ``module`` (a TCPlugModule) conditioned on the
    first clips of ``batch`` (their pixels withheld), and those clips; each rank samples others."""
    b, t, _, h, w = batch["video"].shape
    sub = slice_batch(batch, slice(0, min(module.num_val_samples, b)))
    return module.generate(sub["video"].shape[0], t, h, w, batch=sub, seed=module.global_rank * 1000), sub


@rank_zero_only
def write_run_samples(module, video: Tensor, log_dir: str | None) -> None:
    """Write a validation's samples into the run folder (rank 0; smoke runs, ``log_dir`` None,
    write nothing): ``step_<N>.mp4`` while fitting, ``validate_step_<N>.mp4`` when a checkpoint
    is validated (its step), and to TensorBoard when the run logs there."""
    if log_dir is None:
        return
    from lightning.pytorch.loggers import TensorBoardLogger

    trainer = module.trainer
    fn = getattr(trainer.state.fn, "value", trainer.state.fn)
    step = module.global_step if trainer.training or fn == "fit" else getattr(module, "_loaded_step", module.global_step)
    writer = module.logger.experiment if isinstance(module.logger, TensorBoardLogger) else None
    write_samples(video, log_dir, sample_name(fn, step), module.sample_fps, writer, module.global_step)


def write_samples(video: Tensor, run_dir: str | Path, name: str, fps: int, writer=None, step: int = 0) -> Path:
    """Write clips side by side ``(T, 3, H, n*W)`` as ``run_dir/samples/<name>`` (mp4) and, given a
    TensorBoard ``writer``, as an animated image ``samples/video`` at ``step``."""
    frames = to_uint8(torch.cat(list(video), dim=-1))
    path = write_video(frames, Path(run_dir) / "samples" / name, fps=fps)
    if writer is not None:
        add_video_gif(writer, "samples/video", frames, step, fps)
    return path


__all__ = ["VALIDATION_METRICS", "ValidationMetrics", "sample_like", "sample_name", "write_run_samples",
           "write_samples"]
