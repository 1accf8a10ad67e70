"""Metrics (weight-free): temporal (TVS, warping error, flicker, coverage), motion and fidelity
companions (motion ratio, sharpness ratio, frame distance, dynamics distance, trajectory error),
the fidelity gate (:mod:`tcplug.metrics.gate`) and its controls (:mod:`tcplug.metrics.controls`), and
what knows shots (:mod:`tcplug.metrics.shots`: cut detection, cut accuracy, identity across shots).
Each metric is a :class:`~tcplug.metrics.base.VideoMetric` (kind ``metric``)."""

from tcplug.flow import DISFlow, valid_mask, warp
from tcplug.metrics.fidelity import (
    FrameDistance,
    MotionRatio,
    SharpnessRatio,
    TrajectoryError,
    frame_features,
    gradient_energy,
    mmd,
)
from tcplug.metrics.gate import DynamicsDistance, clip_dynamics
from tcplug.metrics.shots import CrossShotIdentity, CutAccuracy, detect_cuts
from tcplug.metrics.suite import DEFAULT_METRICS, MetricSuite, build_metrics
from tcplug.metrics.temporal import (
    BackgroundFlicker,
    Coverage,
    Flicker,
    TemporalVarianceScore,
    WarpingError,
    estimate_flows,
    pair_errors,
    to_unit,
)

__all__ = ["DEFAULT_METRICS", "BackgroundFlicker", "Coverage", "CrossShotIdentity", "CutAccuracy", "DISFlow", "DynamicsDistance", "Flicker", "FrameDistance",
           "MetricSuite", "MotionRatio", "SharpnessRatio", "TemporalVarianceScore", "TrajectoryError",
           "WarpingError", "build_metrics", "clip_dynamics", "detect_cuts", "estimate_flows", "frame_features", "gradient_energy", "mmd",
           "pair_errors", "to_unit", "valid_mask", "warp"]
