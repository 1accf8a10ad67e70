"""The ``tcplug`` command: LightningCLI (fit/validate/test/predict), tcplug's own subcommands
(one module each in this package), and the subcommands plugins add
(:func:`~tcplug.hookspecs.tcplug_register_commands`).

Dispatch imports only what the command asks for: ``tcplug --help`` loads the plugins to list
their commands and imports neither Lightning nor the components' heavy dependencies.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

from tcplug.errors import TcplugError

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")

#: tcplug's own subcommands: name -> (module with ``main(argv) -> int``, help)
COMMANDS: dict[str, tuple[str, str]] = {
    "plugins": ("tcplug.cli.plugins", "list plugins, their versions, commands and components per kind"),
    "data": ("tcplug.cli.data", "synth | ingest | encode | inspect webdataset shards"),
    "sample": ("tcplug.cli.sample", "sample a long video from a checkpoint, chunk by chunk (streaming K/V buffer)"),
    "export": ("tcplug.cli.export", "write a checkpoint's LoRA adapters in the model family's format (--lora OUT)"),
    "plan": ("tcplug.cli.plan", "estimate a recipe's training memory on the meta device; --gpu-memory 24GB: "
                                "does it fit, which lever to pull"),
    "score": ("tcplug.cli.score", "metrics of video files: TVS, warping error, flicker, coverage; motion, "
                                  "sharpness, frame distance against --reference"),
}

USAGE = """usage: tcplug SUBCOMMAND [options]

Training (LightningCLI; `tcplug SUBCOMMAND --help` for every option):
  fit          train a recipe:  tcplug fit --config recipes/full.yaml
  validate     run validation of a recipe/checkpoint
  test         run the test loop
  predict      run prediction
Other:
{extras}
Recipes take several --config files (a recipe may name the recipes it extends with `base:`),
dotted overrides (--model.lr=1e-4), --print_config, and registry names for components
(class_path: per_frame).
"""


def _plugin_commands():
    from tcplug.plugins import plugin_commands

    return plugin_commands(reserved=(*LIGHTNING_SUBCOMMANDS, *COMMANDS))


def usage() -> str:
    lines = [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    plugin = _plugin_commands()
    if plugin:
        lines += ["From plugins:"] + [f"  {name:<12} {c.help} ({c.plugin})" for name, c in plugin.items()]
    return USAGE.format(extras="\n".join(lines))


def dispatch(argv: list[str]) -> int:
    """Run the subcommand ``argv[0]`` with the rest of ``argv``."""
    name = argv[0]
    if name in LIGHTNING_SUBCOMMANDS:
        from tcplug.cli.argv import prepare

        argv = prepare(argv)  # recipe files read and merged before Lightning is imported
        from tcplug.cli.lightning import run

        run(argv)
        return 0
    if name in COMMANDS:
        return importlib.import_module(COMMANDS[name][0]).main(argv[1:])
    plugin = _plugin_commands()
    if name in plugin:
        return int(plugin[name].run(argv[1:]) or 0)
    from tcplug.cli.messages import closest

    known = [*LIGHTNING_SUBCOMMANDS, *COMMANDS, *plugin]
    raise TcplugError(f"unknown command {name!r}.{closest(name, known)} Commands: {', '.join(known)} "
                      "(`tcplug --help` says what each does)")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from tcplug import __version__

        print(f"tcplug {__version__}")
        return 0
    try:
        return dispatch(argv)
    except TcplugError as exc:
        if os.environ.get("TCPLUG_DEBUG", "") not in ("", "0"):
            raise
        text = str(exc)
        if "Original Traceback" in text:  # raised in a data-loader worker: torch wraps it in the worker's traceback
            text = " ".join(text.split("TcplugError: ")[-1].split())
        print(f"tcplug: error: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tcplug: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:  # Lightning's SIGTERMException after the last checkpoint was written
        if type(exc).__name__ == "SIGTERMException":
            return 143
        raise
    except Exception as exc:  # the one error boundary: one line, the traceback with TCPLUG_DEBUG=1
        if os.environ.get("TCPLUG_DEBUG", "") not in ("", "0"):
            raise
        from tcplug.cli.messages import describe

        message, status = describe(exc)
        print(f"tcplug: error: {message}", file=sys.stderr)
        return status


def console_main() -> None:
    """Console-script entry point."""
    sys.exit(main())


__all__ = ["COMMANDS", "LIGHTNING_SUBCOMMANDS", "console_main", "dispatch", "main"]
