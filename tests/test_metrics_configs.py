"""conf/metrics/*.yaml instantiate with Hydra; the toy set runs end to end on toy samples."""

import math
from pathlib import Path

import hydra
import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from eval.base import Metric, MetricInput
from oig.toy import world

CONF = Path(__file__).resolve().parents[1] / "conf" / "metrics"


def _load(name):
    path = CONF / f"{name}.yaml"
    assert path.read_text().startswith("# @package metrics"), f"{path} must start with '# @package metrics'"
    return OmegaConf.load(path)


@pytest.mark.parametrize("name,expected", [
    ("paper", {"clip": "CLIPMetrics", "structure": "StructureDistance", "background": "BackgroundMetrics"}),
    ("pie_bench", {"clip": "CLIPMetrics", "structure": "StructureDistance", "background": "BackgroundMetrics"}),
    ("toy", {"toy": "ToyOracleMetrics", "clip": "CLIPMetrics", "structure": "StructureDistance",
             "background": "BackgroundMetrics"}),
    ("none", {}),
])
def test_configs_instantiate(name, expected):
    cfg = _load(name)
    got = {k: hydra.utils.instantiate(v) for k, v in cfg.items()}
    assert {k: type(v).__name__ for k, v in got.items()} == expected
    assert all(isinstance(v, Metric) for v in got.values())
    if name == "paper":
        assert got["clip"].output_keys == ["clip_score", "clip_acc"]
        assert (got["clip"].model, got["clip"].pretrained) == ("ViT-B-32-quickgelu", "openai")
        assert got["structure"].arch == "vit_base_patch8_224.dino" and not got["structure"].pie_bench_compat
        assert got["background"].output_keys == ["bg_lpips"] and got["background"].lpips_net == "alex"
    if name == "pie_bench":
        assert got["clip"].output_keys == ["clip_score", "clip_edit_region"]
        assert got["structure"].pie_bench_compat
        assert got["background"].convention == "pie_bench" and got["background"].lpips_net == "squeeze"
        assert sorted(got["background"].output_keys) == ["bg_lpips", "bg_mse", "bg_psnr", "bg_ssim"]
    if name == "toy":
        assert "bg_lpips" not in got["background"].output_keys


def test_real_weights_missing_offline_give_clear_errors(tmp_path, monkeypatch):
    """paper.yaml's LPIPS and a weights file that is not there fail with messages naming the fix."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cfg = _load("paper")
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth"):
        hydra.utils.instantiate(cfg.background).setup("cpu")
    cfg.structure.weights = str(tmp_path / "dino_vitb8.safetensors")
    with pytest.raises(FileNotFoundError, match="dino_vitb8.safetensors"):
        hydra.utils.instantiate(cfg.structure).setup("cpu")


def test_registry_names():
    from oig.registry import get_metric

    from eval.background import BackgroundMetrics
    from eval.clip import CLIPMetrics
    from eval.structure import StructureDistance
    from eval.toy import ToyOracleMetrics

    assert get_metric("clip") is CLIPMetrics
    assert get_metric("structure") is StructureDistance
    assert get_metric("background") is BackgroundMetrics
    assert get_metric("toy_oracle") is ToyOracleMetrics


def test_toy_config_runs_on_toy_samples(tmp_path):
    from oig.testing import make_tiny_clip

    clip = make_tiny_clip(tmp_path / "clip")
    cfg = _load("toy")
    cfg.clip.model = clip
    cfg.structure.clip_model = clip
    edits = world.benchmark(1)
    batch = []
    for e in edits:
        for img in (e.target_image, e.source_image):
            batch.append(MetricInput(Image.fromarray(e.source_image), Image.fromarray(img), e.source_prompt,
                                     e.target_prompt, mask=e.edit_mask, target_image=Image.fromarray(e.target_image),
                                     task=e.task, meta={"source_scene": e.source, "target_scene": e.target}))
    rows = [{} for _ in batch]
    for name, mcfg in cfg.items():
        m = hydra.utils.instantiate(mcfg)
        m.setup("cpu")
        out = m(batch)
        assert len(out) == len(batch)
        for r, o in zip(rows, out):
            assert set(o) == set(m.output_keys)
            r.update(o)
    for i, r in enumerate(rows):
        gt = i % 2 == 0
        assert r["toy_edit_success"] == float(gt)
        assert r["bg_psnr"] == r["toy_bg_psnr"] == 100.0
        if not gt:  # the unedited source: nothing changed
            assert r["structure_dist"] == pytest.approx(0.0, abs=1e-10) and r["clip_img_sim"] == pytest.approx(1.0)
        assert all(isinstance(v, float) for v in r.values())
        assert not math.isnan(r["clip_score"]) and not math.isnan(r["clip_edit_region"])
    assert np.mean([r["structure_dist"] for r in rows[::2]]) > 0
