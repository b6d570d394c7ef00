"""Toy-world oracle metrics: known answers from the exact renders."""

import math
import random

import numpy as np
import pytest
from PIL import Image

from eval.base import PSNR_CAP_DB, MetricInput
from eval.toy import ToyOracleMetrics
from oig.toy import world


def _inp(e: world.ToyEdit, edit: np.ndarray, mask=True) -> MetricInput:
    return MetricInput(Image.fromarray(e.source_image), Image.fromarray(edit), e.source_prompt, e.target_prompt,
                       mask=e.edit_mask if mask else None, target_image=Image.fromarray(e.target_image), task=e.task,
                       meta={"source_scene": e.source, "target_scene": e.target})


@pytest.fixture(scope="module")
def edits():
    return world.benchmark(3)  # 3 per task, interleaved


def test_ground_truth_and_unedited_source(edits):
    m = ToyOracleMetrics()
    gt = m([_inp(e, e.target_image) for e in edits])
    src = m([_inp(e, e.source_image) for e in edits])
    assert set(gt[0]) == set(m.output_keys)
    for e, g, s in zip(edits, gt, src):
        assert g["toy_edit_success"] == 1.0 and s["toy_edit_success"] == 0.0, e.id
        assert g["toy_attrs_kept"] == 1.0 and g["toy_structure_kept"] == 1.0
        assert g["toy_iou"] == 1.0 and g["toy_center_err"] <= 1.5
        # the exact edit changes nothing outside the true edit mask: capped PSNR
        assert g["toy_bg_psnr"] == PSNR_CAP_DB and g["toy_bg_mse"] == 0.0
        assert g["toy_target_psnr"] == PSNR_CAP_DB and g["toy_target_mse"] == 0.0
        assert s["toy_bg_psnr"] == PSNR_CAP_DB  # the source is its own background too
        want = ((e.source_image.astype(np.float64) - e.target_image) / 255.0) ** 2
        assert s["toy_target_mse"] == pytest.approx(want.mean(), rel=1e-12)
        assert s["toy_target_psnr"] == pytest.approx(10 * math.log10(1 / want.mean()), rel=1e-12)


def test_background_damage_and_mask_fallback(edits):
    m = ToyOracleMetrics()
    e = next(x for x in edits if x.task == "color_change")
    bg = ~e.edit_mask
    bad = e.target_image.copy()
    bad[56:][bg[56:]] = 0  # a strip of the ground (outside the object) blackened
    got = m([_inp(e, bad), _inp(e, bad, mask=False)])
    want = (((bad.astype(np.float64) - e.source_image) / 255.0) ** 2)[bg].mean()
    assert got[0]["toy_bg_mse"] == pytest.approx(want, rel=1e-12)
    assert got[0]["toy_bg_psnr"] == pytest.approx(10 * math.log10(1 / want), rel=1e-12)
    # without a mask: the pixels the exact edit changes (for a colour change: the object) stand in
    assert got[1]["toy_bg_mse"] == pytest.approx(got[0]["toy_bg_mse"], rel=1e-12)


def test_moved_object_breaks_structure(edits):
    e = next(x for x in edits if x.task == "color_change")
    dx = 6 if e.target.cx + e.target.r + 8 < world.SIZE else -6
    moved = world.render(e.target.replace(cx=e.target.cx + dx))
    got = ToyOracleMetrics()([_inp(e, moved)])[0]
    assert got["toy_edit_success"] == 1.0  # right colour ...
    assert got["toy_structure_kept"] == 0.0 and got["toy_center_err"] >= 5  # ... in the wrong place
    assert got["toy_bg_psnr"] < 40


def test_other_size_is_resized(edits):
    e = edits[0]
    big = np.asarray(Image.fromarray(e.target_image).resize((128, 128), Image.NEAREST))
    got = ToyOracleMetrics()([_inp(e, big)])[0]
    assert got["toy_edit_success"] == 1.0 and got["toy_structure_kept"] == 1.0


def test_attrs_kept_detects_collateral_change():
    rng = random.Random(0)
    src = world.random_scene(rng, striped=False).replace(color="red", background="gray", shape="circle")
    e = world.make_edit(src, "shape_swap", rng)
    wrong = world.render(e.target.replace(color="blue"))  # the shape changed, and the colour too
    got = ToyOracleMetrics()([_inp(e, wrong)])[0]
    assert got["toy_edit_success"] == 1.0 and got["toy_attrs_kept"] == 0.0


def test_needs_toy_scenes(edits):
    e = edits[0]
    s = _inp(e, e.target_image)
    s.meta = {}
    with pytest.raises(ValueError, match="source_scene"):
        ToyOracleMetrics()([s])
    s = _inp(e, e.target_image)
    s.task = "style_transfer"
    with pytest.raises(ValueError, match="unknown toy task"):
        ToyOracleMetrics()([s])
