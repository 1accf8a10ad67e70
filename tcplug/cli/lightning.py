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
        except TcplugError:
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
            options = sorted({o for p in self.option_parsers for o in re.findall(r"--[\w.\-]+", p.format_help())})
            raise TcplugError(parse_error(str(exc), options, sys.argv[1] if len(sys.argv) > 1 else "")) from None
        sub = self.config.get("subcommand")
        path = self.config[sub].get("ckpt_path") if sub else None
        if path and path not in ("last", "best", "hpc", "registry"):
            from tcplug.checkpoint import load_checkpoint

            load_checkpoint(path)

    def before_instantiate_classes(self) -> None:
        if self.subcommand:
            resolve_last_checkpoint(self.config[self.subcommand])

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
        logger = trainer.logger
        if logger is not None and getattr(logger, "log_dir", None) and trainer.world_size == 1:
            run = Path(logger.log_dir)
            self.new_run = None if run.exists() else run
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


def resolve_last_checkpoint(cfg) -> None:
    """``--ckpt_path last``: resume the newest run folder of this recipe's logger, in place.

    Lightning looks for ``last.ckpt`` only in the *new* run's folder (an empty
    ``version_N+1``); here ``last`` becomes the newest ``runs/<name>/version_*/checkpoints/
    last.ckpt`` and the logger continues writing into that folder, so a resumed run keeps one
    folder. Without any ``last.ckpt`` the run starts fresh (with a message). A checkpoint inside
    a run folder (validate/test/predict, or a resume) writes into that folder too.
    """
    logger = cfg.get("trainer", {}).get("logger")
    if isinstance(logger, list):
        logger = logger[0] if logger else None
    args = logger.get("init_args", {}) if hasattr(logger, "get") else {}
    path = cfg.get("ckpt_path")
    save_dir, name = args.get("save_dir"), args.get("name")
    if path and path != "last" and args.get("version") is None:
        ckpt = Path(path).resolve()
        m = re.fullmatch(r"version_(\d+)", ckpt.parent.parent.name) if ckpt.parent.name == "checkpoints" else None
        if m and save_dir and name is not None and ckpt.parent.parent.parent == Path(save_dir, name).resolve():
            args["version"] = int(m.group(1))
    if path != "last" or not save_dir or name is None:
        return  # no versioned run folder: let Lightning resolve it
    found = []
    for ckpt in Path(save_dir, name).glob("version_*/checkpoints/last.ckpt"):
        m = re.fullmatch(r"version_(\d+)", ckpt.parent.parent.name)
        if m:
            found.append((int(m.group(1)), ckpt))
    if not found:
        print(f"tcplug: no {save_dir}/{name}/version_*/checkpoints/last.ckpt to resume: starting fresh",
              file=sys.stderr)
        cfg["ckpt_path"] = None
        return
    version, ckpt = max(found)
    cfg["ckpt_path"] = str(ckpt)
    args["version"] = version
    print(f"tcplug: resuming {ckpt}", file=sys.stderr)


def run(argv: Sequence[str]) -> None:
    """Run a Lightning subcommand: ``argv`` as :func:`tcplug.cli.argv.prepare` made it (``argv[0]``
    is ``fit``, ``validate``, ``test`` or ``predict``)."""
    import warnings

    from tcplug.data import VideoDataModule
    from tcplug.module import TCPlugModule
    from tcplug.recipe import install_registry_names

    # noise that is not the user's business: the iterable loader's length is exact by
    # construction (fixed epoch), and the pytree notice is Lightning's own deprecation.
    warnings.filterwarnings("ignore", message=r".*IterableDataset.*__len__.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
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


__all__ = ["SUBCOMMANDS", "TcplugCLI", "resolve_last_checkpoint", "run"]
