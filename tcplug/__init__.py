"""tcplug: temporal coherence experiments for video diffusion, built from plugins.

The public API a plugin may use (and the only one the built-in plugins use):

- :data:`hookimpl` to mark hook implementations;
- the kind base classes (:class:`Backbone`, :class:`AttentionVariant`, :class:`LatentDesign`,
  :class:`LossTerm`, :class:`Discriminator`, :class:`Router`, :class:`WorldConditioner`,
  :class:`MotionLocker`, :class:`VideoMetric`), what they share (:class:`Component`),
  :class:`DataKey` (a shard key a component reads) and :class:`LossContext`;
- registry helpers :func:`get_component`, :func:`list_components`, :func:`get_registry`;
- plugin helpers :func:`load_plugins`, :func:`register_plugin`, :func:`unregister_plugin`,
  :func:`plugin_infos`;
- :class:`TcplugError` for errors a user caused;
- for text conditioners that know shots: :func:`shot_spans`, :func:`shot_captions`,
  :func:`shot_text_mask` (per-shot captions, the mask of which caption tokens each frame sees).

Importing tcplug has no side effects and imports no heavy dependency (not even torch): every
name below is imported on first use, and plugins are loaded on first use of the registry.
"""

from tcplug.errors import RegistryError, TcplugError, UnknownComponentError
from tcplug.hookspecs import hookimpl

__version__ = "0.1.0"

#: where each lazily imported public name lives
_LAZY = {
    "KINDS": "tcplug.registry",
    **{name: "tcplug.kinds" for name in ("AttentionVariant", "Backbone", "Component", "DataKey",
                                         "Discriminator", "LatentDesign", "LossTerm",
                                         "MotionLocker", "Router", "WorldConditioner")},
    "VideoMetric": "tcplug.metrics.base",
    "LossContext": "tcplug.loss_context",
    **{name: "tcplug.plugins" for name in ("load_plugins", "plugin_infos", "register_plugin", "unregister_plugin")},
    **{name: "tcplug.registry" for name in ("get_component", "get_registry", "list_components")},
    "FrameStream": "tcplug.diffusion.sampling",
    "frame_index": "tcplug.diffusion.keyframes",
    "TCPlugModule": "tcplug.module",
    "VideoDataModule": "tcplug.data",
    "read_mask": "tcplug.video",
    **{name: "tcplug.captions" for name in ("shot_captions", "shot_spans", "shot_text_mask")},
    # the built-in metric classes (a built-in plugin registers them by name)
    **{name: "tcplug.metrics" for name in ("BackgroundFlicker", "Coverage", "CrossShotIdentity", "CutAccuracy",
                                           "DynamicsDistance", "Flicker", "FrameDistance",
                                           "MotionRatio", "SharpnessRatio", "TemporalVarianceScore",
                                           "TrajectoryError", "WarpingError")},
}

#: the public API (a test checks it matches what the package provides)
__all__ = [
    "AttentionVariant", "Backbone", "BackgroundFlicker", "Component", "Coverage", "CrossShotIdentity", "CutAccuracy",
    "DataKey",
    "Discriminator", "DynamicsDistance", "Flicker", "FrameDistance", "FrameStream", "KINDS", "LatentDesign",
    "LossContext", "LossTerm", "MotionLocker", "MotionRatio", "RegistryError", "Router",
    "SharpnessRatio", "TCPlugModule", "TcplugError", "TemporalVarianceScore", "TrajectoryError",
    "UnknownComponentError", "VideoDataModule", "VideoMetric", "WarpingError", "WorldConditioner",
    "__version__", "frame_index", "get_component", "get_registry", "hookimpl", "list_components", "load_plugins",
    "plugin_infos", "read_mask", "register_plugin", "shot_captions", "shot_spans", "shot_text_mask",
    "unregister_plugin",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tcplug' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # imported once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
