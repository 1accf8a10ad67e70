"""Recipe files -> objects: registry names inside jsonargparse, and one way to read and merge
recipe files.

- **Registry names.** jsonargparse resolves a dot-less ``class_path`` by class name among the
  imported subclasses of the annotated type; :func:`install_registry_names` puts the registry in
  front of that lookup (through :func:`tcplug.compat.install_class_path_resolver`, the one patch of
  jsonargparse), so ``per_frame`` works wherever a kind is expected, class names and import paths
  still work, and an unknown name lists the kind's components and the closest one.
- **Recipe files.** :func:`load` reads recipe files in order, each after the recipes its ``base:``
  key names (paths relative to the file; a list for several), merges them (later wins; a
  component whose ``class_path`` changes is replaced as a whole, not merged with the old one's
  arguments) and resolves OmegaConf interpolation (``${data.frames}``, ``${oc.env:VAR}``) over the
  merged result. ``tcplug fit|validate|test|predict`` hands LightningCLI that one merged recipe
  (:func:`merge_config_args`), ``tcplug data encode`` reads the same, and nothing else merges.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tcplug.errors import TcplugError

BASE_KEY = "base"


# ----- registry names inside jsonargparse ---------------------------------------------------
def _resolve(original, cls, name):
    from tcplug.registry import get_registry, kind_of_base

    kind = kind_of_base(cls) if isinstance(name, str) and "." not in name else None
    if kind is None:
        return original(cls, name)
    registry = get_registry()
    found = registry.find(kind, name)
    if found is not None:
        return f"{found.__module__}.{found.__qualname__}"
    resolved = original(cls, name)
    if "." not in resolved:
        raise ValueError(registry.unknown_message(kind, name))
    return resolved


def install_registry_names() -> None:
    """Let jsonargparse resolve registry names (``per_frame``) wherever a kind is expected: a
    registry name of the annotated kind wins; a class name still works; anything else is an error
    listing the kind's components and the closest name."""
    from tcplug.compat import install_class_path_resolver
    from tcplug.registry import get_registry

    get_registry()  # plugins loaded: their classes are importable subclasses
    install_class_path_resolver(_resolve)


def class_of(path: str | None) -> type | None:
    """The class a ``class_path`` names (a registry name of any kind, or an import path), or None."""
    if not path:
        return None
    import importlib

    from tcplug.registry import KINDS, get_registry

    for kind in KINDS:
        found = get_registry().find(kind, str(path))
        if found is not None:
            return found
    module, _, name = str(path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except Exception:  # noqa: BLE001 - not importable: the parser reports it
        return None


# ----- reading and merging recipe files ------------------------------------------------------
def merge(into: dict, data: dict) -> dict:
    """Merge ``data`` into ``into`` in place (later wins): mappings merge key by key, except a
    component whose ``class_path`` changes, which is replaced as a whole; lists are replaced."""
    for k, v in data.items():
        old = into.get(k)
        if isinstance(v, dict) and isinstance(old, dict) and v.get("class_path") in (None, old.get("class_path")):
            merge(old, v)
        else:
            into[k] = v
    return into


def _parse(text: str, where: str) -> dict:
    """One recipe's YAML (OmegaConf's loader: ``1e-4`` is a float), interpolations kept."""
    import yaml
    from omegaconf import OmegaConf

    try:
        data = OmegaConf.to_container(OmegaConf.create(text), resolve=False) if text.strip() else {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise TcplugError(f"recipe {where}: not valid YAML{at}: {problem}") from None
    except Exception as exc:  # noqa: BLE001 - OmegaConf's own errors (a list at the top, ...)
        raise TcplugError(f"recipe {where}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise TcplugError(f"recipe {where}: a recipe is a mapping of sections (trainer, model, data), "
                          f"got a {type(data).__name__}")
    return data


def read(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """One recipe file with the recipes its ``base:`` names merged under it (interpolations kept)."""
    path = Path(path)
    if not path.is_file():
        raise TcplugError(f"recipe {path} does not exist")
    if path.resolve() in _seen:
        raise TcplugError(f"recipe {path}: its base: chain comes back to itself")
    data = _parse(path.read_text(), str(path))
    bases = data.pop(BASE_KEY, None) or []
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        target = path.parent / str(base)
        if not target.is_file():
            raise TcplugError(f"recipe {path}: its base {base} does not exist ({target})")
        merge(merged, read(target, (*_seen, path.resolve())))
    return merge(merged, data)


def resolve(cfg: dict, where: str) -> dict:
    """Resolve OmegaConf interpolation over a merged recipe."""
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.create(cfg), resolve=True)
    except Exception as exc:  # noqa: BLE001 - InterpolationKeyError, an unset ${oc.env:VAR}, ...
        detail = str(exc).splitlines()[0]
        raise TcplugError(f"recipe {where}: cannot resolve an interpolation: {detail}") from None


def load(sources: Sequence[str | Path]) -> dict:
    """Recipe files (or YAML texts) merged in order, each over its bases, interpolation resolved."""
    merged: dict = {}
    for source in sources:
        merge(merged, read_source(source))
    return resolve(merged, " + ".join(str(s) for s in sources))


def read_source(source: str | Path) -> dict:
    """A ``--config`` value: a recipe file, or a YAML text given in its place."""
    text = str(source)
    if "\n" in text or text.lstrip().startswith("{"):
        return _parse(text, "given on the command line")
    return read(text)


def merge_config_args(argv: Sequence[str]) -> list[str]:
    """``--config`` arguments replaced by one ``--config=<the merged recipe>`` where the first of
    them stood (every file read by :func:`load`); the other arguments keep their order, so they
    apply over the recipe as before."""
    items, configs, out, first = list(argv), [], [], None
    i = 0
    while i < len(items):
        arg = items[i]
        if arg == "--config" and i + 1 < len(items):
            configs.append(items[i + 1])
            i += 2
        elif arg.startswith("--config="):
            configs.append(arg.split("=", 1)[1])
            i += 1
        else:
            out.append(arg)
            i += 1
            continue
        if first is None:
            first = len(out)
    if not configs:
        return items
    import yaml

    merged = yaml.safe_dump(load(configs), sort_keys=False, allow_unicode=True)
    return out[:first] + [f"--config={merged}"] + out[first:]


# ----- building objects ----------------------------------------------------------------------
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


def instantiate(cfg: dict, classes: dict[str, type] | None = None, components: dict[str, Any] | None = None):
    """Build sections of a resolved recipe as ``tcplug fit`` does: ``classes`` maps a section to a
    class built from its init arguments (``{"model": TCPlugModule}``), ``components`` a section to
    a type of components built from a ``class_path`` spec (``{"latent": LatentDesign | None}``).
    Returns a namespace with one attribute per section."""
    from jsonargparse import ArgumentParser

    install_registry_names()
    parser = ArgumentParser(exit_on_error=False)
    for name, cls in (classes or {}).items():
        parser.add_class_arguments(cls, name, fail_untyped=False, sub_configs=True)
    for name, hint in (components or {}).items():
        parser.add_argument(f"--{name}", type=hint, default=None)
    missing = [name for name in classes or {} if name not in cfg]
    if missing:
        raise TcplugError(f"the recipe has no {', '.join(missing)} section")
    values = {name: cfg[name] for name in classes or {}}
    values.update({name: cfg.get(name) for name in components or {}})
    try:
        return parser.instantiate_classes(parser.parse_object(values))
    except (ValueError, TypeError) as exc:  # a component refused its arguments (jsonargparse wraps its error)
        raise TcplugError(component_error(exc)) from None


__all__ = ["install_registry_names", "instantiate", "load", "merge", "merge_config_args", "read"]
