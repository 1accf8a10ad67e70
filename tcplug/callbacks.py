"""Callbacks the CLI adds to every run."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only


class MetricsJson(pl.Callback):
    """Writes ``metrics.json`` (the last value of every logged scalar) into the run folder.

    Written after each validation and at the end of fit/validate/test, on rank zero only,
    atomically (temporary file + rename), so an interrupted run never leaves half a file.
    """

    def _write(self, trainer: pl.Trainer, stage: str) -> None:
        if trainer.sanity_checking:
            return
        log_dir = trainer.log_dir  # a collective under DDP: every rank reads it
        if log_dir is not None:
            self._dump(trainer, stage, log_dir)

    @rank_zero_only
    def _dump(self, trainer: pl.Trainer, stage: str, log_dir: str) -> None:
        metrics = {}
        for key, value in trainer.callback_metrics.items():
            v = float(value)
            metrics[key] = v if math.isfinite(v) else str(v)
        payload = {"stage": stage, "epoch": trainer.current_epoch, "global_step": trainer.global_step,
                   "metrics": dict(sorted(metrics.items()))}
        ckpt = getattr(trainer, "checkpoint_callback", None)
        if ckpt is not None and getattr(ckpt, "last_model_path", ""):
            payload["last_checkpoint"] = ckpt.last_model_path
        path = Path(log_dir) / "metrics.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        tmp.replace(path)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._write(trainer, "validate" if trainer.state.fn == "validate" else "fit")

    def on_fit_end(self, trainer, pl_module) -> None:
        self._write(trainer, "fit")

    def on_test_end(self, trainer, pl_module) -> None:
        self._write(trainer, "test")


class SaveOnSigterm(pl.Callback):
    """On SIGTERM (a scheduler's preemption notice, ``kill``), write ``last.ckpt`` before exiting.

    Lightning turns SIGTERM into an exception at the end of the current training step, on
    every rank; this callback then saves the run's ``last.ckpt`` (atomically), so the next
    ``tcplug fit ... --ckpt_path last`` continues from the very step the run was stopped at.
    """

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        from lightning.pytorch.callbacks import ModelCheckpoint
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if not isinstance(exception, SIGTERMException) or not trainer.training:
            return
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath:
                path = Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"
                trainer.save_checkpoint(path)
                if trainer.is_global_zero:
                    print(f"tcplug: SIGTERM at step {trainer.global_step}: saved {path}; resume with --ckpt_path last",
                          file=sys.stderr)
                return
