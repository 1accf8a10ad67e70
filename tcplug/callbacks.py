"""Callbacks the CLI adds to every run."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar
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
        path = Path(log_dir) / "metrics.json"
        if not metrics and path.exists():  # nothing new (a finished run resumed): keep what is there
            return
        payload = {"stage": stage, "epoch": trainer.current_epoch, "global_step": trainer.global_step,
                   "metrics": dict(sorted(metrics.items()))}
        ckpt = getattr(trainer, "checkpoint_callback", None)
        if ckpt is not None and getattr(ckpt, "last_model_path", ""):
            payload["last_checkpoint"] = ckpt.last_model_path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        tmp.replace(path)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._write(trainer, "validate" if trainer.state.fn == "validate" else "fit")

    def on_fit_start(self, trainer, pl_module) -> None:
        self._steps_here = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._steps_here = getattr(self, "_steps_here", 0) + 1

    def on_fit_end(self, trainer, pl_module) -> None:
        self._write(trainer, "fit")
        if getattr(self, "_steps_here", 0) == 0 and trainer.global_step > 0 and trainer.is_global_zero:
            print(f"tcplug: this run had already reached step {trainer.global_step} (trainer.max_steps="
                  f"{trainer.max_steps}): nothing was trained; raise --trainer.max_steps to continue it",
                  file=sys.stderr)
        self._summary(trainer, trainer.log_dir)  # log_dir is a collective under DDP: every rank reads it

    @rank_zero_only
    def _summary(self, trainer: pl.Trainer, log_dir: str | None) -> None:
        """The run's outcome in a few lines: folder, checkpoint, samples, final metrics."""
        if log_dir is None or trainer.sanity_checking:
            return
        run = Path(log_dir)
        lines = [f"tcplug: run finished at step {trainer.global_step} — {run}"]
        last = last_checkpoint(trainer)
        if last is not None and last.is_file():
            step = saved_step(trainer, last)
            lines.append(f"  checkpoint  {last}" + (f" (step {step})" if step is not None else ""))
        samples = sorted((run / "samples").glob("*.mp4")) if (run / "samples").is_dir() else []
        if samples:
            lines.append(f"  samples     {samples[-1]} ({len(samples)} in {run / 'samples'})")
        values = {k: float(v) for k, v in trainer.callback_metrics.items()}
        shown = [k for k in ("val/loss", "val/tvs", "val/tvs_data", "val/motion_ratio", "val/sharpness_ratio",
                             "val/frame_distance") if k in values]
        if shown:
            counts = f" (last validation: {values['val/clips']:.0f} sampled clip(s) vs {values['val/reference_clips']:.0f} " \
                     "reference clip(s))" if "val/clips" in values else ""
            lines.append("  metrics     " + "  ".join(f"{k.removeprefix('val/')}={values[k]:.4g}" for k in shown) + counts)
        lines.append(f"  all metrics {run / 'metrics.json'}; TensorBoard: tensorboard --logdir {run.parent}")
        print("\n".join(lines), file=sys.stderr, flush=True)

    def on_test_end(self, trainer, pl_module) -> None:
        self._write(trainer, "test")


def last_checkpoint(trainer: pl.Trainer) -> Path | None:
    """Where the run's ``last.ckpt`` goes (None without a ModelCheckpoint that saves one)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath:
            return Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"
    return None


def save_last(trainer: pl.Trainer, path: Path) -> None:
    """Write ``last.ckpt`` now, telling the ModelCheckpoint first that it is its last one (so a later
    save of its own, in this run or in the run resumed from it, overwrites it rather than writing
    ``last-v1.ckpt`` beside it: the callback's state is part of the checkpoint)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.save_last:
            cb.last_model_path = str(path)
    trainer.save_checkpoint(path, weights_only=False)


def saved_step(trainer: pl.Trainer, path: Path | None) -> int | None:
    """The step the checkpoint at ``path`` holds, as tcplug's checkpoint IO wrote it (None if unknown)."""
    steps = getattr(trainer.strategy.checkpoint_io, "saved_steps", None)
    return None if path is None or steps is None else steps.get(str(path))


class SaveOnSigterm(pl.Callback):
    """``last.ckpt`` tells the truth about where a run stopped.

    - When training ends, ``last.ckpt`` holds the final step (a ``checkpoint.every_n_train_steps``
      that does not divide ``max_steps`` would leave an earlier one), written at the end of the last
      epoch, before the EMA callback copies its average into the model.
    - On SIGTERM (a scheduler's preemption notice, ``kill``) Lightning stops at the end of the
      current step on every rank; this callback saves ``last.ckpt`` there, so ``--ckpt_path last``
      continues from the very step the run was stopped at.
    - On Ctrl-C it says where the last checkpoint is and how to resume.
    """

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        done = (trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps) or trainer.should_stop or (
            trainer.max_epochs is not None and trainer.max_epochs > 0 and trainer.current_epoch + 1 >= trainer.max_epochs)
        path = last_checkpoint(trainer)
        if not done or path is None or trainer.sanity_checking:
            return
        # rank 0 wrote the checkpoints: its answer decides, on every rank (the save is a collective)
        if trainer.strategy.broadcast(saved_step(trainer, path) != trainer.global_step):
            save_last(trainer, path)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        """SIGTERM received: save here, at the end of the step, as ModelCheckpoint saves. (On an
        epoch's last step Lightning stops only after the validation and the epoch's end that
        follow: a scheduler's grace period may end first.)"""
        sigterm = trainer.received_sigterm
        if trainer.world_size > 1:  # every rank takes the same decision: the save is a collective
            sigterm = trainer.strategy.reduce_boolean_decision(sigterm, all=False)
        path = last_checkpoint(trainer)
        if sigterm and path is not None and saved_step(trainer, path) != trainer.global_step:
            save_last(trainer, path)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        path = last_checkpoint(trainer)
        if path is None or not trainer.training:
            return
        if isinstance(exception, KeyboardInterrupt) and trainer.is_global_zero:
            step = saved_step(trainer, path)
            where = f"{path} (step {step})" if step is not None and path.is_file() else "none was written"
            print(f"tcplug: interrupted at step {trainer.global_step}; the last checkpoint: {where}. Resume with "
                  "--ckpt_path last", file=sys.stderr)
        if not isinstance(exception, SIGTERMException):
            return
        if trainer.strategy.broadcast(saved_step(trainer, path) != trainer.global_step):
            save_last(trainer, path)
        if trainer.is_global_zero:
            print(f"tcplug: SIGTERM at step {trainer.global_step}: saved {path}; resume with --ckpt_path last",
                  file=sys.stderr)


class RunProgressBar(TQDMProgressBar):
    """One training bar for the whole run: steps done of ``trainer.max_steps`` with an ETA (not
    per epoch: tcplug's epochs are a data-loading detail), the loss and the last validation's
    TVS beside it. Validation keeps its own short bar."""

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        bar = self.train_progress_bar
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        bar.reset(total=total)
        bar.n = trainer.global_step
        bar.set_description("train (steps)")
        bar.refresh()

    def on_train_epoch_start(self, trainer, *_) -> None:
        pass  # the default resets the bar at every epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        n = trainer.global_step
        if bar.disable or not (n % max(self.refresh_rate, 1) == 0 or n == bar.total):
            return
        bar.n = n
        bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
