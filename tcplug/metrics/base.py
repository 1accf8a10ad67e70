"""The metric kind's base class: :class:`VideoMetric`, a torchmetrics ``Metric``.

It lives here rather than in :mod:`tcplug.kinds` so that importing the other kinds does not
import torchmetrics (which imports transformers); ``tcplug.VideoMetric`` imports it on first use.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor
from torchmetrics import Metric

from tcplug.kinds import DataKey


class VideoMetric(Metric):
    """A measurement of clips, picked by name in a recipe (``model.metrics``) and in
    ``tcplug score --metrics``, and computed the same way in both.

    A torchmetrics :class:`~torchmetrics.Metric`: states are reduced across DDP processes, so 1
    and N processes agree. The caller feeds it:

    - ``update(video, flows=None, batch=None)``: the clips judged. ``video`` ``(B, T, C, H, W)``
      float in ``[0, 1]``; ``flows`` the pair ``(fwd, bwd)`` of ``(B, T-1, 2, H, W)`` optical
      flows in pixels, estimated once per clip by the caller (OpenCV DIS) and shared by every
      metric that sets ``needs_flow``; ``batch`` what the data knows about the clips (a
      ``static`` mask ``(B, 1, H, W)``, an object ``state``), or None.
    - ``update_reference(video, flows=None, batch=None)``: reference clips (real footage of
      the same world), for metrics that compare with them (``needs_reference``). Called
      before or after ``update``; both feed the same ``compute``.
    - ``compute()``: a scalar tensor; NaN when nothing could be measured (the caller then
      reports nothing rather than a number).

    Attributes: ``higher_is_better`` (True, False, or None when the target is 1, as for a
    ratio to the reference); ``needs_flow``; ``needs_reference``; ``gate_band`` (a band around
    the data's value that makes the metric part of the fidelity gate).
    """

    full_state_update: ClassVar[bool] = False
    #: shard keys the metric reads that the engine does not know (see :class:`~tcplug.kinds.DataKey`)
    data_keys: ClassVar[tuple[DataKey, ...]] = ()
    higher_is_better: ClassVar[bool | None] = None
    needs_flow: ClassVar[bool] = False
    needs_reference: ClassVar[bool] = False
    #: joins the fidelity gate (:mod:`tcplug.metrics.gate`): the value must lie within
    #: ``[lo, hi]`` times the held-out data's value measured the same way; None: not judged
    gate_band: ClassVar[tuple[float, float] | None] = None

    def update(self, video: Tensor, flows: tuple[Tensor, Tensor] | None = None,
               batch: dict[str, Any] | None = None) -> None:
        raise NotImplementedError

    def update_reference(self, video: Tensor, flows: tuple[Tensor, Tensor] | None = None,
                         batch: dict[str, Any] | None = None) -> None:
        """Feed reference clips (default: this metric has no use for them)."""

    def compute(self) -> Tensor:
        raise NotImplementedError


__all__ = ["VideoMetric"]
