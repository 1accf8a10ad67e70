"""A set of :class:`~tcplug.metrics.base.VideoMetric` s fed together: what validation and ``tcplug
score`` both use, so a metric is computed the same way in both.

Optical flow is estimated once per clip (OpenCV DIS) and shared by every metric that needs
it; reference clips are fed once to every metric that compares with a reference.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from torch import Tensor, nn

from tcplug.flow import DISFlow
from tcplug.metrics.base import VideoMetric
from tcplug.metrics.temporal import estimate_flows

#: the metrics validation logs and ``tcplug score`` prints when none are named
DEFAULT_METRICS = ("tvs", "warp_error", "flicker", "coverage", "motion_ratio", "sharpness_ratio",
                   "frame_distance", "dynamics_distance")
#: the defaults that need no reference footage (``tcplug score`` without ``--reference``)
NO_REFERENCE_METRICS = ("tvs", "warp_error", "flicker", "coverage")


def build_metrics(names: list[str] | tuple[str, ...] | None = None) -> dict[str, VideoMetric]:
    """``{name: metric}`` built from the registry (default :data:`DEFAULT_METRICS`)."""
    from tcplug.registry import get_registry

    registry = get_registry()
    return {name: registry.get("metric", name)() for name in (names or DEFAULT_METRICS)}


class MetricSuite(nn.Module):
    """Metrics by name, fed with shared flows.

    Args:
        metrics: ``{name: metric}``.
        flow_preset: the DIS preset used to estimate flow.
    """

    def __init__(self, metrics: dict[str, VideoMetric], flow_preset: str = "medium") -> None:
        super().__init__()
        self.metrics = nn.ModuleDict(metrics)
        self.estimator = DISFlow(flow_preset)

    @property
    def needs_flow(self) -> bool:
        return any(m.needs_flow for m in self.metrics.values())

    def flows(self, video: Tensor) -> tuple[Tensor, Tensor] | None:
        """DIS flows of ``video`` ``(B, T, C, H, W)`` in [0, 1] if any metric needs them."""
        return estimate_flows(video, self.estimator) if self.needs_flow else None

    def update(self, video: Tensor, batch: dict[str, Any] | None = None,
               flows: tuple[Tensor, Tensor] | None = None) -> None:
        """Feed the clips judged ``(B, T, C, H, W)`` in [0, 1]."""
        flows = flows if flows is not None else self.flows(video)
        for m in self.metrics.values():
            m.update(video, flows if m.needs_flow else None, batch)

    def update_reference(self, video: Tensor, batch: dict[str, Any] | None = None,
                         flows: tuple[Tensor, Tensor] | None = None) -> None:
        """Feed reference clips to the metrics that compare with a reference."""
        users = [m for m in self.metrics.values() if m.needs_reference]
        if not users:
            return
        if flows is None and any(m.needs_flow for m in users):
            flows = estimate_flows(video, self.estimator)
        for m in users:
            m.update_reference(video, flows if m.needs_flow else None, batch)

    def compute(self) -> dict[str, float]:
        """``{name: value}``; metrics that measured nothing (NaN) are left out."""
        out = {}
        for name, m in self.metrics.items():
            value = float(m.compute())
            if not math.isnan(value):
                out[name] = value
        return out

    def reset(self) -> None:
        for m in self.metrics.values():
            m.reset()

    def fork(self) -> MetricSuite:
        """A copy with the same states (e.g. after the reference was fed), to score one more
        set of clips against the same reference."""
        return copy.deepcopy(self)
