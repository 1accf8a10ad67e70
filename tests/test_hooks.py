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
    assert HOOKS == ["tcplug_register_components"]


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
