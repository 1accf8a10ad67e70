"""Command-line rewriting before LightningCLI parses it: recipe files merged into one
(:func:`tcplug.recipe.merge_config_args`), and components replaced on the command line reset to
their own defaults (:func:`reset_replaced_components`)."""

from __future__ import annotations

import inspect
import json
import sys
from collections.abc import Sequence

from tcplug.recipe import class_of, merge_config_args, read_source


def _settings(items: list[str]) -> tuple[list[str], list[tuple[int, str, str]]]:
    """The ``--config`` values and the ``--key=value`` settings (index, key, value) of argv."""
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
    return configs, sets


def reset_replaced_components(argv: Sequence[str]) -> list[str]:
    """A component replaced on the command line starts from its own defaults.

    ``--config full.yaml --model.backbone.init_args.attention=temporal`` swaps ``cross_frame`` for
    ``temporal``; jsonargparse would keep every recipe setting the new class also accepts
    (``window: 2``, meant for ``cross_frame``). Here each such setting is reset to the new class's
    default (the replacing argument becomes ``--key={"class_path": ..., "init_args": {defaults}}``,
    so ``--print_config`` shows it and later arguments still win), and a line says which were
    reset. Returns the new argv.
    """
    items = list(argv)
    configs, sets = _settings(items)
    if not sets or not configs:
        return items
    from tcplug.recipe import merge

    recipe: dict = {}
    try:
        for source in configs:
            merge(recipe, read_source(source))
    except Exception:  # noqa: BLE001 - the parser reports unreadable recipes itself
        return items
    replace: dict[int, str] = {}
    for index, key, value in sets:
        before = recipe
        for part in key.split("."):
            before = before.get(part) if isinstance(before, dict) else None
        if not isinstance(before, dict) or "class_path" not in before:
            continue
        old_cls, new_cls = class_of(before["class_path"]), class_of(value)
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


def prepare(argv: Sequence[str]) -> list[str]:
    """A LightningCLI command line as tcplug hands it over: the subcommand, then the recipe files
    merged into one ``--config`` (a recipe error is raised here, before Lightning is imported) and
    components replaced on the command line reset to their defaults."""
    argv = list(argv)
    return argv[:1] + reset_replaced_components(merge_config_args(argv[1:])) if argv else argv


__all__ = ["prepare", "reset_replaced_components"]
