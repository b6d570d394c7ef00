"""The Hydra runner end to end on the tiny model: configs, rows, images, multirun, resume after
SIGKILL, bad input, inversion reuse across methods and sweep points, determinism."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from oig.run import CONF_DIR, load_rows, run

ROOT = Path(__file__).resolve().parent.parent
ORACLE = "+metrics.toy_oracle._target_=eval.toy.ToyOracleMetrics"


def _cfg(overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _base(tiny_sd_path, tmp_path, *extra):
    return [f"model.pretrained={tiny_sd_path}", f"cache.dir={tmp_path}/cache", "progress=false",
            "dataset.n_per_task=1", "metrics=none", ORACLE, "method.steps=3", *extra]


def test_every_config_composes():
    groups = {g: sorted(p.stem for p in (CONF_DIR / g).glob("*.yaml"))
              for g in ("model", "method", "dataset", "metrics", "logger")}
    assert "oig" in groups["method"] and "toyworld" in groups["dataset"]
    for g, names in groups.items():
        for n in names:
            cfg = _cfg([f"{g}={n}", "hydra.run.dir=x"] if False else [f"{g}={n}"])
            assert cfg[g] is not None or g == "metrics"
    # method configs instantiate (the editors build without models)
    from hydra.utils import instantiate

    for n in groups["method"]:
        cfg = _cfg([f"method={n}"])
        ed = instantiate(cfg.method)
        assert ed.name == n or n in ("null_text", "ddim_p2p", "oig_paper")  # oig_paper: the oig editor at the paper's λ


def test_run_writes_rows_images_grid(tiny_sd_path, tmp_path):
    out = tmp_path / "run"
    summary = run(_cfg(_base(tiny_sd_path, tmp_path, "method=ddim_word_swap")), output_dir=out)
    df = pd.read_parquet(out / "results.parquet")
    assert len(df) == 4 and set(df.task) == {"shape_swap", "color_change", "background_change", "appearance_change"}
    assert (df.status == "ok").all()
    for col in ("id", "method", "seed", "hp_steps", "hp_guidance", "time_total", "peak_mem_mb", "cache_misses",
                "toy_edit_success", "toy_bg_psnr"):
        assert col in df.columns, col
    assert df.hp_steps.unique().tolist() == [3]
    for i in df.id:
        for k in ("source", "edit", "target"):
            assert Image.open(out / "images" / i / f"{k}.png").size == (16, 16)
    assert Image.open(out / "grid.png").size[0] > 16 * 3
    assert summary["samples"] == 4 and summary["errors"] == 0
    assert json.loads((out / "summary.json").read_text())["method"] == "ddim_word_swap"


def test_same_config_same_seed_bit_identical(tiny_sd_path, tmp_path):
    a = run(_cfg(_base(tiny_sd_path, tmp_path, "method=sdedit", "cache.enabled=false")), output_dir=tmp_path / "a")
    b = run(_cfg(_base(tiny_sd_path, tmp_path, "method=sdedit", "cache.enabled=false")), output_dir=tmp_path / "b")
    for i in pd.read_parquet(tmp_path / "a" / "results.parquet").id:
        ea = np.asarray(Image.open(tmp_path / "a" / "images" / i / "edit.png"))
        eb = np.asarray(Image.open(tmp_path / "b" / "images" / i / "edit.png"))
        assert np.array_equal(ea, eb)
    ra = pd.read_parquet(tmp_path / "a" / "results.parquet").set_index("id").sort_index()
    rb = pd.read_parquet(tmp_path / "b" / "results.parquet").set_index("id").sort_index()
    cols = [c for c in ra.columns if c.startswith("toy_")]
    pd.testing.assert_frame_equal(ra[cols], rb[cols])
    assert a["toy_bg_psnr"] == b["toy_bg_psnr"]


def test_each_inversion_computed_once_across_methods_and_sweep(tiny_sd_path, tmp_path):
    runs = [["method=ddim_word_swap"], ["method=ddim_recon"]] + [
        ["method=oig", f"method.lambda2={v}", "method.lambda1=0"] for v in (0.5, 1.0, 2.0)]
    misses = hits = rmiss = rhit = 0
    for k, ov in enumerate(runs):
        run(_cfg(_base(tiny_sd_path, tmp_path, *ov)), output_dir=tmp_path / f"r{k}")
        df = pd.read_parquet(tmp_path / f"r{k}" / "results.parquet")
        misses += int(df.cache_misses.sum())
        hits += int(df.cache_hits.sum())
        if "cache_reconstruction_misses" in df:
            rmiss += int(df.cache_reconstruction_misses.sum())
            rhit += int(df.cache_reconstruction_hits.sum())
    assert misses == 4  # one inversion per sample, ever
    assert hits == 4 * (len(runs) - 1)
    assert (rmiss, rhit) == (4, 8)  # OIG's reconstruction pass: once per sample across the λ2 sweep


def _cli(args, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    return subprocess.Popen([sys.executable, "-m", "oig.run", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_multirun_writes_one_row_per_sample_per_method(tiny_sd_path, tmp_path):
    p = _cli(["-m", "method=ddim_word_swap,sdedit", *_base(tiny_sd_path, tmp_path), "dataset.limit=2",
              f"hydra.sweep.dir={tmp_path}/sweep"])
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]
    dfs = [pd.read_parquet(f) for f in sorted((tmp_path / "sweep").glob("*/results.parquet"))]
    assert len(dfs) == 2
    allrows = pd.concat(dfs)
    assert sorted(allrows.method.unique()) == ["ddim_word_swap", "sdedit"]
    assert allrows.groupby("method").id.nunique().tolist() == [2, 2] and len(allrows) == 4


def test_resume_after_sigkill_equals_uninterrupted_run(tiny_sd_path, tmp_path):
    args = [*_base(tiny_sd_path, tmp_path, "method=ddim_word_swap", "dataset.n_per_task=3", "method.steps=8")]
    # reference: uninterrupted, its own cache
    ref = _cli([*args, f"hydra.run.dir={tmp_path}/ref", f"cache.dir={tmp_path}/cache_ref"])
    out, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, out[-3000:]
    # killed mid-way
    run_dir = tmp_path / "killed"
    p = _cli([*args, f"hydra.run.dir={run_dir}"])
    t0 = time.time()
    while len(list((run_dir / "rows").glob("*.json"))) < 4 and time.time() - t0 < 300 and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    n_before = len(list((run_dir / "rows").glob("*.json")))
    assert 0 < n_before < 12, "the run was not killed mid-way"
    assert not (run_dir / "results.parquet").exists()
    first = {r["id"]: r for r in load_rows(run_dir)}
    # resume in the same folder with the same config
    p = _cli([*args, f"hydra.run.dir={run_dir}"])
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]
    df = pd.read_parquet(run_dir / "results.parquet")
    rf = pd.read_parquet(tmp_path / "ref" / "results.parquet")
    assert len(df) == 12 and df.id.is_unique
    # rows written before the kill were not recomputed
    for i, r in first.items():
        assert df.set_index("id").loc[i, "time_total"] == r["time_total"]
    # no inversion was computed twice: 12 cache entries, each computed once; the sample in flight
    # at the kill may have stored its inversion without its row, so its resumed row is a hit
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 12
    assert int(df.cache_misses.sum() + df.cache_hits.sum()) == 12 and int(df.cache_hits.sum()) <= 1
    # merged results equal the uninterrupted run's (images and metrics)
    cols = [c for c in rf.columns if c.startswith("toy_")]
    pd.testing.assert_frame_equal(df.set_index("id").sort_index()[cols], rf.set_index("id").sort_index()[cols])
    for i in rf.id:
        assert np.array_equal(np.asarray(Image.open(run_dir / "images" / i / "edit.png")),
                              np.asarray(Image.open(tmp_path / "ref" / "images" / i / "edit.png")))


def _bad_folder(root: Path) -> Path:
    import random

    from oig.toy import world

    d = root / "imgs"
    d.mkdir()
    rows = []

    def good(name):
        s = world.random_scene(random.Random(name), striped=False)
        Image.fromarray(world.render(s)).save(d / name)
        return s.caption

    cap = good("good1.png")
    rows.append(("good1.png", cap, cap.replace("a ", "a striped ", 1)))
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    rows.append(("corrupt.png", "a red circle", "a blue circle"))
    Image.new("RGB", (64, 64)).save(d / "trunc.jpg")
    data = (d / "trunc.jpg").read_bytes()
    (d / "trunc.jpg").write_bytes(data[: len(data) // 3])
    rows.append(("trunc.jpg", "a red circle", "a blue circle"))
    (d / "notes.txt").write_text("hello")
    rows.append(("notes.txt", "a red circle", "a blue circle"))
    Image.new("RGBA", (64, 64), (255, 0, 0, 128)).save(d / "rgba.png")
    rows.append(("rgba.png", "a red square", "a blue square"))
    Image.new("LA", (64, 64)).save(d / "la.png")
    rows.append(("la.png", "a gray square", "a red square"))
    Image.new("P", (64, 64)).save(d / "pal.png")
    rows.append(("pal.png", "a gray square", "a red square"))
    Image.new("CMYK", (64, 64), (0, 255, 0, 0)).save(d / "cmyk.jpg")
    rows.append(("cmyk.jpg", "a red square", "a blue square"))
    Image.fromarray(np.full((64, 64), 40000, dtype=np.uint16)).save(d / "gray16.png")
    rows.append(("gray16.png", "a gray square", "a red square"))
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (64, 32), (0, 0, 255)).save(d / "exif.jpg", exif=exif)
    rows.append(("exif.jpg", "a blue square", "a red square"))
    Image.new("RGB", (8, 8)).save(d / "tiny8.png")
    rows.append(("tiny8.png", "a red circle", "a blue circle"))
    Image.new("RGB", (8000, 8000), (10, 200, 10)).save(d / "huge.png")
    rows.append(("huge.png", "a green square", "a red square"))
    Image.new("RGB", (37, 23), (10, 20, 200)).save(d / "odd.png")
    rows.append(("odd.png", "a blue square", "a red square"))
    Image.new("RGB", (32, 32)).save(d / "emptyprompt.png")
    rows.append(("emptyprompt.png", "", "a red square"))
    Image.new("RGB", (32, 32)).save(d / "longprompt.png")
    rows.append(("longprompt.png", "a red square " * 40, "a blue square " * 40))
    cap2 = good("good2.png")
    rows.append(("good2.png", cap2, cap2.replace("a ", "a striped ", 1)))
    pd.DataFrame(rows, columns=["file", "source_prompt", "target_prompt"]).to_csv(d / "prompts.csv", index=False)
    return d


def test_bad_inputs_become_error_rows_and_good_ones_are_unchanged(tiny_sd_path, tmp_path):
    d = _bad_folder(tmp_path)
    base = [f"model.pretrained={tiny_sd_path}", f"cache.dir={tmp_path}/cache", "progress=false", "metrics=none",
            "method=ddim_word_swap", "method.steps=3", "dataset=folder", f"dataset.path={d}"]
    run(_cfg(base), output_dir=tmp_path / "bad")
    df = pd.read_parquet(tmp_path / "bad" / "results.parquet").set_index("id")
    err = df[df.status == "error"]
    reasons = err.error.to_dict()
    assert set(reasons) == {"corrupt.png", "trunc.jpg", "notes.txt", "tiny8.png", "emptyprompt.png"}, reasons
    assert "not an image" in reasons["corrupt.png"] or "corrupt" in reasons["corrupt.png"]
    assert "truncated" in reasons["trunc.jpg"] or "corrupt" in reasons["trunc.jpg"]
    assert "too small" in reasons["tiny8.png"]
    assert "source_prompt" in reasons["emptyprompt.png"] or "prompt" in reasons["emptyprompt.png"]
    assert all("\n" not in r for r in reasons.values())
    ok = df[df.status == "ok"]
    assert {"rgba.png", "la.png", "pal.png", "cmyk.jpg", "gray16.png", "exif.jpg", "huge.png", "odd.png",
            "longprompt.png", "good1.png", "good2.png"} <= set(ok.index)
    assert Image.open(tmp_path / "bad" / "images" / "exif.jpg" / "edit.png").size == (8, 16)  # rotated portrait
    assert Image.open(tmp_path / "bad" / "images" / "odd.png" / "edit.png").size == (16, 8)  # 37x23 -> long side 16, short rounded to 4
    # the good samples give the same result as in a clean run
    clean = tmp_path / "clean_imgs"
    clean.mkdir()
    for f in ("good1.png", "good2.png"):
        (clean / f).write_bytes((d / f).read_bytes())
    pd.read_csv(d / "prompts.csv").query("file in ['good1.png', 'good2.png']").to_csv(clean / "prompts.csv", index=False)
    run(_cfg(base[:-1] + [f"dataset.path={clean}"]), output_dir=tmp_path / "clean")
    for f in ("good1.png", "good2.png"):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "bad" / "images" / f / "edit.png")),
                              np.asarray(Image.open(tmp_path / "clean" / "images" / f / "edit.png")))
    # strict: the first error is fatal
    with pytest.raises(Exception):
        run(_cfg(base + ["strict=true"]), output_dir=tmp_path / "strict")


def test_nan_latent_is_an_error_row(tiny_sd_path, tmp_path, monkeypatch):
    from baselines.ddim import DDIMWordSwap
    import torch

    orig = DDIMWordSwap.edit

    def poisoned(self, req, src, timer):
        if req.id.endswith("0000") and "color" in req.id:
            real = self.core.sample
            self.core.sample = lambda *a, **k: real(*a, **k) * torch.nan
            try:
                return orig(self, req, src, timer)
            finally:
                self.core.sample = real
        return orig(self, req, src, timer)

    monkeypatch.setattr(DDIMWordSwap, "edit", poisoned)
    run(_cfg(_base(tiny_sd_path, tmp_path, "method=ddim_word_swap")), output_dir=tmp_path / "nan")
    df = pd.read_parquet(tmp_path / "nan" / "results.parquet").set_index("id")
    assert df.loc["toy_color_change_0000", "status"] == "error"
    assert "non-finite" in df.loc["toy_color_change_0000", "error"]
    assert (df.drop(index="toy_color_change_0000").status == "ok").all()
