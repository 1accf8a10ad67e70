"""Registry: kinds inferred from base classes, clear errors, inline plugins."""

import pytest
from torch import nn

import tcplug
from tcplug import KINDS, AttentionVariant, LossTerm, RegistryError, UnknownComponentError, hookimpl
from tcplug.registry import Registry, kind_of, snake_case


class MyAttention(AttentionVariant):
    def forward(self, q, k, v):
        return q


class MyLoss(LossTerm):
    def forward(self, ctx):
        return ctx.pred.sum() * 0


class NotAComponent(nn.Module):
    pass


class TwoKinds(AttentionVariant, LossTerm):
    pass


def test_nine_kinds_with_base_classes():
    assert list(KINDS) == ["backbone", "attention", "latent", "loss", "discriminator", "router",
                           "conditioner", "motion_lock", "metric"]
    for kind, base in KINDS.items():
        assert getattr(tcplug, base.__name__) is base, kind


def test_kind_inferred_from_base_class():
    assert kind_of(MyAttention) == "attention"
    assert kind_of(MyLoss) == "loss"


def test_class_with_no_kind_is_refused():
    with pytest.raises(RegistryError, match="subclasses no tcplug kind.*AttentionVariant"):
        Registry().register(NotAComponent)


def test_class_with_several_kinds_is_refused():
    with pytest.raises(RegistryError, match="several kinds"):
        Registry().register(TwoKinds)


def test_duplicate_name_is_refused():
    reg = Registry()
    reg.register(MyAttention, "x")
    reg.register(MyAttention, "x")  # the same class again is harmless
    with pytest.raises(RegistryError, match="duplicate attention name 'x'"):
        reg.register(type("Other", (AttentionVariant,), {"__module__": __name__}), "x")


def test_same_name_in_two_kinds_is_fine():
    reg = Registry()
    reg.register(MyAttention, "same")
    reg.register(MyLoss, "same")
    assert reg.get("attention", "same") is MyAttention and reg.get("loss", "same") is MyLoss


def test_local_class_is_refused():
    class Local(AttentionVariant):
        pass

    with pytest.raises(RegistryError, match="local class"):
        Registry().register(Local)


def test_default_name_is_snake_case():
    assert snake_case("TokenShift") == "token_shift"
    assert snake_case("MyLoss") == "my_loss" and snake_case("HTTPCache") == "http_cache"
    reg = Registry()
    reg.register(MyAttention)
    assert reg.names("attention") == ["my_attention"]


def test_unknown_name_lists_available_and_closest():
    with pytest.raises(UnknownComponentError) as err:
        tcplug.get_component("attention", "per_fram")
    msg = str(err.value)
    assert "per_frame" in msg and "Did you mean 'per_frame'" in msg


def test_unknown_kind_suggests():
    with pytest.raises(UnknownComponentError, match="Did you mean 'attention'"):
        tcplug.get_component("atention", "x")


def test_builtins_registered():
    comps = tcplug.list_components()
    assert "dit" in comps["backbone"] and "per_frame" in comps["attention"]
    assert "pixel" in comps["latent"] and "denoise" in comps["loss"]


class InlinePlugin:
    """An in-process plugin object, registered and removed by the test."""

    @hookimpl
    def tcplug_register_components(self, register):
        register(MyAttention, name="inline_attention")
        register(MyLoss)


def test_inline_plugin_register_and_unregister():
    name = tcplug.register_plugin(InlinePlugin(), name="inline-test")
    try:
        assert tcplug.get_component("attention", "inline_attention") is MyAttention
        assert tcplug.get_component("loss", "my_loss") is MyLoss
    finally:
        tcplug.unregister_plugin(name)
    assert "inline_attention" not in tcplug.list_components("attention")


class OtherAttention(AttentionVariant):
    def forward(self, q, k, v):
        return k


class _Registers:
    def __init__(self, cls):
        self.cls = cls

    @hookimpl
    def tcplug_register_components(self, register):
        register(self.cls, name="swap_probe")


def test_plugin_swapped_under_one_name_rebuilds_registry():
    """Unregistering a plugin and registering another object under the same name must rebuild
    the registry, even when the new object happens to reuse the old one's memory (and id)."""
    for i in range(40):
        want = (MyAttention, OtherAttention)[i % 2]
        name = tcplug.register_plugin(_Registers(want), name="swap-test")
        try:
            assert tcplug.get_component("attention", "swap_probe") is want, f"stale registry at round {i}"
        finally:
            tcplug.unregister_plugin(name)
