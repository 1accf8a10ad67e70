"""Errors as one line: what a jsonargparse parse error or a component's refusal becomes."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

from tcplug.recipe import component_error  # noqa: F401 (part of this room's messages)

_NOISE = ("Given value", "Errors:", "Subtypes:", "Does not validate against any of the Union subtypes",
          "Expected a <class 'NoneType'>", "Expected a <class 'list'>", "Problem with given class_path")


def _accepted(path: str) -> list[str]:
    """The init arguments of the class at import path ``path`` (empty if it cannot be imported)."""
    import importlib
    import inspect

    try:
        module, _, name = path.rpartition(".")
        return [p for p in inspect.signature(getattr(importlib.import_module(module), name)).parameters
                if p not in ("self", "args", "kwargs")]
    except Exception:  # noqa: BLE001 - the hint is optional
        return []


def parse_error(message: str, options: Sequence[str] = (), subcommand: str = "") -> str:
    """A jsonargparse error as one line: where, what was wrong, and the closest valid name when a
    component, an option (among ``options``, the command's) or an argument was misspelt."""
    tail = f" (`tcplug {subcommand} --help` lists every option)"
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
        params = _accepted(path)
        close = difflib.get_close_matches(option, params, n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else f" It takes: {', '.join(params)}." if params else ""
        return f"{prefix}{path.rsplit('.', 1)[-1]} takes no argument '{option}'.{hint}"
    # an option the command does not have
    m = re.search(r"unrecognized arguments: (--[\w.\-]+)", message)
    if m:
        key = m.group(1).split("=")[0]
        close = difflib.get_close_matches(key, sorted(set(options)), n=1, cutoff=0.6)
        return f"unrecognized option {key}." + (f" Did you mean {close[0]}?" if close else "") + tail
    lines = [re.sub(r'^Parser key "[^"]+":\s*', "", ln.strip().lstrip("- ").strip()) for ln in message.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith(_NOISE)]
    detail = lines[0] if lines else message.strip().splitlines()[0]
    return f"{prefix}{detail}"[:400] + tail


def describe(exc: BaseException) -> tuple[str, int]:
    """``(one line, exit status)`` for an error that is not tcplug's own: the file and what went
    wrong for an ``OSError`` (a full disk, a read-only folder, a missing permission), the keys for
    a checkpoint whose weights do not fit the model, the type and message for anything else
    (``TCPLUG_DEBUG=1`` shows where it happened)."""
    if isinstance(exc, OSError):
        where = f" {exc.filename}" if exc.filename else ""
        return f"cannot use{where}: {exc.strerror or exc}", 1
    text = str(exc)
    if isinstance(exc, RuntimeError) and "Error(s) in loading state_dict" in text:
        missing = re.findall(r'Missing key\(s\) in state_dict: ((?:"[^"]+"(?:, )?)+)', text)
        unexpected = re.findall(r'Unexpected key\(s\) in state_dict: ((?:"[^"]+"(?:, )?)+)', text)
        shapes = re.findall(r"size mismatch for ([\w.]+): copying a param with shape (torch.Size\(\[[^\]]*\]\)) "
                            r"from checkpoint, the shape in current model is (torch.Size\(\[[^\]]*\]\))", text)
        parts = []
        if missing:
            keys = missing[0].split(", ")
            parts.append(f"{len(keys)} weight(s) missing from it (e.g. {keys[0]})")
        if unexpected:
            keys = unexpected[0].split(", ")
            parts.append(f"{len(keys)} it has that the model does not (e.g. {keys[0]})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape (e.g. {shapes[0][0]}: {shapes[0][1]} there, {shapes[0][2]} here)")
        return ("the checkpoint's weights do not fit this model: " + "; ".join(parts or [text.splitlines()[0]]) +
                ". Was it made with another recipe? (the recipe it was made with is inside it)"), 2
    first = text.strip().splitlines()[0] if text.strip() else ""
    return (f"{type(exc).__name__}: {first[:300]} (unexpected: TCPLUG_DEBUG=1 shows where it happened; please "
            "report it)"), 1


def closest(name: str, choices: Sequence[str]) -> str:
    """`` Did you mean 'x'?`` for the closest of ``choices`` (empty if none is close)."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


__all__ = ["closest", "component_error", "describe", "parse_error"]
