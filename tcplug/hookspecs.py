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


@hookspec
def tcplug_register_commands(register: Callable[..., None]) -> None:
    """Declare subcommands of the ``tcplug`` command.

    Call ``register(name, run, help="")`` once per command: ``run(argv: list[str]) -> int`` gets
    the arguments after the command's name and returns the exit status; raise
    :class:`tcplug.TcplugError` for an error the user caused (printed as one line, status 2).
    Names are unique; a name of a built-in command is refused. ``tcplug --help`` and ``tcplug
    plugins`` list the commands. Like :func:`tcplug_register_components`, the hook only says what
    exists: import heavy dependencies inside ``run``.

    Example::

        @hookimpl
        def tcplug_register_commands(register):
            register("hello", hello_main, help="say hello")
    """
