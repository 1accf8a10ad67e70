"""The one plugin manager, loaded once.

Plugins are found through the entry-point group ``tcplug``. The entry points declared by
the ``tcplug`` distribution itself are the built-in plugins and are always loaded. Every
other entry point is a third-party plugin, loaded unless the ``TCPLUG_LOAD_PLUGINS``
environment variable is set: then only the comma-separated entry-point names it lists are
loaded (``TCPLUG_LOAD_PLUGINS=`` loads no third-party plugin).

A plugin that fails to import, or whose hook raises, never takes the tool down: a warning
names it and the error, and :func:`plugin_infos` reports it as ``failed``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from importlib.metadata import EntryPoint, entry_points

import pluggy

from tcplug import hookspecs

ENTRY_POINT_GROUP = "tcplug"
BUILTIN_DISTRIBUTION = "tcplug"
ENV_GATE = "TCPLUG_LOAD_PLUGINS"

pm = pluggy.PluginManager("tcplug")
pm.add_hookspecs(hookspecs)

_loaded = False


class PluginLoadWarning(UserWarning):
    """A plugin failed to import or to register its components."""


@dataclass
class PluginInfo:
    """What ``tcplug plugins`` reports about one plugin."""

    name: str
    version: str | None
    status: str  # "ok" | "failed"
    error: str | None = None
    module: str | None = None
    builtin: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


_infos: dict[str, PluginInfo] = {}


def _gate() -> set[str] | None:
    value = os.environ.get(ENV_GATE)
    if value is None:
        return None
    return {name.strip() for name in value.split(",") if name.strip()}


def _dist_of(ep: EntryPoint) -> tuple[str | None, str | None]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, None
    return dist.metadata["Name"], dist.version


class PluginFailed(Exception):
    """A plugin's import or hook raised (or exited); it is marked failed."""


@contextlib.contextmanager
def isolated(name: str):
    """Run a plugin's import or hook so that nothing it does takes the tool down: an exception or
    an exit (``sys.exit``, an ``argparse`` that parsed a command line) marks it failed and raises
    :class:`PluginFailed`; it sees no command line of tcplug's (``sys.argv`` is the program alone)."""
    import io

    saved, said = sys.argv, io.StringIO()
    sys.argv = saved[:1]
    try:
        with contextlib.redirect_stderr(said):  # what it prints is shown if it goes on, summed up if it fails
            yield
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - SystemExit included: a plugin must not end the tool
        if isinstance(exc, SystemExit):
            last = said.getvalue().strip().splitlines()[-1:] or [""]
            exc = RuntimeError(f"it exited (SystemExit: {exc.code}){': ' + last[0] if last[0] else ''}")
        mark_failed(name, exc)
        raise PluginFailed(name) from None
    else:
        sys.stderr.write(said.getvalue())
    finally:
        sys.argv = saved


def mark_failed(name: str, error: BaseException | str) -> None:
    """Record a plugin as failed and warn once, naming it and the error."""
    message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    info = _infos.get(name)
    if info is None:
        info = _infos[name] = PluginInfo(name=name, version=None, status="failed")
    info.status, info.error = "failed", message
    warnings.warn(f"tcplug plugin {name!r} failed to load: {message}", PluginLoadWarning, stacklevel=2)


def load_plugins() -> None:
    """Import every plugin once (built-ins always; third parties subject to the gate)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    gate = _gate()
    eps = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)
    seen: set[str] = set()
    for ep in eps:
        dist_name, version = _dist_of(ep)
        builtin = dist_name is not None and dist_name.lower() == BUILTIN_DISTRIBUTION
        # the same entry point may be listed twice (e.g. an editable install seen via two paths)
        if (ep.name, ep.value) in seen:
            continue
        seen.add((ep.name, ep.value))
        if not builtin and gate is not None and ep.name not in gate:
            continue
        name = ep.name if not builtin else f"tcplug.{ep.name}"
        _infos[name] = PluginInfo(name, version, "ok", module=ep.value, builtin=builtin)
        try:
            with isolated(name):
                plugin = ep.load()
        except PluginFailed:  # a broken plugin must never take the tool down
            continue
        try:
            pm.register(plugin, name=name)
        except Exception as exc:
            mark_failed(name, exc)


def register_plugin(plugin: object, name: str | None = None) -> str:
    """Register an in-process plugin (a module or object with hookimpls); returns its name.

    Useful in tests and notebooks. Undo with :func:`unregister_plugin`.
    """
    load_plugins()
    if isinstance(plugin, str):
        plugin = importlib.import_module(plugin)
    registered = pm.register(plugin, name=name)
    assert registered is not None
    module = getattr(plugin, "__name__", type(plugin).__name__)
    _infos[registered] = PluginInfo(registered, None, "ok", module=module)
    return registered


def unregister_plugin(name: str) -> None:
    """Remove a plugin registered with :func:`register_plugin`."""
    pm.unregister(name=name)
    _infos.pop(name, None)


def plugin_infos() -> list[PluginInfo]:
    """Every plugin seen so far, loaded or failed, built-ins first."""
    load_plugins()
    return sorted(_infos.values(), key=lambda i: (not i.builtin, i.name))


def get_plugin_manager() -> pluggy.PluginManager:
    """The plugin manager with every plugin loaded."""
    load_plugins()
    return pm


@dataclass
class Command:
    """A subcommand a plugin adds to ``tcplug`` (:func:`~tcplug.hookspecs.tcplug_register_commands`)."""

    name: str
    run: Callable[[list[str]], int]
    help: str
    plugin: str


def plugin_commands(reserved: Iterable[str] = ()) -> dict[str, Command]:
    """Every plugin's commands by name. A plugin whose hook raises, or that registers a name of
    ``reserved`` (the built-in commands) or one already taken, gets a warning and that command
    is left out."""
    taken = set(reserved)
    commands: dict[str, Command] = {}
    manager = get_plugin_manager()
    for impl in manager.hook.tcplug_register_commands.get_hookimpls():
        plugin = manager.get_name(impl.plugin) or repr(impl.plugin)

        def register(name: str, run: Callable[[list[str]], int], help: str = "", _plugin: str = plugin) -> None:
            if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_-]*", name):
                raise ValueError(f"invalid command name {name!r}: use lower-case letters, digits, - and _")
            if name in taken or name in commands:
                owner = f"plugin {commands[name].plugin!r}'s" if name in commands else "a tcplug command"
                warnings.warn(f"tcplug plugin {_plugin!r}: command {name!r} is already {owner}; left out",
                              PluginLoadWarning, stacklevel=2)
                return
            commands[name] = Command(name, run, help, _plugin)

        try:
            with isolated(plugin):
                impl.function(register=register)
        except PluginFailed:
            pass
    return dict(sorted(commands.items()))
