"""Every hook specification has a test here and a documented entry in docs/."""

import inspect
import warnings
from pathlib import Path

import pytest

import tcplug
from tcplug import hookimpl, hookspecs
from tcplug.plugins import PluginLoadWarning

DOCS = Path(__file__).resolve().parents[1] / "docs"
HOOKS = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("tcplug_")]


def test_hook_list():
    assert HOOKS == ["tcplug_register_commands", "tcplug_register_components"]


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_test(hook):
    here = Path(__file__).read_text()
    assert f"def test_hook_{hook}" in here, f"add test_hook_{hook} to tests/test_hooks.py"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented(hook):
    text = (DOCS / "reference" / "hooks.md").read_text()
    assert f"## `{hook}" in text, f"document {hook} in docs/reference/hooks.md"


class HookedAttention(tcplug.AttentionVariant):
    def forward(self, q, k, v):
        return q


class _Good:
    @hookimpl
    def tcplug_register_components(self, register):
        register(HookedAttention, name="hooked")


class _Broken:
    @hookimpl
    def tcplug_register_components(self, register):
        raise RuntimeError("boom in register")


def test_hook_tcplug_register_components():
    """The hook receives `register`; a plugin whose hook raises is isolated and reported."""
    good = tcplug.register_plugin(_Good(), name="good-hook")
    broken = tcplug.register_plugin(_Broken(), name="broken-hook")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert "hooked" in tcplug.list_components("attention")
            assert "dit" in tcplug.list_components("backbone")
        assert any(issubclass(w.category, PluginLoadWarning) and "broken-hook" in str(w.message) for w in caught)
        info = {i.name: i for i in tcplug.plugin_infos()}
        assert info["broken-hook"].status == "failed" and "boom in register" in info["broken-hook"].error
    finally:
        tcplug.unregister_plugin(good)
        tcplug.unregister_plugin(broken)


def _hello(argv):
    print("hello " + " ".join(argv))
    return 3


class _Commands:
    @hookimpl
    def tcplug_register_commands(self, register):
        register("hello", _hello, help="say hello")
        register("data", _hello, help="clashes with a built-in command")


class _BrokenCommands:
    @hookimpl
    def tcplug_register_commands(self, register):
        raise RuntimeError("boom in commands")


def test_hook_tcplug_register_commands(capsys):
    """A plugin adds a subcommand: `tcplug --help` lists it, `tcplug hello ...` runs it with the
    rest of the command line and exits with its status; a built-in name is refused with a warning,
    a hook that raises is isolated, a misspelt command gets the closest name."""
    from tcplug.cli import main

    good = tcplug.register_plugin(_Commands(), name="commands-hook")
    broken = tcplug.register_plugin(_BrokenCommands(), name="broken-commands")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main(["--help"]) == 0
        help_text = capsys.readouterr().out
        assert "hello" in help_text and "say hello (commands-hook)" in help_text
        assert any("'data' is already a tcplug command" in str(w.message) for w in caught)
        assert any("broken-commands" in str(w.message) for w in caught)
        assert main(["hello", "a", "b"]) == 3 and capsys.readouterr().out == "hello a b\n"
        assert main(["helo"]) == 2 and "Did you mean 'hello'?" in capsys.readouterr().err
    finally:
        tcplug.unregister_plugin(good)
        tcplug.unregister_plugin(broken)
