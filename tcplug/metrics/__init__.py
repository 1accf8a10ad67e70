"""Temporal metrics (weight-free): TVS, warping error, flicker, and the `score` core."""

from tcplug.metrics.flow import DISFlow, valid_mask, warp
from tcplug.metrics.temporal import (
           Flicker,
           TemporalVarianceScore,
           WarpingError,
           pair_errors,
           to_unit,
)

__all__ = ["DISFlow", "Flicker", "TemporalVarianceScore", "WarpingError", "pair_errors", "to_unit",
           "valid_mask", "warp"]
