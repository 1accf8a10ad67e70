"""tcplug: temporal coherence experiments for video diffusion, built from plugins.

The public API a plugin may use (and the only one the built-in plugins use):

- :data:`hookimpl` to mark hook implementations;
- the kind base classes (:class:`Backbone`, :class:`AttentionVariant`, :class:`LatentDesign`,
  :class:`LossTerm`, :class:`Discriminator`, :class:`Router`, :class:`WorldConditioner`,
  :class:`MotionLocker`, :class:`VideoMetric`) and :class:`LossContext`;
- registry helpers :func:`get_component`, :func:`list_components`, :func:`get_registry`;
- plugin helpers :func:`load_plugins`, :func:`register_plugin`, :func:`unregister_plugin`,
  :func:`plugin_infos`;
- :class:`TcplugError` for errors a user caused.

Importing tcplug has no side effects: plugins are loaded on first use of the registry.
"""

from tcplug.errors import RegistryError, TcplugError, UnknownComponentError
from tcplug.hookspecs import hookimpl
from tcplug.kinds import (
    KINDS,
    AttentionVariant,
    Backbone,
    Discriminator,
    LatentDesign,
    LossContext,
    LossTerm,
    MotionLocker,
    Router,
    VideoMetric,
    WorldConditioner,
)
from tcplug.plugins import load_plugins, plugin_infos, register_plugin, unregister_plugin
from tcplug.registry import get_component, get_registry, list_components
from tcplug.sampling import FrameStream

__version__ = "0.1.0"

#: the built-in metric classes, importable from ``tcplug`` (a built-in plugin registers them by name)
_METRICS = ("BackgroundFlicker", "Coverage", "Flicker", "FrameDistance", "MotionRatio", "SharpnessRatio",
            "TemporalVarianceScore", "TrajectoryError", "WarpingError")

__all__ = [
    *_METRICS,
    "KINDS",
    "AttentionVariant",
    "Backbone",
    "Discriminator",
    "FrameStream",
    "LatentDesign",
    "LossContext",
    "LossTerm",
    "MotionLocker",
    "RegistryError",
    "Router",
    "TCPlugModule",
    "TcplugError",
    "UnknownComponentError",
    "VideoDataModule",
    "VideoMetric",
    "WorldConditioner",
    "__version__",
    "get_component",
    "get_registry",
    "hookimpl",
    "list_components",
    "load_plugins",
    "plugin_infos",
    "read_mask",
    "register_plugin",
    "unregister_plugin",
]


def __getattr__(name: str):
    # Lightning-heavy objects are imported on first use, keeping `import tcplug` light.
    if name == "TCPlugModule":
        from tcplug.module import TCPlugModule

        return TCPlugModule
    if name == "VideoDataModule":
        from tcplug.data import VideoDataModule

        return VideoDataModule
    if name in _METRICS:  # the built-in metrics (their flow estimator needs OpenCV when used)
        import tcplug.metrics

        return getattr(tcplug.metrics, name)
    if name == "read_mask":  # video I/O (PyAV) only when asked for
        from tcplug.video import read_mask

        return read_mask
    raise AttributeError(f"module 'tcplug' has no attribute {name!r}")
