"""The ``tcplug`` command: LightningCLI (fit/validate/test/predict) plus extra subcommands.

Recipes name components by registry name (``class_path: per_frame``) or by full import
path; OmegaConf interpolation (``${...}``) works inside recipes.
"""

from __future__ import annotations

import inspect
import json
import sys
from collections.abc import Callable, Sequence

from tcplug.errors import TcplugError

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


# ----- registry names inside jsonargparse ---------------------------------------------------
def _kind_for(cls: object) -> str | None:
    from tcplug.kinds import KINDS

    if not inspect.isclass(cls):
        return None
    for kind, base in KINDS.items():
        if cls is base:
            return kind
    return None


def install_registry_names() -> None:
    """Let jsonargparse resolve registry names (``per_frame``) wherever a kind is expected.

    jsonargparse resolves a dot-less ``class_path`` by class name among the imported
    subclasses of the annotated type. We put the registry in front of that lookup: a
    registry name of the annotated kind wins; a class name still works; anything else is
    an error listing the kind's components and the closest name.
    """
    from jsonargparse import _typehints

    original = _typehints.resolve_class_path_by_name
    if getattr(original, "_tcplug", False):
        return

    def resolve(cls, name):
        kind = _kind_for(cls) if isinstance(name, str) and "." not in name else None
        if kind is None:
            return original(cls, name)
        from tcplug.registry import get_registry

        registry = get_registry()
        found = registry.find(kind, name)
        if found is not None:
            return f"{found.__module__}.{found.__qualname__}"
        resolved = original(cls, name)
        if "." not in resolved:
            raise ValueError(registry.unknown_message(kind, name))
        return resolved

    resolve._tcplug = True  # type: ignore[attr-defined]
    _typehints.resolve_class_path_by_name = resolve


# ----- LightningCLI ---------------------------------------------------------------------------
def _make_cli_class():
    from lightning.pytorch.cli import LightningCLI

    from tcplug.callbacks import MetricsJson, SaveOnSigterm

    class TcplugCLI(LightningCLI):
        """LightningCLI with tcplug's defaults: a run folder under ``runs/``, ``last.ckpt``,
        ``metrics.json``, seed 0, OmegaConf interpolation in recipes."""

        def add_arguments_to_parser(self, parser) -> None:
            from lightning.pytorch.callbacks import ModelCheckpoint

            parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
            parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0})

        def parse_arguments(self, parser, args) -> None:
            """Parse errors as one line (and the closest valid option), not 100 lines of usage."""
            for p in [parser, *getattr(self, "_subcommand_parsers", {}).values()]:
                p.exit_on_error = False
            try:
                super().parse_arguments(parser, args)
            except Exception as exc:  # jsonargparse's ArgumentError
                if type(exc).__name__ != "ArgumentError":
                    raise
                raise TcplugError(parse_error(str(exc), parser, sys.argv[1:2])) from None

        def before_instantiate_classes(self) -> None:
            if self.subcommand:
                resolve_last_checkpoint(self.config[self.subcommand])

        def _parse_ckpt_path(self) -> None:
            # LightningCLI reads the checkpoint's hyperparameters before anything else: check it
            # first with tcplug's safe loader, so a bad file gets one clear line
            sub = self.config.get("subcommand")
            path = self.config[sub].get("ckpt_path") if sub else None
            if path and path not in ("last", "best", "hpc", "registry"):
                from tcplug.checkpoint import load_checkpoint

                load_checkpoint(path)
            super()._parse_ckpt_path()

        def instantiate_classes(self) -> None:
            try:
                super().instantiate_classes()
            except (ValueError, TypeError) as exc:  # a component refused its arguments
                raise TcplugError(component_error(exc)) from None
            check_shapes(self.model, self.datamodule)  # before any data is generated or weight moves
            cfg = self.config[self.subcommand] if self.subcommand else self.config
            # keep the resolved recipe with the model: it is saved inside every checkpoint
            self.model.tcplug_config = self._parser(self.subcommand).dump(cfg, skip_none=False, skip_validation=True)

        def instantiate_trainer(self, **kwargs):
            from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
            from lightning.fabric.utilities.exceptions import MisconfigurationException
            from lightning.pytorch.callbacks import ProgressBar

            from tcplug.callbacks import RunProgressBar
            from tcplug.checkpoint import AtomicCheckpointIO

            trainer_cfg = (self.config_init[self.subcommand] if self.subcommand else self.config_init).get("trainer", {})
            given = list(trainer_cfg.get("callbacks") or [])
            if trainer_cfg.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in given):
                kwargs["callbacks"] = given + [RunProgressBar()]  # steps of the whole run, with an ETA
            try:
                trainer = super().instantiate_trainer(**kwargs)
            except (ValueError, MisconfigurationException) as exc:  # settings that do not fit together
                raise TcplugError(f"trainer: {exc}") from None
            trainer.callbacks += [MetricsJson(), SaveOnSigterm()]
            logger = trainer.logger
            if logger is not None and getattr(logger, "log_dir", None) and trainer.world_size == 1:
                from pathlib import Path

                _NEW_RUN["dir"] = Path(logger.log_dir)
                _NEW_RUN["existed"] = _NEW_RUN["dir"].exists()
            if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # the default: make it atomic
                trainer.strategy.checkpoint_io = AtomicCheckpointIO()
            allow_unused_parameters(trainer, self.model)
            return trainer

    return TcplugCLI


_NOISE = ("Given value", "Errors:", "Subtypes:", "Does not validate against any of the Union subtypes",
          "Expected a <class 'NoneType'>", "Expected a <class 'list'>", "Problem with given class_path")


def parse_error(message: str, parser, subcommand: Sequence[str]) -> str:
    """A jsonargparse error as one line: where, what was wrong, and the closest valid name when a
    component, an option or an argument was misspelt."""
    import difflib
    import importlib
    import inspect
    import re

    sub = subcommand[0] if subcommand else ""
    tail = f" (`tcplug {sub} --help` lists every option)"
    keys = re.findall(r'Parser key "([^"]+)"', message)
    where = " -> ".join(dict.fromkeys(keys)) if keys else ""
    prefix = f"{where}: " if where else ""
    # a component name the registry does not know (its own message names the closest one)
    m = re.search(r"(unknown [\w ]+ '[^']*'\..*)", message)
    if m:
        return prefix + m.group(1).strip()
    # an argument the component does not take
    m = re.search(r"class_path '([\w.]+)'.*?Option '(\w+)' is not accepted", message, re.S)
    if m:
        path, option = m.groups()
        hint = ""
        try:
            module, _, name = path.rpartition(".")
            params = [p for p in inspect.signature(getattr(importlib.import_module(module), name)).parameters
                      if p not in ("self", "args", "kwargs")]
            close = difflib.get_close_matches(option, params, n=1, cutoff=0.5)
            hint = f" Did you mean '{close[0]}'?" if close else f" It takes: {', '.join(params)}."
        except Exception:  # noqa: BLE001 - the hint is optional
            pass
        return f"{prefix}{path.rsplit('.', 1)[-1]} takes no argument '{option}'.{hint}"
    # an option the command does not have
    m = re.search(r"unrecognized arguments: (--[\w.\-]+)", message)
    if m:
        key = m.group(1).split("=")[0]
        try:
            parser_ = parser._subcommands_action.choices[sub] if sub else parser  # noqa: SLF001
            options = sorted(set(re.findall(r"--[\w.\-]+", parser_.format_help())))
        except Exception:  # noqa: BLE001
            options = []
        close = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
        return f"unrecognized option {key}." + (f" Did you mean {close[0]}?" if close else "") + tail
    lines = [re.sub(r'^Parser key "[^"]+":\s*', "", ln.strip().lstrip("- ").strip()) for ln in message.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith(_NOISE)]
    detail = lines[0] if lines else message.strip().splitlines()[0]
    return f"{prefix}{detail}"[:400] + tail


def check_shapes(model, data) -> None:
    """The recipe's shapes fit together: clip length for the latent design (a video VAE takes
    ``c k + 1`` frames), frame size for the latent's downsampling times the backbone's patch
    size. Checked once the components exist and before the data is generated."""
    latent, backbone = model.latent, model.backbone
    frames, size = getattr(data, "frames", None), getattr(data, "size", None)
    if frames is not None:
        try:
            latent.latent_frames(frames)
        except TcplugError as exc:
            raise TcplugError(f"data.frames={frames}: {exc}") from None
    if size is not None:
        unit = int(latent.downsample) * int(getattr(backbone, "patch_size", 1) or 1)
        if size % unit:
            lo = max(unit, size // unit * unit)
            raise TcplugError(
                f"data.size={size} does not fit the model: the latent design ({type(latent).__name__}) downsamples "
                f"{latent.downsample}x and the backbone's patch_size is {backbone.patch_size}, so the frame size must be "
                f"a multiple of {unit} (e.g. {lo} or {lo + unit})"
            )


def component_error(exc: BaseException) -> str:
    """The message a component raised while jsonargparse built it (it wraps it in a ValueError
    listing every type of a Union it tried)."""
    chain, e = [], exc
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        if isinstance(e, TcplugError):
            return str(e)
    text = str(exc)
    if "Errors:" in text:
        for line in text.split("Errors:", 1)[1].splitlines():
            line = line.strip()
            if line.startswith("- ") and not line.startswith("- Expected a"):
                return line[2:]
    return text.splitlines()[0] if text else type(exc).__name__


def allow_unused_parameters(trainer, model) -> None:
    """Under plain ``--trainer.strategy=ddp``, let DDP tolerate parameters a step leaves unused
    when the model has them: experts the router did not pick, a discriminator trained in its
    own step, adapters of an absent input. Without it DDP stops at the first such step; an
    explicit ``find_unused_parameters`` from the user is kept."""
    from lightning.pytorch.strategies import DDPStrategy

    strategy = trainer.strategy
    if not isinstance(strategy, DDPStrategy) or "find_unused_parameters" in strategy._ddp_kwargs:
        return
    if model.router is not None or model.discriminator is not None or len(model.conditioners) \
            or model.motion_lock is not None:
        strategy._ddp_kwargs["find_unused_parameters"] = True


def _class_of(path: str | None):
    """The class a ``class_path`` names (a registry name or an import path), or None."""
    if not path:
        return None
    import importlib

    from tcplug.kinds import KINDS
    from tcplug.registry import get_registry

    for kind in KINDS:
        found = get_registry().find(kind, str(path))
        if found is not None:
            return found
    module, _, name = str(path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except Exception:  # noqa: BLE001
        return None


def reset_replaced_components(argv: Sequence[str]) -> list[str]:
    """A component replaced on the command line starts from its own defaults.

    ``--config full.yaml --model.backbone.init_args.attention=temporal`` swaps ``cross_frame`` for
    ``temporal``; jsonargparse would keep every recipe setting the new class also accepts
    (``window: 2``, meant for ``cross_frame``). Here each such setting is reset to the new class's
    default (the replacing argument becomes ``--key={"class_path": ..., "init_args": {defaults}}``,
    so ``--print_config`` shows it and later arguments still win), and a line says which were
    reset. Returns the new argv.
    """
    import inspect
    import json

    import yaml

    items = list(argv)
    configs, sets = [], []
    for i, arg in enumerate(items):
        if not arg.startswith("--"):
            continue
        key, eq, value = arg[2:].partition("=")
        if not eq and i + 1 < len(items) and not items[i + 1].startswith("--"):
            value = items[i + 1]
        if key == "config":
            configs.append(value)
        elif value and not value.lstrip().startswith(("{", "[")):
            sets.append((i, key.removesuffix(".class_path"), value))
    if not sets or not configs:
        return items
    recipe: dict = {}
    for path in configs:
        try:
            with open(path) as f:
                _merge(recipe, yaml.safe_load(f) or {})
        except Exception:  # noqa: BLE001 - the parser reports unreadable recipes itself
            return items
    replace: dict[int, str] = {}
    for index, key, value in sets:
        before = recipe
        for part in key.split("."):
            before = before.get(part) if isinstance(before, dict) else None
        if not isinstance(before, dict) or "class_path" not in before:
            continue
        old_cls, new_cls = _class_of(before["class_path"]), _class_of(value)
        if old_cls is None or new_cls is None or old_cls is new_cls:
            continue
        later = {a[2:].split("=")[0] for a in items[index + 1:] if a.startswith(f"--{key}.")}
        params = inspect.signature(new_cls.__init__).parameters
        reset = []
        for name, old_value in (before.get("init_args") or {}).items():
            p = params.get(name)
            if p is None or p.default is inspect.Parameter.empty:
                continue
            if {f"{key}.init_args.{name}", f"{key}.{name}"} & later:
                continue
            reset.append((name, p.default))
            print(f"tcplug: --{key}={value} replaces the recipe's {old_cls.__name__}: {name}={old_value!r} from the "
                  f"recipe is reset to {new_cls.__name__}'s default {p.default!r} (set it after --{key} to change it)",
                  file=sys.stderr)
        if reset:  # the dict form makes jsonargparse take these values instead of the recipe's
            replace[index] = f"--{key}=" + json.dumps({"class_path": value, "init_args": dict(reset)})
    out, skip = [], False
    for i, arg in enumerate(items):
        if skip:
            skip = False
            continue
        if i in replace:
            out.append(replace[i])
            skip = "=" not in arg  # the value was the next item
        else:
            out.append(arg)
    return out


def _merge(into: dict, data: dict) -> None:
    for k, v in data.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict) and v.get("class_path") in (None, into[k].get("class_path")):
            _merge(into[k], v)
        else:
            into[k] = v


def resolve_last_checkpoint(cfg) -> None:
    """``--ckpt_path last``: resume the newest run folder of this recipe's logger, in place.

    Lightning looks for ``last.ckpt`` only in the *new* run's folder (an empty
    ``version_N+1``); here ``last`` becomes the newest ``runs/<name>/version_*/checkpoints/
    last.ckpt`` and the logger continues writing into that folder, so a resumed run keeps one
    folder. Without any ``last.ckpt`` the run starts fresh (with a message).
    """
    import re
    from pathlib import Path

    logger = cfg.get("trainer", {}).get("logger")
    if isinstance(logger, list):
        logger = logger[0] if logger else None
    args = logger.get("init_args", {}) if hasattr(logger, "get") else {}
    path = cfg.get("ckpt_path")
    if path and path != "last" and args.get("version") is None:
        # validate/test/predict (or a resume) of a checkpoint inside a run folder write into that
        # folder instead of opening a new version_N each time
        ckpt = Path(path).resolve()
        m = re.fullmatch(r"version_(\d+)", ckpt.parent.parent.name) if ckpt.parent.name == "checkpoints" else None
        save_dir, name = args.get("save_dir"), args.get("name")
        if m and save_dir and name is not None and ckpt.parent.parent.parent == Path(save_dir, name).resolve():
            args["version"] = int(m.group(1))
    if path != "last":
        return
    save_dir, name = args.get("save_dir"), args.get("name")
    if not save_dir or name is None:
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


TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "tcplug"},
    },
    "log_every_n_steps": 10,
    "default_root_dir": "runs",
}


def run_lightning(argv: Sequence[str]) -> None:
    import warnings

    from tcplug.registry import get_registry

    # noise that is not the user's business: the iterable loader's length is exact by
    # construction (fixed epoch), and the pytree notice is Lightning's own deprecation.
    warnings.filterwarnings("ignore", message=r".*IterableDataset.*__len__.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    get_registry()  # load plugins so that their classes are importable subclasses
    install_registry_names()
    cli_cls = _make_cli_class()
    # LightningCLI reads sys.argv; DDP children are launched by re-running sys.argv, so it
    # must hold this very command (also when main() is called from Python with argv).
    argv = list(argv[:1]) + reset_replaced_components(argv[1:]) if argv else list(argv)
    saved, sys.argv = sys.argv, sys.argv[:1] + list(argv)
    try:
        _run(cli_cls, argv)
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


_NEW_RUN: dict = {}  # the run folder this process opened (single process), to remove it if it stays empty


def _drop_empty_run() -> None:
    """A run that failed before writing a checkpoint leaves no version_N folder behind."""
    import shutil

    run = _NEW_RUN.pop("dir", None)
    if run is None or _NEW_RUN.pop("existed", True) or not run.is_dir():
        return
    if not any(run.rglob("*.ckpt")):
        shutil.rmtree(run, ignore_errors=True)


def _run(cli_cls, argv: Sequence[str]) -> None:
    try:
        _run_cli(cli_cls, argv)
    except TcplugError:
        _drop_empty_run()
        raise
    finally:
        _NEW_RUN.clear()


def _run_cli(cli_cls, argv: Sequence[str]) -> None:
    from tcplug.data import VideoDataModule
    from tcplug.module import TCPlugModule

    cli_cls(
        TCPlugModule,
        VideoDataModule,
        seed_everything_default=0,
        trainer_defaults=TRAINER_DEFAULTS,
        parser_kwargs={"parser_mode": "omegaconf", "prog": "tcplug"},
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


# ----- extra subcommands --------------------------------------------------------------------
def cmd_plugins(argv: Sequence[str]) -> int:
    import argparse

    from tcplug.plugins import plugin_infos
    from tcplug.registry import get_registry

    parser = argparse.ArgumentParser(prog="tcplug plugins", description="List plugins and their components.")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(list(argv))
    registry = get_registry()
    infos = plugin_infos()
    if args.json:
        payload = {
            "plugins": [{"name": i.name, "version": i.version, "status": i.status, "error": i.error} for i in infos],
            "components": registry.as_dict(),
        }
        print(json.dumps(payload, indent=2))
        return 0
    print("plugins:")
    for i in infos:
        extra = f"  ({i.error})" if i.error else ""
        print(f"  {i.name:<28} {i.version or '-':<10} {i.status}{extra}")
    print("components:")
    for kind, comps in registry.as_dict().items():
        names = ", ".join(comps) or "-"
        print(f"  {kind:<14} {names}")
    return 0


def cmd_score(argv: Sequence[str]) -> int:
    import argparse

    from tcplug.metrics.score import (
        load_frames,
        load_reference,
        reference_suite,
        resize_frames,
        score_frames,
    )
    from tcplug.metrics.suite import DEFAULT_METRICS, NO_REFERENCE_METRICS

    parser = argparse.ArgumentParser(
        prog="tcplug score",
        description="Metrics of videos with optical flow estimated by OpenCV DIS: TVS in %, warping error, "
        "flicker, coverage; with --reference also motion_ratio, sharpness_ratio and frame_distance against "
        "real footage (a clip that does not move, is blurred or looks nothing like the reference is caught "
        "there, not by TVS). Exit status 1 if any file failed.")
    parser.add_argument("videos", nargs="+", metavar="VIDEO", help="mp4/gif/webm/... files or .npy (T, H, W, 3) arrays")
    parser.add_argument("--reference", metavar="REF", default=None,
                        help="reference footage: a video, a folder of videos, or webdataset shards")
    parser.add_argument("--metrics", default=None, metavar="A,B,...",
                        help="metric names (kind 'metric', `tcplug plugins` lists them); default: "
                        f"{', '.join(DEFAULT_METRICS)} with --reference, else those needing no reference")
    parser.add_argument("--json", action="store_true", help="one JSON object per file")
    parser.add_argument("--size", type=int, default=None, help="resize frames (and the reference) to SIZE x SIZE first")
    parser.add_argument("--max-frames", type=int, default=None, help="score only the first N frames")
    parser.add_argument("--flow", default="medium", choices=["ultrafast", "fast", "medium"], help="DIS preset")
    args = parser.parse_intermixed_args(list(argv))
    names = [n.strip() for n in args.metrics.split(",") if n.strip()] if args.metrics else None
    if names is None:
        names = list(DEFAULT_METRICS if args.reference else NO_REFERENCE_METRICS)
    # an unreadable reference stops the command (exit 2); a bad video only fails its own line
    reference = load_reference(args.reference, args.max_frames) if args.reference else None
    failed = 0
    suites: dict[tuple[int, int], object] = {}  # one suite per frame size, fed with the resized reference
    for path in args.videos:
        try:
            frames = load_frames(path, args.size, args.max_frames)
            if len(frames) < 2:
                raise TcplugError(f"{path}: need at least 2 frames, got {len(frames)}")
            size = tuple(frames.shape[1:3])
            if size not in suites:
                ref = [resize_frames(c, *size) for c in reference] if reference is not None else None
                suites[size] = reference_suite(names, ref, args.flow)
            result = {"path": str(path), "frames": int(len(frames)),
                      **score_frames(frames, args.flow, progress=sys.stderr.isatty() or len(frames) > 64,
                                     suite=suites[size])}
        except TcplugError as exc:
            failed += 1
            print(f"tcplug score: error: {exc}", file=sys.stderr)
            continue
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            values = " ".join(f"{k}={_fmt(k, v)}" for k, v in result.items() if k not in ("path", "frames"))
            print(f"{path}: frames={result['frames']} {values}", flush=True)
    return 1 if failed else 0


def _fmt(name: str, value: float) -> str:
    return f"{value:.3f}%" if name == "tvs" else f"{value:.4g}"


def cmd_data(argv: Sequence[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="tcplug data", description="Make, ingest and inspect webdataset shards.")
    sub = parser.add_subparsers(dest="action", required=True)
    synth = sub.add_parser("synth", help="write the synthetic world (exact flow, depth, keypoints, state) as shards")
    synth.add_argument("--out", required=True)
    synth.add_argument("--clips", type=int, default=256)
    synth.add_argument("--frames", type=int, default=8)
    synth.add_argument("--size", type=int, default=32)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--shapes", type=int, default=2)
    synth.add_argument("--gravity", type=float, default=0.0, help="pixels/frame^2 (rounded)")
    synth.add_argument("--format", choices=["npy", "mp4"], default="npy", help="frames as exact npy or mp4")
    synth.add_argument("--shard-size", type=int, default=64, help="clips per shard")
    synth.add_argument("--world", choices=["simple", "textured"], default="simple",
                       help="difficulty: smooth background and flat shapes, or textured ones")
    ing = sub.add_parser("ingest", help="real videos -> clips with estimated flow and occlusion")
    ing.add_argument("videos", nargs="+", metavar="VIDEO")
    ing.add_argument("--out", required=True)
    ing.add_argument("--frames", type=int, default=8)
    ing.add_argument("--size", type=int, default=64)
    ing.add_argument("--stride", type=int, default=1, help="take every STRIDE-th source frame")
    ing.add_argument("--format", choices=["npy", "mp4"], default="npy")
    ing.add_argument("--shard-size", type=int, default=64)
    enc = sub.add_parser("encode", help="precompute a recipe's VAE latents and text embeddings into new shards")
    enc.add_argument("--config", action="append", required=True, metavar="RECIPE",
                     help="the recipe whose latent design and conditioners encode (repeat to overlay)")
    enc.add_argument("--shards", required=True, help="input shards (a folder, a tar, or a brace pattern)")
    enc.add_argument("--out", required=True, help="output folder (finished shards there are skipped: resumable)")
    enc.add_argument("--batch-size", type=int, default=4)
    enc.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="stored precision")
    enc.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    enc.add_argument("--rank", type=int, default=None, help="this process's rank (default: $RANK or 0)")
    enc.add_argument("--world", type=int, default=None, help="number of processes (default: $WORLD_SIZE or 1)")
    ins = sub.add_parser("inspect", help="clip count, keys, shapes, unreadable samples")
    ins.add_argument("dir")
    ins.add_argument("--json", action="store_true")
    args = parser.parse_args(list(argv))

    if args.action == "synth":
        from tqdm.auto import tqdm

        from tcplug.data.shards import encode_sample, write_shards
        from tcplug.data.synthetic import make_clip

        if args.clips < 1 or args.frames < 2 or args.size < 8:
            raise TcplugError("need --clips >= 1, --frames >= 2, --size >= 8")
        samples = (encode_sample(f"clip{i:07d}", make_clip(args.seed, i, args.frames, args.size, args.shapes,
                                                           args.gravity, world=args.world), args.format,
                                 {"source": "synthetic", "seed": args.seed, "index": i})
                   for i in tqdm(range(args.clips), desc="synth", unit="clip"))
        shards = write_shards(args.out, samples, maxcount=args.shard_size)
        print(f"wrote {args.clips} clips in {len(shards)} shard(s) to {args.out}")
        return 0
    if args.action == "encode":
        import os

        from tcplug.data.encode import encode_shards

        rank = args.rank if args.rank is not None else int(os.environ.get("RANK", 0))
        world = args.world if args.world is not None else int(os.environ.get("WORLD_SIZE", 1))
        if not 0 <= rank < world or args.batch_size < 1:
            raise TcplugError(f"need 0 <= --rank < --world and --batch-size >= 1 (got rank {rank}, world {world})")
        if args.device is None:
            import torch

            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        report = encode_shards(args.config, args.shards, args.out, args.batch_size, args.dtype, rank, world,
                               args.device)
        for bad in report["bad"]:
            print(f"  BAD {bad['shard']} key={bad.get('key')}: {bad['error']}")
        print(f"encoded {report['clips']} clips into {report['shards']} shard(s) in {args.out}"
              f" ({report['skipped_shards']} already done)")
        return 1 if report["bad"] else 0
    if args.action == "ingest":
        from tcplug.data.ingest import ingest

        count, errors = ingest(args.videos, args.out, args.frames, args.size, args.stride, args.shard_size,
                               args.format)
        print(f"wrote {count} clips to {args.out}; {len(errors)} file(s) failed")
        return 1 if count == 0 else 0
    from tcplug.data.shards import inspect_shards

    report = inspect_shards(args.dir)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{args.dir}: {report['shards']} shard(s), {report['clips']} readable clip(s)")
        for k, n in sorted(report["keys"].items()):
            shape = report["shapes"].get(k.split(".")[0] if k != "frames.npy" else "video")
            print(f"  {k:<14} {n:>6} sample(s)  {shape if shape else ''}")
        if report["shapes"].get("video"):
            print(f"  video (decoded) {report['shapes']['video']}")
        for bad in report["bad"]:
            print(f"  BAD {bad['shard']} key={bad['key']}: {bad['error']}")
    return 1 if report["bad"] else 0


def instantiate_recipe(cfg: dict, sections: Sequence[str] = ("model",)):
    """Build the ``model`` (and, if asked, ``data``) sections of a resolved recipe (what
    ``--print_config`` writes and every checkpoint carries) as ``tcplug fit`` would; returns a
    namespace with one attribute per section."""
    from jsonargparse import ArgumentParser

    from tcplug.module import TCPlugModule
    from tcplug.registry import get_registry

    get_registry()
    install_registry_names()
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(TCPlugModule, "model", fail_untyped=False, sub_configs=True)
    if "data" in sections:
        from tcplug.data import VideoDataModule

        parser.add_class_arguments(VideoDataModule, "data", fail_untyped=False)
    return parser.instantiate_classes(parser.parse_object({s: cfg[s] for s in sections}))


def model_from_checkpoint(path: str):
    """Rebuild the ``TCPlugModule`` of a checkpoint from the recipe stored inside it."""
    import yaml

    from tcplug.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    text = ckpt.get("tcplug_config")
    if not text:
        raise TcplugError(f"{path}: no recipe inside (not written by `tcplug fit`)")
    cfg = yaml.safe_load(text)
    model = instantiate_recipe(cfg).model
    model.on_load_checkpoint(ckpt)  # weights left out because a model folder holds them
    model.load_state_dict(ckpt["state_dict"])
    model.tcplug_config = text
    return model.eval(), cfg


def _conditioning_batch(args, cfg: dict) -> dict | None:
    """What ``tcplug sample`` conditions on: a validation clip of the recipe's data, a caption,
    an initial object state (``state.json``)."""
    from pathlib import Path

    batch: dict = {}
    if args.clip is not None:
        from tcplug.data import VideoDataModule
        from tcplug.data.shards import slice_batch

        dm = VideoDataModule(**(cfg.get("data") or {}))
        dm.prepare_data()
        dm.setup("validate")
        seen = 0
        for b in dm.val_dataloader():
            n = b["video"].shape[0]
            if args.clip < seen + n:
                i = args.clip - seen
                batch = slice_batch(b, slice(i, i + 1))
                batch.pop("video")  # the clip's conditioning, not its pixels
                break
            seen += n
        else:
            raise TcplugError(f"--clip {args.clip}: the recipe's validation data has only {seen} clips")
    if args.caption is not None:
        batch["txt"] = [args.caption]
    if args.state is not None:
        try:
            batch["state"] = [json.loads(Path(args.state).read_text())]
        except (OSError, ValueError) as exc:
            raise TcplugError(f"--state {args.state}: not a readable JSON state ({exc})") from None
    if args.static_mask is not None:
        from tcplug.video import read_mask

        size = args.size or int((cfg.get("data") or {}).get("size", 32))
        batch["static"] = (read_mask(args.static_mask, (size, size)) >= 0.5).float()
    return batch or None


# what each conditioner reads at sampling, and the flags of `tcplug sample` that give it
_NEEDS = {"txt": "--caption TEXT", "state": "--state state.json", "depth": "--clip N", "skeleton": "--clip N",
          "static": "--static-mask IMAGE"}


def _check_conditions(model, args, batch: dict | None) -> None:
    """A conditioned model needs its conditions: name the flags that give the missing ones
    (and warn about a flag that the model does not read)."""
    from tcplug.registry import get_registry

    have = set(batch or {})
    missing: list[str] = []
    for c in model.conditioners:
        name = get_registry().name_of(type(c)) or type(c).__name__
        for need in getattr(c, "needs", ()):
            options = need.split("|")
            if not have & set(options):
                flags = " or ".join(_NEEDS.get(k, f"a batch with {k!r}") for k in options if k in _NEEDS) or \
                    f"a batch with {need!r}"
                missing.append(f"{name} needs {flags}")
    if missing:
        raise TcplugError(
            f"this model is conditioned: {'; '.join(missing)} (or --clip N takes every condition from validation "
            "clip N of the recipe's data; `state.json` is described in the CLI reference)")
    locker = getattr(model, "motion_lock", None)
    if args.static_mask is not None and (locker is None or get_registry().name_of(type(locker)) != "mask"):
        print("tcplug sample: --static-mask is ignored: this model's motion lock is not `mask`", file=sys.stderr)


def cmd_sample(argv: Sequence[str]) -> int:
    import argparse

    from tcplug.video import VideoWriter, to_uint8, write_video

    parser = argparse.ArgumentParser(
        prog="tcplug sample",
        description="Sample a video from a checkpoint. Models that can stream are sampled chunk by chunk "
        "with the K/V frame buffer (memory bounded by the attention window, not by the length); models "
        "with conditioners, experts or a motion lock are sampled all at once.")
    parser.add_argument("--ckpt", required=True, help="a checkpoint written by tcplug fit (its recipe is inside)")
    parser.add_argument("--frames", type=int, required=True, help="frames to generate")
    parser.add_argument("--out", required=True, help="output .mp4")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk", type=int, default=None, help="frames per chunk (default: the training clip length)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the recipe's)")
    parser.add_argument("--size", type=int, default=None, help="frame size (default: the recipe's)")
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--caption", default=None, help="caption, for a caption-conditioned model")
    parser.add_argument("--state", default=None, help="state.json: the initial object state (physics_state)")
    parser.add_argument("--clip", type=int, default=None,
                        help="condition on validation clip N of the recipe's data (its depth, skeleton, state, "
                        "static mask and caption)")
    parser.add_argument("--static-mask", default=None, metavar="IMAGE",
                        help="white = static: the mask a motion lock (mask) ties to the first frame")
    parser.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: "
                        "the recipe's model.guidance_scale)")
    args = parser.parse_args(list(argv))
    if args.frames < 1:
        raise TcplugError("--frames must be >= 1")
    from pathlib import Path

    if Path(args.out).suffix.lower() != ".mp4":
        if Path(args.out).suffix:
            raise TcplugError(f"--out {args.out}: tcplug sample writes .mp4 files; give a name ending in .mp4")
        args.out = f"{args.out}.mp4"
    model, cfg = model_from_checkpoint(args.ckpt)
    data = cfg.get("data") or {}
    chunk = args.chunk or int(data.get("frames", 8))
    size = args.size or int(data.get("size", 32))
    batch = _conditioning_batch(args, cfg)
    _check_conditions(model, args, batch)
    if model.can_stream:
        with VideoWriter(args.out, fps=args.fps) as writer:
            for video in model.stream(args.frames, size, size, chunk, steps=args.steps, seed=args.seed,
                                      progress=True):
                writer.write(to_uint8(video[0]))
        print(f"wrote {writer.frames} frames to {args.out}")
        return 0
    video = model.generate(1, args.frames, size, size, steps=args.steps, seed=args.seed, batch=batch,
                           progress=True, guidance_scale=args.guidance)
    write_video(to_uint8(video[0]), args.out, fps=args.fps)
    print(f"wrote {video.shape[1]} frames to {args.out}")
    return 0


def cmd_export(argv: Sequence[str]) -> int:
    import argparse

    from tcplug.lora import export_lora

    parser = argparse.ArgumentParser(
        prog="tcplug export", description="write a checkpoint's trained weights in the model family's own format")
    parser.add_argument("ckpt", help="a checkpoint of `tcplug fit` (e.g. RUN/checkpoints/last.ckpt)")
    parser.add_argument("--lora", metavar="OUT", required=True,
                        help="write the LoRA adapters to the folder OUT (e.g. what WanPipeline.load_lora_weights reads)")
    args = parser.parse_args(argv)
    model, _ = model_from_checkpoint(args.ckpt)
    if getattr(model, "lora", None) is None:
        raise TcplugError(f"{args.ckpt}: the recipe trained no LoRA adapters (model.lora is not set)")
    if len(model.experts) == 1:
        count = export_lora(model.backbone, args.lora)
        print(f"wrote {count} LoRA tensors to {args.lora}")
        return 0
    from pathlib import Path

    for i, expert in enumerate(model.experts):  # expert 0 takes the highest noise
        out = Path(args.lora) / f"expert_{i}"
        count = export_lora(expert, str(out))
        print(f"wrote {count} LoRA tensors of expert {i} to {out}")
    return 0


EXTRA_COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "plugins": (cmd_plugins, "list plugins, their versions and components per kind"),
    "data": (cmd_data, "synth | ingest | inspect webdataset shards"),
    "sample": (cmd_sample, "sample a long video from a checkpoint, chunk by chunk (streaming K/V buffer)"),
    "export": (cmd_export, "write a checkpoint's LoRA adapters in the model family's format (--lora OUT)"),
    "score": (cmd_score, "metrics of video files: TVS, warping error, flicker, coverage; motion, sharpness, frame distance against --reference"),
}

USAGE = """usage: tcplug SUBCOMMAND [options]

Training (LightningCLI; `tcplug SUBCOMMAND --help` for every option):
  fit          train a recipe:  tcplug fit --config recipes/full.yaml
  validate     run validation of a recipe/checkpoint
  test         run the test loop
  predict      run prediction
Other:
{extras}
Recipes take several --config files, dotted overrides (--model.lr=1e-4), --print_config,
and registry names for components (class_path: per_frame).
"""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        extras = "\n".join(f"  {name:<12} {help_}" for name, (_, help_) in EXTRA_COMMANDS.items())
        print(USAGE.format(extras=extras))
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from tcplug import __version__

        print(f"tcplug {__version__}")
        return 0
    try:
        if argv[0] in EXTRA_COMMANDS:
            return EXTRA_COMMANDS[argv[0]][0](argv[1:])
        run_lightning(argv)
        return 0
    except TcplugError as exc:
        print(f"tcplug: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tcplug: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:  # Lightning's SIGTERMException after the last checkpoint was written
        if type(exc).__name__ == "SIGTERMException":
            return 143
        raise


def console_main() -> None:
    """Console-script entry point."""
    sys.exit(main())
