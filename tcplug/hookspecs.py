"""pluggy hook specifications: the whole plugin contract.

A plugin is a module (or object) with functions decorated by :data:`tcplug.hookimpl` whose
names match the specifications below. It is found through the entry-point group
``tcplug`` of its distribution.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

hookspec = pluggy.HookspecMarker("tcplug")
hookimpl = pluggy.HookimplMarker("tcplug")


@hookspec
def tcplug_register_components(register: Callable[..., None]) -> None:
    """Declare the components this plugin provides.

    Call ``register(cls, name=None)`` once per class. The kind is inferred from the base
    class (one of :data:`tcplug.KINDS`); ``name`` defaults to the class name in snake case.
    Names are unique within a kind. The hook must not build objects or do work: the engine
    decides when to instantiate a component.

    Example::

        @hookimpl
        def tcplug_register_components(register):
            register(TokenShift, name="token_shift")
    """
