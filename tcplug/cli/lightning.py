"""``tcplug fit|validate|test|predict``: LightningCLI with tcplug's defaults.

A run folder under ``runs/`` with ``last.ckpt``, ``metrics.json`` and the samples; seed 0; one
merged recipe (:mod:`tcplug.recipe`); parse errors as one line; ``--ckpt_path last`` resumes the
newest run folder of the recipe in place; a run that fails before its first checkpoint leaves no
empty run folder behind.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from tcplug.cli.messages import component_error, parse_error
from tcplug.cli.resume import compare_with_checkpoint, reserve_run_folder, resolve_last_checkpoint
from tcplug.errors import TcplugError

SUBCOMMANDS = ("fit", "validate", "test", "predict")
TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "tcplug"},
    },
    "log_every_n_steps": 10,
    "default_root_dir": "runs",
}
#: strategies that become their ``find_unused_parameters=True`` variant for a model with parameters
#: a step may leave unused (experts, a discriminator, conditioners, a lock)
_UNUSED_TOLERANT = {"ddp": "ddp_find_unused_parameters_true", "ddp_spawn": "ddp_spawn_find_unused_parameters_true"}


class TcplugCLI(LightningCLI):
    """LightningCLI with tcplug's defaults: a run folder under ``runs/``, ``last.ckpt``,
    ``metrics.json``, seed 0, the checkpoint's recipe, clear errors."""

    def __init__(self, *args, **kwargs) -> None:
        self.option_parsers: list = []  # each subcommand's parser (for "did you mean" on a bad option)
        self.new_run: Path | None = None  # the run folder this process opened, if it did not exist
        try:
            super().__init__(*args, **kwargs)
        except Exception:  # not Ctrl-C or SIGTERM (SystemExit): such a run keeps what it wrote
            self._drop_empty_run()
            raise

    def add_arguments_to_parser(self, parser) -> None:
        from lightning.pytorch.callbacks import ModelCheckpoint

        self.option_parsers.append(parser)
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0})

    def parse_arguments(self, parser, args) -> None:
        """Parse errors as one line (and the closest valid option), not 100 lines of usage; a
        checkpoint to resume is read with tcplug's safe loader first, so a bad file gets one line."""
        try:
            super().parse_arguments(parser, args)
        except Exception as exc:  # jsonargparse's ArgumentError
            if type(exc).__name__ != "ArgumentError":
                raise
            sub = sys.argv[1] if len(sys.argv) > 1 else ""
            if re.search(r"required: [\w.]*model\.backbone", str(exc)):  # no model at all
                if not any(a == "--config" or a.startswith("--config=") for a in sys.argv):
                    raise TcplugError(f"tcplug {sub} needs a recipe: tcplug {sub} --config recipes/full.yaml (recipes/ "
                                      "holds one per technique; `tcplug fit --help` lists every option)") from None
                raise TcplugError("the recipe names no model.backbone: is it a base for other recipes rather "
                                  "than a recipe to run? (recipes/base.yaml is both)") from None
            options = sorted({o for p in self.option_parsers for o in re.findall(r"--[\w.\-]+", p.format_help())})
            raise TcplugError(parse_error(str(exc), options, sub)) from None
        sub = self.config.get("subcommand")
        path = self.config[sub].get("ckpt_path") if sub else None
        if path and path not in ("last", "best", "hpc", "registry"):
            from tcplug.checkpoint import load_checkpoint

            load_checkpoint(path)
        # the model the command line asks for, before LightningCLI puts a checkpoint's hyperparameters over it
        self.asked = self._dumped().get(sub, {}).get("model") or {} if path else {}

    def _dumped(self) -> dict:
        """The parsed configuration as plain data."""
        import yaml

        return yaml.safe_load(self.parser.dump(self.config, skip_none=False, skip_validation=True))

    def before_instantiate_classes(self) -> None:
        if not self.subcommand:
            return
        cfg = self.config[self.subcommand]
        resolve_last_checkpoint(cfg)
        path = cfg.get("ckpt_path")
        if self.subcommand == "fit" and path and Path(path).is_file():
            self._resume_settings(path)
        if not path:
            self.new_run = reserve_run_folder(cfg)
            if self.new_run is not None:  # processes a launcher starts (DDP) re-run this command line
                sys.argv.append(f"--trainer.logger.init_args.version={cfg['trainer']['logger']['init_args']['version']}")

    def _resume_settings(self, path: str) -> None:
        """A resumed run keeps its checkpoint's model and takes the settings it asks for (LightningCLI
        would put the checkpoint's over them without a word); a change a resume cannot make is an error."""
        from tcplug.checkpoint import load_checkpoint

        ckpt = load_checkpoint(path)
        changed = compare_with_checkpoint(self.asked, ckpt, path)
        merged = ckpt.get("hyper_parameters") or {}
        for key, (value, _) in changed.items():
            if key in merged:  # LightningCLI merged the checkpoint's value over the recipe's
                self.config[self.subcommand]["model"][key] = tuple(value) if isinstance(value, list) else value
        if changed:
            print(f"tcplug: resuming {path} with " + ", ".join(
                f"model.{k}={v!r} (the checkpoint's: {was!r})" for k, (v, was) in changed.items()), file=sys.stderr)

    def instantiate_classes(self) -> None:
        import yaml

        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as exc:  # a component refused its arguments
            raise TcplugError(component_error(exc)) from None
        data = self.datamodule  # the clip must fit the model before any data is generated or weight moves
        self.model.diffusion.check_clip(getattr(data, "frames", None), getattr(data, "size", None))
        # keep the resolved recipe with the model: it is saved inside every checkpoint
        dumped = yaml.safe_load(self.parser.dump(self.config, skip_none=False, skip_validation=True))
        self.model.tcplug_config = yaml.safe_dump(dumped[self.subcommand], sort_keys=False)

    def instantiate_trainer(self, **kwargs):
        from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
        from lightning.fabric.utilities.exceptions import MisconfigurationException
        from lightning.pytorch.callbacks import ProgressBar

        from tcplug.callbacks import MetricsJson, RunProgressBar, SaveOnSigterm
        from tcplug.checkpoint import AtomicCheckpointIO

        trainer_cfg = (self.config_init[self.subcommand] if self.subcommand else self.config_init).get("trainer", {})
        given = list(trainer_cfg.get("callbacks") or [])
        if trainer_cfg.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in given):
            kwargs["callbacks"] = given + [RunProgressBar()]  # steps of the whole run, with an ETA
        strategy = trainer_cfg.get("strategy")
        if isinstance(strategy, str) and strategy in _UNUSED_TOLERANT and self._has_conditional_parameters():
            kwargs["strategy"] = _UNUSED_TOLERANT[strategy]
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (ValueError, MisconfigurationException) as exc:  # settings that do not fit together
            raise TcplugError(f"trainer: {exc}") from None
        trainer.callbacks += [MetricsJson(), SaveOnSigterm()]
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # the default: make it atomic
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def _has_conditional_parameters(self) -> bool:
        """Parameters a step may leave unused: experts the router did not pick, a discriminator
        trained in its own step, adapters of an absent input. Plain DDP would stop at the first
        such step; an explicit strategy from the user is kept."""
        model = self.model.diffusion
        return model.router is not None or self.model.discriminator is not None or len(model.conditioners) > 0 \
            or model.motion_lock is not None

    def _drop_empty_run(self) -> None:
        """A run that failed before writing a checkpoint leaves no version_N folder behind."""
        import shutil

        if self.new_run is not None and self.new_run.is_dir() and not any(self.new_run.rglob("*.ckpt")):
            shutil.rmtree(self.new_run, ignore_errors=True)


def run(argv: Sequence[str]) -> None:
    """Run a Lightning subcommand: ``argv`` as :func:`tcplug.cli.argv.prepare` made it (``argv[0]``
    is ``fit``, ``validate``, ``test`` or ``predict``)."""
    from tcplug.data import VideoDataModule
    from tcplug.module import TCPlugModule
    from tcplug.recipe import install_registry_names

    quiet_dependencies()
    install_registry_names()
    # LightningCLI reads sys.argv; DDP children are launched by re-running sys.argv, so it
    # must hold this very command (also when main() is called from Python with argv).
    saved, sys.argv = sys.argv, sys.argv[:1] + list(argv)
    no_exit = {"exit_on_error": False}
    try:
        TcplugCLI(TCPlugModule, VideoDataModule, seed_everything_default=0, trainer_defaults=TRAINER_DEFAULTS,
                  parser_kwargs={"parser_mode": "omegaconf", "prog": "tcplug", **no_exit,
                                 **{sub: dict(no_exit) for sub in SUBCOMMANDS}},
                  save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False)
    finally:
        sys.argv = saved
        _close_process_group()


#: what Lightning says that is not the user's business (the run's own summary says what happened)
LIGHTNING_NOISE = (
    r"💡 Tip", r"^(GPU|TPU|HPU) available", r"^Seed set to", r"was configured so \d+ batch", r"^`Trainer\.fit` stopped",
    r"^You are using a CUDA device", r"LOCAL_RANK: \d+ - CUDA_VISIBLE_DEVICES",
)


class _Quiet:
    """A logging filter that drops Lightning's noise (:data:`LIGHTNING_NOISE`)."""

    def filter(self, record) -> bool:
        return not any(re.search(p, record.getMessage()) for p in LIGHTNING_NOISE)


def quiet_dependencies() -> None:
    """Filter the dependencies' noise: Lightning's tips and device lines, and warnings that say
    nothing to a tcplug user (the iterable loader's length is exact by construction, the logging
    interval is the recipe's, frozen components are in eval mode on purpose, a GAN's checkpoint is
    meant to hold the state after its step, the pytree notice is Lightning's own deprecation)."""
    import logging
    import warnings

    for name in ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero",
                 "lightning.fabric.utilities.rank_zero", "lightning.fabric.utilities.seed"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Quiet) for f in logger.filters):
            logger.addFilter(_Quiet())
    for message in (r".*IterableDataset.*__len__.*", r".*isinstance\(treespec, LeafSpec\).*",
                    r".*is smaller than the logging interval.*", r".*does not have many workers.*",
                    r".*module\(s\) in eval mode at the start of training.*",  # frozen VAEs and encoders, on purpose
                    r".*Using ModelCheckpoint with manual optimization and every_n_train_steps.*"):  # saved after the step: as meant
        warnings.filterwarnings("ignore", message=message)


def _close_process_group() -> None:
    """Tear the DDP process group down before the interpreter exits: a gloo group left to the
    interpreter's shutdown can abort the process ("terminate called without an active
    exception") after a run that succeeded."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


__all__ = ["SUBCOMMANDS", "TcplugCLI", "run"]
