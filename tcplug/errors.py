"""User-facing errors.

Every error a user can cause by what they wrote (a recipe, a name, an argument, a file)
derives from :class:`TcplugError`. The CLI prints its message on one line and exits with
status 2, without a traceback. Anything else is a bug in tcplug or in a plugin and keeps
its traceback.
"""

from __future__ import annotations


class TcplugError(Exception):
    """An error caused by user input; shown without a traceback."""


class RegistryError(TcplugError, ValueError):
    """A component could not be registered (duplicate name, no kind, several kinds)."""


class UnknownComponentError(TcplugError, LookupError):
    """A name that is not in the registry for a kind."""

    def __str__(self) -> str:  # LookupError would quote the message
        return str(self.args[0]) if self.args else ""
