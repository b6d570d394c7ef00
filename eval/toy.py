"""Toy-world oracle metrics: exact, no networks.

Each sample must carry ``meta["source_scene"]`` and ``meta["target_scene"]``
(:class:`oig.toy.world.Scene`) and its ``task`` (one of ``oig.toy.world.TASKS``); the toy
dataset sets them. ``mask`` is the true edit mask (``ToyEdit.edit_mask``); without one the
changed pixels of the two exact renders are used instead. Input convention: 64x64 toy images
(an edit, source or target of another size is resized to 64x64, bilinear, as the
:class:`~oig.toy.world.Oracle` does), pixel values in [0, 1] for PSNR/MSE.

Keys (per sample):

* ``toy_edit_success``: 1.0 if the oracle reads the target scene's value of the task's
  attribute (``TASK_ATTRIBUTE[task]``) from the edit, else 0.0.
* ``toy_attrs_kept``: 1.0 if the oracle reads the target scene's value for *every other*
  attribute (background, colour, shape, stripes -- these equal the source's), else 0.0.
* ``toy_iou``: IoU between the object the oracle finds in the edit (its foreground pixels) and
  the target scene's exact object mask (0 when no object is found).
* ``toy_center_err``: distance in pixels between the oracle's object bounding-box centre and
  the target scene's object centre (NaN when no object is found).
* ``toy_structure_kept``: 1.0 if ``toy_center_err <= center_tol`` and ``toy_iou >= iou_min``.
* ``toy_bg_mse``, ``toy_bg_psnr``: MSE / PSNR between source and edit over the pixels outside
  the true edit mask (PSNR capped at 100 dB for an untouched background, as everywhere in
  :mod:`eval`; NaN if the mask covers the whole image).
* ``toy_target_mse``, ``toy_target_psnr``: MSE / PSNR between the edit and the exact target
  render (``target_image``, else rendered from ``target_scene``), full frame.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from oig.registry import register_metric
from oig.toy import world

from .base import NAN, Metric, MetricInput, mask_at, psnr_from_mse

ATTRIBUTES = ("background", "color", "shape", "striped")


def _toy_array(img: Image.Image) -> np.ndarray:
    """RGB uint8 (64, 64, 3); other sizes resized bilinearly."""
    img = img.convert("RGB")
    if img.size != (world.SIZE, world.SIZE):
        img = img.resize((world.SIZE, world.SIZE), Image.BILINEAR)
    return np.asarray(img)


@register_metric("toy_oracle")
class ToyOracleMetrics(Metric):
    """Exact toy-world metrics read by :class:`oig.toy.world.Oracle` (see the module docstring).

    Args:
        center_tol: largest bounding-box centre shift (pixels) that still counts as kept structure.
        iou_min: smallest object IoU with the target's exact object mask that counts as kept structure.
            The default 0.4 lets an object in the right place with the wrong shape pass (a square where the
            target has a triangle of the same box has IoU 0.5): shape is ``toy_edit_success``'s business.
        bg_tol, min_pixels: the oracle's parameters.
    """

    KEYS = ("toy_edit_success", "toy_attrs_kept", "toy_structure_kept", "toy_iou", "toy_center_err",
            "toy_bg_psnr", "toy_bg_mse", "toy_target_psnr", "toy_target_mse")

    def __init__(self, center_tol: float = 3.0, iou_min: float = 0.4, bg_tol: float = 45.0, min_pixels: int = 20,
                 batch_size: int = 64):
        super().__init__(batch_size)
        self.center_tol, self.iou_min = float(center_tol), float(iou_min)
        self.oracle = world.Oracle(bg_tol=bg_tol, min_pixels=min_pixels)

    @property
    def output_keys(self):
        return list(self.KEYS)

    def compute(self, batch: list[MetricInput]) -> list[dict[str, float]]:
        return [self._one(s, i) for i, s in enumerate(batch)]

    def _one(self, s: MetricInput, i: int) -> dict[str, float]:
        src_scene, tgt_scene = s.meta.get("source_scene"), s.meta.get("target_scene")
        if not isinstance(src_scene, world.Scene) or not isinstance(tgt_scene, world.Scene):
            raise ValueError(f"ToyOracleMetrics: sample {i} (task {s.task!r}) has no meta['source_scene'] / "
                             f"meta['target_scene'] toy Scene; these metrics apply to the toy world only")
        if s.task not in world.TASK_ATTRIBUTE:
            raise ValueError(f"ToyOracleMetrics: sample {i} has unknown toy task {s.task!r}; "
                             f"expected one of {sorted(world.TASK_ATTRIBUTE)}")
        edit = _toy_array(s.edit)
        source = _toy_array(s.source)
        target = _toy_array(s.target_image) if s.target_image is not None else world.render(tgt_scene)

        attr = world.TASK_ATTRIBUTE[s.task]
        reading = self.oracle.read(edit)
        got = {"background": reading.background, "color": reading.color, "shape": reading.shape,
               "striped": reading.striped}
        ok = {a: got[a] == getattr(tgt_scene, a) for a in ATTRIBUTES}
        success = float(ok[attr])
        kept = float(all(ok[a] for a in ATTRIBUTES if a != attr))

        true_obj = world.object_mask(tgt_scene)
        if reading.object_mask is None:
            iou, cerr = 0.0, NAN
        else:
            fg = reading.object_mask
            iou = float((fg & true_obj).sum() / max((fg | true_obj).sum(), 1))
            cx, cy = reading.center
            cerr = float(math.hypot(cx - tgt_scene.cx, cy - tgt_scene.cy))
        structure = float(not math.isnan(cerr) and cerr <= self.center_tol and iou >= self.iou_min)

        m = mask_at(s.mask, (world.SIZE, world.SIZE))
        if m is None:  # the pixels the exact edit changes
            m = np.any(world.render(src_scene) != world.render(tgt_scene), axis=-1)
        e01, s01, t01 = (a.astype(np.float64) / 255.0 for a in (edit, source, target))
        bg = ~m
        bg_mse = float(((e01 - s01)[bg] ** 2).mean()) if bg.any() else NAN
        tgt_mse = float(((e01 - t01) ** 2).mean())
        return {
            "toy_edit_success": success,
            "toy_attrs_kept": kept,
            "toy_structure_kept": structure,
            "toy_iou": iou,
            "toy_center_err": cerr,
            "toy_bg_psnr": psnr_from_mse(bg_mse),
            "toy_bg_mse": bg_mse,
            "toy_target_psnr": psnr_from_mse(tgt_mse),
            "toy_target_mse": tgt_mse,
        }
