"""Kind -> base class, and per kind: registry name -> component class.

The registry is filled by calling every plugin's ``tcplug_register_components(register)``
hook. It is rebuilt when the set of registered plugins changes (e.g. a test registers an
inline plugin), and otherwise built once per process.
"""

from __future__ import annotations

import difflib
import inspect
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from torch import nn

from tcplug import plugins
from tcplug.errors import RegistryError, UnknownComponentError
from tcplug.kinds import MODULE_KINDS

# ----- the kinds by name ------------------------------------------------------------------------
_METRIC_MODULE = "tcplug.metrics.base"  # the metric kind's base class, imported on first use


def kind_base(kind: str) -> type:
    """The base class of ``kind`` (the metric kind's is imported on first use)."""
    if kind == "metric":
        import importlib

        return importlib.import_module(_METRIC_MODULE).VideoMetric
    return MODULE_KINDS[kind]


def kinds_of(cls: type) -> list[str]:
    """The kinds ``cls`` subclasses. The metric kind is checked only when its base class has
    been imported: a class cannot subclass it otherwise (so this imports nothing)."""
    kinds = [kind for kind, base in MODULE_KINDS.items() if issubclass(cls, base)]
    if _METRIC_MODULE in sys.modules and issubclass(cls, sys.modules[_METRIC_MODULE].VideoMetric):
        kinds.append("metric")
    return kinds


def kind_of_base(cls: object) -> str | None:
    """The kind whose base class ``cls`` is (None if it is no kind's base); imports nothing."""
    for kind, base in MODULE_KINDS.items():
        if cls is base:
            return kind
    metric = sys.modules.get(_METRIC_MODULE)
    return "metric" if metric is not None and cls is metric.VideoMetric else None


class _Kinds(Mapping):
    """kind name -> base class, in the documented order; the metric base is imported on access."""

    _names = (*MODULE_KINDS, "metric")

    def __getitem__(self, kind: str) -> type:
        if kind not in self._names:
            raise KeyError(kind)
        return kind_base(kind)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


#: every kind by name: ``backbone``, ``attention``, ``latent``, ``loss``, ``discriminator``, ``router``,
#: ``conditioner``, ``motion_lock``, ``metric``
KINDS: Mapping[str, type] = _Kinds()
#: the base class of each kind, by class name (what a component subclasses)
KIND_BASE_NAMES: tuple[str, ...] = (*(b.__name__ for b in MODULE_KINDS.values()), "VideoMetric")


def snake_case(name: str) -> str:
    """The default registry name of a class: ``TokenShift`` -> ``token_shift``,
    ``Conv3DNet`` -> ``conv3_d_net`` (give ``name=`` when that reads badly)."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def kind_of(cls: type) -> str:
    """The kind of a component class, from the one kind base class it subclasses."""
    if not inspect.isclass(cls):
        raise RegistryError(f"register() expects a class, got {cls!r}")
    kinds = kinds_of(cls)
    if not kinds:
        bases = ", ".join(KIND_BASE_NAMES)
        raise RegistryError(
            f"{cls.__module__}.{cls.__qualname__} subclasses no tcplug kind; "
            f"subclass one of: {bases}"
        )
    if len(kinds) > 1:
        raise RegistryError(
            f"{cls.__module__}.{cls.__qualname__} subclasses several kinds ({', '.join(kinds)}); "
            "a component has exactly one kind"
        )
    return kinds[0]


def import_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


@dataclass(frozen=True)
class Entry:
    kind: str
    name: str
    cls: type[nn.Module]
    plugin: str


class Registry:
    """Components per kind. Use :func:`get_registry` rather than building one."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}

    def register(self, cls: type, name: str | None = None, *, plugin: str = "<direct>") -> None:
        kind = kind_of(cls)
        if "<locals>" in cls.__qualname__:
            raise RegistryError(
                f"{cls.__qualname__} is a local class; components must be importable "
                "(define it at module level) so that DDP can pickle it"
            )
        name = name or snake_case(cls.__name__)
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise RegistryError(f"invalid component name {name!r}: use letters, digits and _")
        existing = self._entries[kind].get(name)
        if existing is not None and existing.cls is not cls:
            raise RegistryError(
                f"duplicate {kind} name {name!r}: {import_path(cls)} (plugin {plugin!r}) "
                f"clashes with {import_path(existing.cls)} (plugin {existing.plugin!r})"
            )
        self._entries[kind][name] = Entry(kind, name, cls, plugin)

    def names(self, kind: str) -> list[str]:
        self._check_kind(kind)
        return sorted(self._entries[kind])

    def entries(self, kind: str) -> list[Entry]:
        self._check_kind(kind)
        return [self._entries[kind][n] for n in sorted(self._entries[kind])]

    def get(self, kind: str, name: str) -> type[nn.Module]:
        self._check_kind(kind)
        entry = self._entries[kind].get(name)
        if entry is None:
            raise UnknownComponentError(self.unknown_message(kind, name))
        return entry.cls

    def find(self, kind: str, name: str) -> type[nn.Module] | None:
        self._check_kind(kind)
        entry = self._entries[kind].get(name)
        return entry.cls if entry else None

    def name_of(self, cls: type) -> str | None:
        """The registry name of a class, if it is registered."""
        for kind_entries in self._entries.values():
            for entry in kind_entries.values():
                if entry.cls is cls:
                    return entry.name
        return None

    def unknown_message(self, kind: str, name: str) -> str:
        available = self.names(kind)
        msg = f"unknown {kind} {name!r}. Available {kind} components: {', '.join(available) or '(none)'}"
        close = difflib.get_close_matches(name, available, n=1, cutoff=0.5)
        if close:
            msg += f". Did you mean {close[0]!r}?"
        failed = [i for i in plugins.plugin_infos() if i.status == "failed"]
        if failed:
            msg += ". Note: plugin(s) that failed to load and may provide it: " + "; ".join(
                f"{i.name} ({i.error})" for i in failed
            )
        return msg

    def as_dict(self) -> dict[str, dict[str, str]]:
        return {
            kind: {e.name: import_path(e.cls) for e in self.entries(kind)} for kind in KINDS
        }

    @staticmethod
    def _check_kind(kind: str) -> None:
        if kind not in KINDS:
            close = difflib.get_close_matches(kind, list(KINDS), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UnknownComponentError(
                f"unknown kind {kind!r}; kinds are: {', '.join(KINDS)}.{hint}"
            )


class _Register:
    """The ``register(cls, name=None)`` callback handed to one plugin's hook."""

    def __init__(self, registry: Registry, plugin: str) -> None:
        self._registry, self._plugin = registry, plugin

    def __call__(self, cls: type, name: str | None = None) -> None:
        self._registry.register(cls, name, plugin=self._plugin)


# (name, plugin object) pairs the registry was built from, and the registry. The objects are
# held (not their ids): a plugin unregistered and garbage-collected could leave its id to a new
# plugin registered under the same name, and an id-keyed cache would then miss the change.
_cache: tuple[list[tuple[str, object]], Registry] | None = None


def _same(a: list[tuple[str, object]], b: list[tuple[str, object]]) -> bool:
    return len(a) == len(b) and all(na == nb and pa is pb for (na, pa), (nb, pb) in zip(a, b))


def _build(pm) -> Registry:
    registry = Registry()
    caller = pm.hook.tcplug_register_components
    for impl in caller.get_hookimpls():
        plugin_name = pm.get_name(impl.plugin) or repr(impl.plugin)
        try:
            with plugins.isolated(plugin_name):  # a plugin whose registration breaks (or exits) is isolated
                impl.function(register=_Register(registry, plugin_name))
        except plugins.PluginFailed:
            pass
    return registry


def get_registry() -> Registry:
    """The registry of every loaded plugin's components (built lazily, cached)."""
    global _cache
    pm = plugins.get_plugin_manager()
    # a plugin registered, unregistered or re-registered under a name (another object) rebuilds
    key = sorted(((str(n), p) for n, p in pm.list_name_plugin()), key=lambda item: item[0])
    if _cache is None or not _same(_cache[0], key):
        _cache = (key, _build(pm))
    return _cache[1]


def get_component(kind: str, name: str) -> type[nn.Module]:
    """The class registered as ``name`` for ``kind``; raises with the available names."""
    return get_registry().get(kind, name)


def list_components(kind: str | None = None) -> dict[str, list[str]] | list[str]:
    """Registered names, for one kind or for all."""
    registry = get_registry()
    if kind is not None:
        return registry.names(kind)
    return {k: registry.names(k) for k in KINDS}
