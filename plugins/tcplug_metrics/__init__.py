"""Built-in metrics (kind ``metric``): the temporal metrics and their motion and fidelity
companions, registered by name like any third party's metric would be.

Names: ``tvs``, ``warp_error``, ``coverage``, ``flicker``, ``bg_flicker`` (flicker on the
data's static region), ``motion_ratio``, ``sharpness_ratio``, ``frame_distance``,
``dynamics_distance``, ``trajectory_error``, ``cut_accuracy``, ``shot_identity``.
"""

from __future__ import annotations

from tcplug import hookimpl

__version__ = "0.1.0"


@hookimpl
def tcplug_register_components(register):
    # imported here, not with the plugin: the metric classes are torchmetrics Metrics, and
    # torchmetrics is a heavy import that `tcplug --help` does not need
    from tcplug import (
        BackgroundFlicker,
        Coverage,
        CrossShotIdentity,
        CutAccuracy,
        DynamicsDistance,
        Flicker,
        FrameDistance,
        MotionRatio,
        SharpnessRatio,
        TemporalVarianceScore,
        TrajectoryError,
        WarpingError,
    )

    register(TemporalVarianceScore, name="tvs")
    register(WarpingError, name="warp_error")
    register(Coverage, name="coverage")
    register(Flicker, name="flicker")
    register(BackgroundFlicker, name="bg_flicker")
    register(MotionRatio, name="motion_ratio")
    register(SharpnessRatio, name="sharpness_ratio")
    register(FrameDistance, name="frame_distance")
    register(DynamicsDistance, name="dynamics_distance")
    register(TrajectoryError, name="trajectory_error")
    register(CutAccuracy, name="cut_accuracy")
    register(CrossShotIdentity, name="shot_identity")
