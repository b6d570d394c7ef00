"""Batched sweeps (oig/sweep.py, OIG.edit_points): every point of a λ sweep in one pass gives, point by
point, the edits and rows of separate runs; vector detection, grids of keys, validation, the
sequential fallback for other editors, resume, and the presets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from PIL import Image

import oig.run
from oig import sweep
from oig.oig_editor import OIG, OIGPlus
from oig.run import CONF_DIR
from oig.types import EditRequest

STEPS = 6
#: fp32 tolerance of a batched point against its separate run: the U-Net / VAE / CLIP convolutions
#: and matmuls of a batch of n round differently from a batch of 1 (about 1e-6 relative); after the
#: guided steps that is at most 1/255 in the decoded image and 1e-4 relative in the loss means
PIXEL_TOL = 1
LOSS_RTOL = 1e-4


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from oig.testing import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("clip"))


def _req(img):
    return EditRequest(img, "a red circle on a gray background", "a blue square on a gray background", seed=0)


def _same_edits(separate, batched, key, values):
    for v, a, b in zip(values, separate, batched):
        A, B = np.asarray(a.image).astype(int), np.asarray(b.image).astype(int)
        assert np.abs(A - B).max() <= PIXEL_TOL, (key, v, np.abs(A - B).max())
        assert b.info["sweep_batch"] == len(values)
        losses = {k for k in a.info if k.startswith("loss_")}
        assert losses == {k for k in b.info if k.startswith("loss_")}, (key, v)  # the terms the point's run reports
        for k in losses:
            assert b.info[k] == pytest.approx(a.info[k], rel=LOSS_RTOL, abs=1e-7), (key, v, k)


@pytest.mark.parametrize("cls,key,values", [
    (OIG, "lambda2", [0.0, 0.5, 1.0, 1.5]),
    (OIG, "lambda1", [0.0, 0.1, 1.0]),
    (OIG, "beta_f", [0.0, 2.5]),
    (OIG, "guide_range", [(0.0, 1.0), (0.0, 0.5), (0.5, 1.0)]),
    (OIGPlus, "lambda4", [0.0, 0.1, 0.5]),
])
def test_batched_points_equal_separate_edits(cls, key, values, tiny_models, rand_image, tiny_clip):
    base = dict(lambda1=0.5, lambda2=1.0, steps=STEPS, clip_model=tiny_clip)
    eds = [cls(**{**base, key: v}).bind(tiny_models) for v in values]
    separate = [e(_req(rand_image)) for e in eds]
    assert len({np.asarray(r.image).tobytes() for r in separate}) > 1, "the points must differ"
    batched = eds[0].edit_points(_req(rand_image), eds)
    _same_edits(separate, batched, key, values)


def test_batched_sweep_shares_every_unet_call(tiny_models, rand_image, tiny_clip):
    """A 4-point sweep makes as many U-Net calls as one edit (each with 4x the batch); chunks of
    ``sweep_batch`` give the same edits."""
    calls = []
    h = tiny_models.unet.register_forward_pre_hook(lambda m, a, k: calls.append(int((a[0] if a else k["sample"]).shape[0])),
                                                   with_kwargs=True)
    try:
        eds = [OIG(lambda1=0.5, lambda2=v, steps=STEPS, clip_model=tiny_clip).bind(tiny_models) for v in (0, 1, 2, 3)]
        one = eds[1](_req(rand_image))
        n_one = len(calls)
        calls.clear()
        batched = eds[0].edit_points(_req(rand_image), eds)
        assert len(calls) == n_one
        guided = [b for b in calls if b >= 4]
        assert guided and all(b in (4, 8) for b in guided)
        calls.clear()
        chunked = [OIG(lambda1=0.5, lambda2=v, steps=STEPS, clip_model=tiny_clip, sweep_batch=3).bind(tiny_models)
                   for v in (0, 1, 2, 3)]
        parts = chunked[0].edit_points(_req(rand_image), chunked)
    finally:
        h.remove()
    assert [r.info["sweep_batch"] for r in parts] == [3, 3, 3, 1]
    for a, b in zip(batched, parts):
        assert np.abs(np.asarray(a.image).astype(int) - np.asarray(b.image).astype(int)).max() <= PIXEL_TOL
    assert np.abs(np.asarray(one.image).astype(int) - np.asarray(batched[1].image).astype(int)).max() <= PIXEL_TOL


def test_points_that_cannot_share_a_pass_run_one_by_one(tiny_models, rand_image, tiny_clip):
    eds = [OIG(lambda1=0.5, steps=STEPS, clip_model=tiny_clip, layers=v).bind(tiny_models) for v in ("down", "up")]
    assert "layers" in eds[0].batchable(eds)
    out = eds[0].edit_points(_req(rand_image), eds)
    for e, r in zip(eds, out):
        assert np.array_equal(np.asarray(r.image), np.asarray(e(_req(rand_image)).image))
        assert "sweep_batch" not in r.info
    with pytest.raises(ValueError, match="sweep_batch must be"):
        OIG(sweep_batch=0)


# ------------------------------------------------------------------ vector detection
def test_vector_keys_follow_the_editors_defaults():
    m = {"_target_": "oig.oig_editor.OIG", "lambda2": [0, 0.5], "beta_p": 0.5, "layers": ["down_blocks.0.resnets.0"],
         "guide_range": [0.0, 1.0]}
    assert sweep.vector_keys(m) == {"lambda2": [0, 0.5]}  # a list of layer names is a value, not a sweep
    m2 = {**m, "guide_range": [[0.0, 1.0], [0.0, 0.5]], "lambda1": [0.0, 0.1]}
    pts = sweep.points(m2)
    assert sweep.vector_keys(m2) == {"lambda2": [0, 0.5], "guide_range": [[0.0, 1.0], [0.0, 0.5]],
                                     "lambda1": [0.0, 0.1]}
    assert len(pts) == 8 and pts[0] == {"lambda2": 0, "guide_range": [0.0, 1.0], "lambda1": 0.0}
    assert sweep.folder_name(3, "oig", pts[3]) == "3_oig_lambda2_0_guide_range_0.0-0.5_lambda1_0.1"
    assert sweep.points({"_target_": "oig.oig_editor.OIG", "lambda2": 1.0}) == [{}]
    with pytest.raises(ValueError, match="vector of numbers"):
        sweep.vector_keys({"_target_": "oig.oig_editor.OIG", "lambda2": [0, "x"]})
    with pytest.raises(ValueError, match="at least one value"):
        sweep.vector_keys({"_target_": "oig.oig_editor.OIG", "lambda2": []})
    # Prompt-to-Prompt's windows: [a, b] is one value, a list of windows a sweep
    p2p = {"_target_": "baselines.null_text_p2p.DDIMP2P", "cross_replace": [0.2, 0.8], "self_replace": 0.6}
    assert sweep.vector_keys(p2p) == {}
    assert sweep.vector_keys({**p2p, "self_replace": [[0, 0.4], [0, 0.6]]}) == {"self_replace": [[0, 0.4], [0, 0.6]]}
    # OIG+ passes OIG's parameters through **kw: they are found over the MRO
    assert sweep.vector_keys({"_target_": "oig.oig_editor.OIGPlus", "lambda4": [0, 0.1], "lambda2": [1, 2]}) == \
        {"lambda4": [0, 0.1], "lambda2": [1, 2]}


# ------------------------------------------------------------------ the runner
def _compose(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def _tiny(tiny_sd_path, clip, cache, metrics=True):
    scored = [f"metrics.clip.model={clip}", f"metrics.structure.clip_model={clip}"] if metrics else ["metrics=none"]
    return [f"model.pretrained={tiny_sd_path}", f"model.guidance_clip.name={clip}", *scored, f"cache.dir={cache}",
            "device=cpu", "progress=false", "dataset.n_per_task=1", "dataset.tasks=[shape_swap,color_change]",
            f"method.steps={STEPS}"]


#: columns that legitimately differ between a batched point and its separate run: timings and
#: memory (shared by the batch), cache statistics and flags (separate runs hit the cache from the
#: second on), the batch size, and the captured feature memory (the batch's union of layers)
RESOURCE_COLS = ("time_", "peak_mem_mb", "cache_", "inversion_cached", "reconstruction_cached", "sweep_batch",
                 "source_feature_mb")


def _comparable(df: pd.DataFrame) -> pd.DataFrame:
    return df[[c for c in df.columns if not c.startswith(RESOURCE_COLS)]].sort_values("id").reset_index(drop=True)


def test_batched_sweep_rows_equal_separate_runs(tmp_path, tiny_sd_path, tiny_clip):
    values = [0.0, 0.5, 1.0, 1.5]
    base = ["method=oig", "method.lambda1=0.5", *_tiny(tiny_sd_path, tiny_clip, tmp_path / "cache")]
    out = tmp_path / "batched"
    summary = oig.run.run(_compose([*base, f"method.lambda2={values}"]), output_dir=out)
    assert summary["points"] == 4 and summary["errors"] == 0
    folders = [f"{j}_oig_lambda2_{v}" for j, v in enumerate(values)]
    assert sorted(p.name for p in out.iterdir() if p.is_dir() and p.name[0].isdigit()) == folders
    info = json.loads((out / "sweep.json").read_text())
    assert [p["folder"] for p in info["points"]] == folders and info["points"][1]["values"] == {"lambda2": 0.5}
    assert (out / "sweep_grid.png").is_file()
    for j, v in enumerate(values):
        sep = tmp_path / f"separate_{j}"
        oig.run.run(_compose([*base, f"method.lambda2={v}"]), output_dir=sep)
        a = pd.read_parquet(sep / "results.parquet")
        b = pd.read_parquet(out / folders[j] / "results.parquet")
        assert (b.sweep_batch == 4).all() and (b.hp_lambda2 == v).all()
        assert (b.time_total > 0).all() and (b.peak_mem_mb > 0).all()
        A, B = _comparable(a), _comparable(b)
        assert list(A.columns) == list(B.columns), v
        exact = [c for c in A.columns if not pd.api.types.is_float_dtype(A[c])]
        pd.testing.assert_frame_equal(A[exact], B[exact])  # ids, prompts, status, every hp_ column
        for c in A.columns.difference(exact):  # metrics of edits equal to 1/255
            np.testing.assert_allclose(B[c], A[c], rtol=0.02, atol=0.02, err_msg=f"λ2={v}: {c}")
        for i in A.id:  # the images themselves
            ea = np.asarray(Image.open(sep / "images" / i / "edit.png")).astype(int)
            eb = np.asarray(Image.open(out / folders[j] / "images" / i / "edit.png")).astype(int)
            assert np.abs(ea - eb).max() <= PIXEL_TOL, (v, i)
        cfg = (out / folders[j] / "config.yaml").read_text()
        assert f"lambda2: {v}" in cfg  # each point's folder records its own scalar config


def test_sweep_resume_runs_only_missing_points(tmp_path, tiny_sd_path, tiny_clip):
    """A killed sweep resumes per point folder: a sample is edited again only for the points that
    lack its row; existing rows stay byte-identical."""
    base = ["method=oig", *_tiny(tiny_sd_path, tiny_clip, tmp_path / "cache", metrics=False), "method.lambda2=[0,1]"]
    out = tmp_path / "run"
    oig.run.run(_compose(base), output_dir=out)
    keep = {p: p.read_bytes() for p in (out / "0_oig_lambda2_0" / "rows").glob("*.json")}
    victim = sorted((out / "1_oig_lambda2_1" / "rows").glob("*.json"))[0]
    victim.unlink()
    summary = oig.run.run(_compose([*base, "resume=true"]), output_dir=out)
    assert [p["new_samples"] for p in summary["sweep"]] == [0, 1]
    assert {p: p.read_bytes() for p in keep} == keep
    assert victim.is_file()


def test_sequential_points_for_editors_without_batching(tmp_path, tiny_sd_path, tiny_clip):
    """Any editor takes vector values for its numeric knobs: one process, one edit per point, the same
    rows as separate runs (SDEdit's strength here)."""
    base = ["method=sdedit", *_tiny(tiny_sd_path, tiny_clip, tmp_path / "cache", metrics=False)]
    out = tmp_path / "sdedit"
    oig.run.run(_compose([*base, "method.strength=[0.3,0.8]"]), output_dir=out)
    for j, v in enumerate((0.3, 0.8)):
        sep = tmp_path / f"sep{j}"
        oig.run.run(_compose([*base, f"method.strength={v}"]), output_dir=sep)
        a, b = pd.read_parquet(sep / "results.parquet"), pd.read_parquet(out / f"{j}_sdedit_strength_{v}" / "results.parquet")
        assert "sweep_batch" not in b.columns
        pd.testing.assert_frame_equal(_comparable(a), _comparable(b))


def test_sweep_presets_run_batched_and_keep_the_per_job_path():
    for name, key, values in (("lambda2_sweep", "lambda2", [0, 0.1, 1.0, 10, 30, 100, 300, 1000]),
                              ("lambda1_sweep", "lambda1", [0, 0.01, 0.1, 1.0, 10])):
        cfg = _compose([f"experiment={name}"])
        method = OmegaConf.to_container(cfg.method, resolve=True)
        assert sweep.vector_keys(method) == {key: values}
        assert [sweep.folder_name(j, "oig", p) for j, p in enumerate(sweep.points(method))][:2] == \
            [f"0_oig_{key}_{values[0]}", f"1_oig_{key}_{values[1]}"]


def test_no_preset_setting_is_mistaken_for_a_sweep():
    """Every method of every editor preset composes to a config without vector values (lists there are
    windows, word lists or layer names); only the λ presets sweep."""
    names = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
    methods = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))
    from hydra.core.hydra_config import HydraConfig

    for name in names:
        for m in methods:
            GlobalHydra.instance().clear()
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                cfg = compose(config_name="config", overrides=[f"experiment={name}", f"method={m}"],
                              return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)  # presets read ${hydra:...} (the job's choices)
            try:
                keys = sweep.vector_keys(OmegaConf.to_container(cfg.method, resolve=True))
            finally:
                HydraConfig.instance().cfg = None
            assert not keys or (name, list(keys)) in (("lambda2_sweep", ["lambda2"]), ("lambda1_sweep", ["lambda1"])), \
                (name, m, keys)


def test_preflight_checks_a_sweep_as_it_runs(tiny_sd_path, tiny_clip, capsys):
    from oig.preflight import main

    ov = [f"model.pretrained={tiny_sd_path}", f"model.guidance_clip.name={tiny_clip}", "metrics=none", "device=cpu",
          "dataset.n_per_task=1", "dataset.tasks=[shape_swap]", "method=oig", "method.lambda2=[0,1,2]"]
    assert main(ov) == 0
    out = capsys.readouterr().out
    assert "| editor oig | ready |" in out and "3 sweep points in one call" in out


def test_auto_sweep_batch_halves_on_out_of_memory_and_keeps_the_size(tiny_models, rand_image, tiny_clip, monkeypatch):
    """sweep_batch=auto: every point in one pass; a pass that runs out of (CUDA) memory is retried with
    half the points, and later samples start at the size that fitted. A fixed size is not changed."""
    import torch

    seen = []
    real = OIG._call_chunk

    def limited(self, req, chunk):
        seen.append(len(chunk))
        if len(chunk) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, req, chunk)

    monkeypatch.setattr(OIG, "_call_chunk", limited)
    eds = [OIG(lambda1=0.5, lambda2=v, steps=2, clip_model=tiny_clip).bind(tiny_models) for v in (0, 1, 2, 3, 4)]
    out = eds[0].edit_points(_req(rand_image), eds)
    assert seen == [5, 2, 2, 1] and [r.info["sweep_batch"] for r in out] == [2, 2, 2, 2, 1]
    seen.clear()
    eds[0].edit_points(_req(rand_image), eds)
    assert seen == [2, 2, 1]  # the size that fitted, from the start
    fixed = [OIG(lambda1=0.5, lambda2=v, steps=2, clip_model=tiny_clip, sweep_batch=3).bind(tiny_models)
             for v in (0, 1, 2)]
    with pytest.raises(torch.cuda.OutOfMemoryError):
        fixed[0].edit_points(_req(rand_image), fixed)
