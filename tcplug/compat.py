"""Every private detail of a dependency that tcplug relies on, in one place.

Each entry names what it touches, why no public API does the job, and the public API that would
replace it; ``tests/test_compat.py`` fails when the dependency changes what an entry relies on.
Nothing else in tcplug reaches into a dependency's private modules or attributes.

1. **jsonargparse: class-path resolution by name.** jsonargparse resolves a dot-less
   ``class_path`` by class name among the imported subclasses of the annotated type
   (``resolve_class_path_by_name`` in ``jsonargparse._typehints``, also bound by name in
   ``jsonargparse._from_config``). :func:`install_class_path_resolver` puts a resolver in front of
   it, so registry names (``per_frame``) work in recipes and on the command line. A public hook
   for custom class-path resolution (an option of ``set_parsing_settings``) would replace it;
   jsonargparse has none as of 4.53.
2. **Lightning: an optimizer step that ``global_step`` does not count.** Under manual
   optimization Lightning counts every optimizer's step in ``trainer.global_step``
   (Lightning-AI/pytorch-lightning#17958), so a GAN's discriminator step would halve the generator
   steps ``max_steps`` buys. :func:`uncounted_step` swaps the ``LightningOptimizer``'s step
   callbacks (``_on_before_step``, ``_on_after_step``) for no-ops around one step. A public
   per-optimizer "do not count" flag would replace it.
3. **torch's SummaryWriter: a summary of our own making.** Validation samples go to TensorBoard
   as animated GIF images (``add_video`` needs moviepy); the encoded image is a summary proto
   written by the writer's file writer, which ``SummaryWriter._get_file_writer()`` creates on first
   use (:func:`tensorboard_file_writer`), so the samples share the run's one event file. A public
   ``add_summary`` on ``SummaryWriter`` (or GIF support in ``add_image``) would replace it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

#: the jsonargparse modules that hold ``resolve_class_path_by_name`` under that name
JSONARGPARSE_RESOLVER_MODULES = ("jsonargparse._typehints", "jsonargparse._from_config")

Resolver = Callable[[Callable[[Any, str], str], Any, str], str]


def install_class_path_resolver(resolve: Resolver) -> None:
    """Route jsonargparse's class-path-by-name lookup through ``resolve(original, cls, name)``,
    which returns an import path (or calls ``original(cls, name)``). Installed once per process;
    later calls keep the first resolver."""
    import importlib

    modules = [importlib.import_module(name) for name in JSONARGPARSE_RESOLVER_MODULES]
    original = modules[0].resolve_class_path_by_name
    if getattr(original, "_tcplug", False):
        return

    def resolver(cls, name):
        return resolve(original, cls, name)

    resolver._tcplug = True  # type: ignore[attr-defined]
    for module in modules:
        module.resolve_class_path_by_name = resolver


#: the LightningOptimizer callbacks that count an optimizer step in ``global_step``
LIGHTNING_STEP_CALLBACKS = ("_on_before_step", "_on_after_step")


@contextlib.contextmanager
def uncounted_step(optimizer) -> Iterator[None]:
    """Step a ``LightningOptimizer`` inside this block without adding to ``trainer.global_step``.

    The loop installs its counting callbacks on each optimizer at the start of every batch; they
    are swapped for no-ops around this one step. Precision (grad scaling) and strategy handling of
    ``optimizer.step()`` are unchanged.
    """
    from lightning.pytorch.core.optimizer import do_nothing_closure

    saved = {name: getattr(optimizer, name) for name in LIGHTNING_STEP_CALLBACKS if hasattr(optimizer, name)}
    for name in saved:
        setattr(optimizer, name, do_nothing_closure)
    try:
        yield
    finally:
        for name, hook in saved.items():
            setattr(optimizer, name, hook)


def tensorboard_file_writer(writer):
    """The event-file writer of a ``torch.utils.tensorboard.SummaryWriter`` (created if it is
    not yet), with its public ``add_summary(summary, global_step)``."""
    return writer._get_file_writer()


__all__ = ["install_class_path_resolver", "tensorboard_file_writer", "uncounted_step"]
