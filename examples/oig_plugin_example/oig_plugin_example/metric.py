"""``outside_change``: how much an edit changed the image outside and inside the edit mask."""

from __future__ import annotations

import numpy as np

from eval.base import NAN, Metric, MetricInput, mask_at, same_size
from oig.registry import register_metric


@register_metric("outside_change")
class OutsideChange(Metric):
    """Per sample, in 8-bit levels (0-255) of the RGB source and edit (same size):

    * ``outside_change_max``: the largest absolute channel difference where the mask is False
      (0 = the background is untouched; NaN without a mask or with an all-True mask);
    * ``inside_change_mean``: the mean absolute channel difference where the mask is True
      (NaN without a mask or with an empty one).
    """

    @property
    def output_keys(self) -> list[str]:
        return ["outside_change_max", "inside_change_mean"]

    def compute(self, batch: list[MetricInput]) -> list[dict[str, float]]:
        out = []
        for s in batch:
            same_size(s.source, s.edit, type(self).__name__, task=s.task)
            diff = np.abs(np.asarray(s.edit.convert("RGB"), dtype=np.int16)
                          - np.asarray(s.source.convert("RGB"), dtype=np.int16))
            m = mask_at(s.mask, s.edit.size)
            if m is None:
                out.append({k: NAN for k in self.output_keys})
                continue
            out.append({"outside_change_max": float(diff[~m].max()) if (~m).any() else NAN,
                        "inside_change_mean": float(diff[m].mean()) if m.any() else NAN})
        return out
