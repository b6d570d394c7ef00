"""The runner's resume: error rows are retried (``retry_errors``), everything else is left byte for
byte; and each job's thread count (``threads``: N, or auto = cores // n_jobs under joblib)."""

import json
import logging
import os
import random
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from oig.run import CONF_DIR, available_cores, job_threads, load_rows, run


def _cfg(overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _folder(root: Path) -> Path:
    """Three toy scenes with their prompts in a folder dataset."""
    from oig.toy import world

    d = root / "imgs"
    d.mkdir()
    rows = []
    for name in ("a.png", "b.png", "c.png"):
        s = world.random_scene(random.Random(name), striped=False)
        Image.fromarray(world.render(s)).save(d / name)
        rows.append((name, s.caption, s.caption.replace("a ", "a striped ", 1)))
    pd.DataFrame(rows, columns=["file", "source_prompt", "target_prompt"]).to_csv(d / "prompts.csv", index=False)
    return d


def _snapshot(out: Path, ids) -> dict:
    """Every file of these samples (row and images) as bytes."""
    files = {}
    for i in ids:
        files[f"rows/{i}.json"] = (out / "rows" / f"{i}.json").read_bytes()
        for f in sorted((out / "images" / i).glob("*.png")):
            files[f"images/{i}/{f.name}"] = f.read_bytes()
    return files


def _setup(tiny_sd_path, tmp_path, *extra):
    d = _folder(tmp_path)
    cfg = _cfg([f"model.pretrained={tiny_sd_path}", f"cache.dir={tmp_path}/cache", "progress=false", "metrics=none",
                "method=ddim_word_swap", "method.steps=2", "dataset=folder", f"dataset.path={d}", *extra])
    missing = (d / "b.png").read_bytes()
    (d / "b.png").unlink()
    out = tmp_path / "run"
    first = run(cfg, output_dir=out)
    rows = {r["id"]: r for r in load_rows(out)}
    assert first["errors"] == 1 and first["retried"] == 0
    assert rows["b.png"]["status"] == "error" and "not found" in rows["b.png"]["error"], rows["b.png"]
    assert rows["a.png"]["status"] == rows["c.png"]["status"] == "ok"
    return d, cfg, out, missing


def test_resume_retries_the_error_row_and_leaves_the_others_untouched(tiny_sd_path, tmp_path, monkeypatch, caplog):
    d, cfg, out, missing = _setup(tiny_sd_path, tmp_path)
    others = _snapshot(out, ["a.png", "c.png"])
    old_error_row = (out / "rows" / "b.png.json").read_bytes()
    (d / "b.png").write_bytes(missing)  # the input is fixed

    # a retry that dies before its row is written keeps the old error row as it was
    from baselines.ddim import DDIMWordSwap

    def killed(self, req, src, timer):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(DDIMWordSwap, "edit", killed)
        with pytest.raises(KeyboardInterrupt):
            run(cfg, output_dir=out)
    assert (out / "rows" / "b.png.json").read_bytes() == old_error_row
    assert sorted(p.name for p in (out / "rows").iterdir()) == ["a.png.json", "b.png.json", "c.png.json"]

    # the same command again: the error row becomes ok, the other rows and images keep their bytes
    with caplog.at_level(logging.INFO, logger="oig.run"):
        summary = run(cfg, output_dir=out)
    rows = {r["id"]: r for r in load_rows(out)}
    assert rows["b.png"]["status"] == "ok" and rows["b.png"]["error"] is None
    assert (out / "images" / "b.png" / "edit.png").exists()
    assert _snapshot(out, ["a.png", "c.png"]) == others
    assert (summary["samples"], summary["errors"], summary["new_samples"]) == (3, 0, 1)
    assert (summary["retried"], summary["retried_ok"]) == (1, 1)
    on_disk = json.loads((out / "summary.json").read_text())
    assert (on_disk["retried"], on_disk["retried_ok"], on_disk["errors"]) == (1, 1, 0)
    assert (pd.read_parquet(out / "results.parquet").status == "ok").all()
    text = caplog.text
    assert "3 rows already written, 1 of them errors; retrying those 1 samples" in text
    assert "0 errors, 1 error rows retried (1 now ok)" in text

    # once ok, nothing is run again
    everything = _snapshot(out, ["a.png", "b.png", "c.png"])
    again = run(cfg, output_dir=out)
    assert (again["new_samples"], again["retried"]) == (0, 0)
    assert _snapshot(out, ["a.png", "b.png", "c.png"]) == everything


def test_retry_errors_false_keeps_error_rows(tiny_sd_path, tmp_path):
    d, cfg, out, missing = _setup(tiny_sd_path, tmp_path, "retry_errors=false")
    before = _snapshot(out, ["a.png", "c.png"])
    error_row = (out / "rows" / "b.png.json").read_bytes()
    (d / "b.png").write_bytes(missing)
    summary = run(cfg, output_dir=out)
    assert (summary["errors"], summary["new_samples"], summary["retried"], summary["retried_ok"]) == (1, 0, 0, 0)
    assert (out / "rows" / "b.png.json").read_bytes() == error_row
    assert _snapshot(out, ["a.png", "c.png"]) == before


def test_a_retry_that_fails_again_replaces_the_row_with_the_new_error(tiny_sd_path, tmp_path):
    d, cfg, out, _ = _setup(tiny_sd_path, tmp_path)
    (d / "b.png").write_bytes(b"not a png")  # "fixed" badly
    summary = run(cfg, output_dir=out)
    row = {r["id"]: r for r in load_rows(out)}["b.png"]
    assert row["status"] == "error" and "not found" not in row["error"]
    assert (summary["retried"], summary["retried_ok"], summary["errors"]) == (1, 0, 1)


# ------------------------------------------------------------------ threads


def test_threads_setting_values():
    assert job_threads(None) is None and job_threads(3) == 3 and job_threads("2") == 2
    assert job_threads("auto") is None  # outside a Hydra launcher: torch's default stays
    for bad in (0, -1, "many", True, 1.5):
        with pytest.raises(ValueError, match="threads: expected a positive integer, auto or null"):
            job_threads(bad)


def test_threads_1_sets_torch_threads_in_the_job(tiny_sd_path, tmp_path, monkeypatch):
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.setenv(var, "2")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        summary = run(_cfg([f"model.pretrained={tiny_sd_path}", f"cache.dir={tmp_path}/cache", "progress=false",
                            "metrics=none", "method=ddim_recon", "method.steps=2", "dataset.limit=1", "threads=1"]),
                      output_dir=tmp_path / "run")
        assert torch.get_num_threads() == 1 and summary["threads"] == 1
        assert os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == "1"
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def in_hydra_job():
    """Compose a config with its ``hydra`` node and make it the current job's HydraConfig, as a
    launcher does in each job process."""
    from hydra.core.hydra_config import HydraConfig

    def enter(overrides):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        return cfg

    yield enter
    HydraConfig.instance().cfg = None


def test_auto_threads_are_cores_over_n_jobs_under_joblib(in_hydra_job):
    cores = available_cores()
    cfg = in_hydra_job(["+launcher=joblib"])
    assert cfg.threads == "auto" and cfg.hydra.launcher.n_jobs == 2
    assert job_threads(cfg.threads) == max(1, cores // 2)
    in_hydra_job(["+launcher=joblib", f"hydra.launcher.n_jobs={cores + 5}"])
    assert job_threads("auto") == 1  # more jobs than cores: one thread each
    in_hydra_job(["+launcher=joblib", "hydra.launcher.n_jobs=-1"])  # joblib: one job per core
    assert job_threads("auto") == 1
    in_hydra_job(["+launcher=joblib", "hydra.launcher.n_jobs=1"])
    assert job_threads("auto") == cores
    assert job_threads(3) == 3  # an explicit N wins
    in_hydra_job(["+launcher=submitit_local", "hydra.launcher.cpus_per_task=3"])
    assert job_threads("auto") == 3
    in_hydra_job(["+launcher=submitit_local"])  # no cpus_per_task: torch's default
    assert job_threads("auto") is None
    in_hydra_job([])  # the basic launcher runs one job at a time
    assert job_threads("auto") is None
