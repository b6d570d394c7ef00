"""oig-check (oig.preflight): all ready on the tiny SD + tiny CLIP; each broken piece names the problem and the
override that fixes it, and applying that override makes the row ready."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from oig.preflight import MISSING, READY, WRONG, compose, main, preflight
from oig.testing import make_tiny_clip


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("pf_clip"))


@pytest.fixture(scope="module")
def openai_named_clip(tmp_path_factory, tiny_clip):
    """The tiny CLIP as open_clip built-in names ``oig-pf-tiny`` (GELU) / ``oig-pf-tiny-quickgelu`` and its
    weights as a file whose path says OpenAI: the plain name builds GELU for weights declared OpenAI's."""
    import open_clip

    root = tmp_path_factory.mktemp("pf_qg")
    folder = Path(tiny_clip.split(":", 1)[1])
    cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
    cfg["text_cfg"]["hf_tokenizer_name"] = str(folder)
    (root / "cfgs").mkdir()
    (root / "cfgs" / "oig-pf-tiny.json").write_text(json.dumps(cfg))
    (root / "cfgs" / "oig-pf-tiny-quickgelu.json").write_text(json.dumps({**cfg, "quick_gelu": True}))
    open_clip.add_model_config(root / "cfgs")
    weights = root / "openai" / "open_clip_model.safetensors"
    weights.parent.mkdir()
    weights.write_bytes((folder / "open_clip_model.safetensors").read_bytes())
    return str(weights)


def tiny(sd: str, clip: str, *extra: str) -> list[str]:
    """The toy configs on the tiny SD and CLIP (``metrics=none`` in ``extra``: no metric)."""
    metrics = [] if "metrics=none" in extra else [f"metrics.clip.model={clip}", f"metrics.structure.clip_model={clip}"]
    return [f"model.pretrained={sd}", f"model.guidance_clip.name={clip}", *metrics, "device=cpu",
            "dataset.n_per_task=1", *extra]


def rows_of(overrides, **kw) -> dict:
    return {r.name: r for r in preflight(compose(overrides), **kw)}


def _copy(src: str, dst: Path, **scheduler) -> str:
    shutil.copytree(src, dst)
    if scheduler:
        p = dst / "scheduler" / "scheduler_config.json"
        p.write_text(json.dumps({**json.loads(p.read_text()), **scheduler}))
    return str(dst)


def test_tiny_models_are_all_ready(tiny_sd_path, tiny_clip, tmp_path, capsys):
    assert main(tiny(tiny_sd_path, tiny_clip, "method=oig,ddim_recon")) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("all ready")
    for name in ("model folder", "scheduler", "device / dtype", "model", "tokenizer", "dataset", "guidance CLIP (oig)",
                 "editor oig", "editor ddim_recon", "metric clip", "metric clip on an edit", "metric background"):
        assert f"| {name} | ready |" in out, name
    assert "toyworld: all 4 samples checked, 4 open, 4 with a mask" in out
    assert "GELU, nothing declares QuickGELU" in out  # the tiny CLIP's activation is reported
    assert "3 steps (configured 50)" in out
    # a run folder's resolved config.yaml; an editor that refuses 1 step runs at its configured count
    cfg = compose(tiny(tiny_sd_path, tiny_clip, "method=diffedit", "method.steps=4"))[0][1]
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    assert main([str(tmp_path / "config.yaml"), "--steps", "1", "--samples", "1"]) == 0
    out = capsys.readouterr().out
    assert "4 steps (configured 4) (fewer refused" in out and "the first 1 samples checked" in out


def test_missing_subfolder(tiny_sd_path, tiny_clip, tmp_path):
    sd = _copy(tiny_sd_path, tmp_path / "sd")
    shutil.rmtree(Path(sd) / "vae")
    (Path(sd) / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    r = rows_of(tiny(sd, tiny_clip, "metrics=none"))
    assert r["model folder"].status == MISSING
    assert "no vae/" in r["model folder"].detail and "unet/ has no weights" in r["model folder"].detail
    assert "model.pretrained=" in r["model folder"].fix and "huggingface-cli download" in r["model folder"].fix
    assert r["model"].status == MISSING and r["model"].fix.startswith("model.pretrained=")
    assert r["editor ddim_word_swap"].status == MISSING and "needs the model" in r["editor ddim_word_swap"].detail


def test_v_prediction_is_converted_and_other_types_refused(tiny_sd_path, tiny_clip, tmp_path):
    v = rows_of(tiny(_copy(tiny_sd_path, tmp_path / "v", prediction_type="v_prediction"), tiny_clip, "metrics=none",
                     "method=oig"))
    assert v["scheduler"].status == READY and "prediction_type=v_prediction (U-Net output converted to ε" in v["scheduler"].detail
    assert v["editor oig"].status == READY
    s = rows_of(tiny(_copy(tiny_sd_path, tmp_path / "s", prediction_type="sample"), tiny_clip, "metrics=none"))
    assert s["scheduler"].status == WRONG and "prediction_type='sample'" in s["scheduler"].detail
    assert s["scheduler"].fix == "model.pretrained=<a checkpoint trained for epsilon or v_prediction>"
    assert s["model"].status == WRONG and "epsilon and v_prediction" in s["model"].detail


def test_uneven_timestep_spacing_is_wrong(tiny_sd_path, tiny_clip, tmp_path):
    sd = _copy(tiny_sd_path, tmp_path / "sd", timestep_spacing="linspace")
    r = rows_of(tiny(sd, tiny_clip, "metrics=none"))
    assert r["scheduler"].status == WRONG and "not evenly spaced by 20" in r["scheduler"].detail
    assert r["scheduler"].fix.startswith('set "timestep_spacing": "leading" in ')


def test_gelu_clip_for_openai_weights_names_the_fix(tiny_sd_path, tiny_clip, openai_named_clip):
    base = tiny(tiny_sd_path, tiny_clip, "method=oig", "dataset.tasks=[shape_swap]")
    bad = ["model.guidance_clip.name=oig-pf-tiny", f"model.guidance_clip.pretrained={openai_named_clip}",
           "metrics.clip.model=oig-pf-tiny", f"metrics.clip.pretrained={openai_named_clip}"]
    r = rows_of([*base, *bad])
    g = r["guidance CLIP (oig)"]
    assert g.status == WRONG and "named as OpenAI's" in g.detail
    assert g.fix == "model.guidance_clip.name=oig-pf-tiny-quickgelu"
    assert r["editor oig"].status == MISSING and "guidance CLIP" in r["editor oig"].detail
    assert r["metric clip"].status == WRONG and r["metric clip"].fix == "metrics.clip.model=oig-pf-tiny-quickgelu"
    fixed = rows_of([*base, *bad, g.fix, r["metric clip"].fix])
    assert all(row.ok for row in fixed.values()), [row for row in fixed.values() if not row.ok]
    assert "QuickGELU, the architecture 'oig-pf-tiny-quickgelu' declares QuickGELU" in fixed["guidance CLIP (oig)"].detail


def test_clipseg_only_when_a_sample_has_no_mask(tiny_sd_path, tiny_clip, tmp_path):
    seg = f"+metrics.background.mask_from_text.model={tmp_path / 'no_clipseg'}"
    masked = rows_of(tiny(tiny_sd_path, tiny_clip, seg, "dataset.tasks=[shape_swap]"))
    assert masked["CLIPSeg segmenter (background)"].status == READY
    assert masked["CLIPSeg segmenter (background)"].detail == "not needed: every checked sample (1) carries its own mask"
    assert masked["metric background on an edit"].status == READY
    unmasked = rows_of([f"model.pretrained={tiny_sd_path}", "device=cpu", "dataset=synthetic", "dataset.steps=2",
                        "dataset.limit=2", "metrics=none", "+metrics.background._target_=eval.background.BackgroundMetrics",
                        "+metrics.background.metrics=[mse]", seg])
    row = unmasked["CLIPSeg segmenter (background)"]
    assert row.status == MISSING and "needed for 2 samples without a mask" in row.detail
    assert row.fix == "metrics.background.mask_from_text.model=/path/to/clipseg-rd64-refined"
