"""The private details of dependencies that tcplug relies on (all in tcplug/compat.py) are still
there and still do what tcplug needs: each test fails when the dependency changes one."""

import importlib
import inspect

import pytest
import torch

import tcplug
from tcplug import compat


def _jsonargparse_modules_binding_the_resolver() -> set[str]:
    """Every jsonargparse module that holds ``resolve_class_path_by_name`` under that name."""
    import pkgutil

    import jsonargparse

    found = set()
    for info in pkgutil.iter_modules(jsonargparse.__path__, "jsonargparse."):
        try:
            module = importlib.import_module(info.name)
        except Exception:  # noqa: BLE001 - an optional extra that is not installed
            continue
        if hasattr(module, "resolve_class_path_by_name"):
            found.add(info.name)
    return found


def test_jsonargparse_resolves_class_paths_by_name_where_tcplug_patches_it():
    from tcplug.recipe import install_registry_names

    install_registry_names()
    holders = _jsonargparse_modules_binding_the_resolver()
    assert holders == set(compat.JSONARGPARSE_RESOLVER_MODULES), holders  # a new holder would bypass the patch
    for name in holders:
        resolver = importlib.import_module(name).resolve_class_path_by_name
        assert getattr(resolver, "_tcplug", False), name
    original = inspect.unwrap(importlib.import_module("jsonargparse._typehints").resolve_class_path_by_name)
    assert list(inspect.signature(original).parameters) == ["cls", "name"]


def test_registry_names_reach_every_jsonargparse_path():
    """Parsing (typehints), instantiating, and jsonargparse's FromConfigMixin all resolve a
    registry name: the patch covers each module that looks class paths up by name."""
    from jsonargparse import ArgumentParser, FromConfigMixin

    from tcplug.recipe import install_registry_names

    install_registry_names()
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--attention", type=tcplug.AttentionVariant)
    ns = parser.instantiate_classes(parser.parse_args(["--attention=cross_frame", "--attention.window=3"]))
    assert type(ns.attention) is tcplug.get_component("attention", "cross_frame") and ns.attention.window == 3

    class Holder(FromConfigMixin):
        def __init__(self, attention: tcplug.AttentionVariant):
            self.attention = attention

    held = Holder.from_config({"attention": {"class_path": "per_frame"}})
    assert type(held.attention) is tcplug.get_component("attention", "per_frame")


def test_lightning_counts_an_optimizer_step_through_its_step_callbacks():
    """LightningOptimizer.step calls _on_before_step / _on_after_step (what global_step counts);
    inside uncounted_step neither is called, and the parameters still move."""
    from lightning.pytorch.core.optimizer import LightningOptimizer

    param = torch.nn.Parameter(torch.ones(2))
    opt = LightningOptimizer(torch.optim.SGD([param], lr=0.5))
    for name in compat.LIGHTNING_STEP_CALLBACKS:
        assert hasattr(opt, name), name
    calls = []
    opt._strategy = _Strategy()  # what the trainer attaches
    opt._on_before_step = lambda: calls.append("before")
    opt._on_after_step = lambda: calls.append("after")
    param.grad = torch.ones(2)
    opt.step()
    assert calls == ["before", "after"]
    calls.clear()
    with compat.uncounted_step(opt):
        opt.step()
    assert calls == [] and torch.allclose(param.detach(), torch.zeros(2))
    opt.step()
    assert calls == ["before", "after"]  # restored after the block


class _Strategy:
    """What LightningOptimizer.step asks of the strategy: run the closure, step the optimizer."""

    def optimizer_step(self, optimizer, closure, model=None, **kwargs):
        closure()
        return optimizer.step(**kwargs)


@pytest.mark.parametrize("name", ["_typehints", "_from_config"])
def test_no_other_module_reaches_into_jsonargparse(name):
    """Only tcplug/compat.py names jsonargparse's private modules."""
    from pathlib import Path

    root = Path(tcplug.__file__).parent
    for path in root.rglob("*.py"):
        if path.name == "compat.py":
            continue
        assert f"jsonargparse.{name}" not in path.read_text() and f"import {name}" not in path.read_text(), path
