"""Experiment presets, launchers and W&B logging of sweeps.

Every ``conf/experiment/*.yaml`` composes (with each of its sweep values); the toy table runs as a
2-job multirun through the joblib launcher with no ``-m``; submitit's local executor runs a job;
a ``logger=wandb logger.mode=offline`` run leaves a parseable offline W&B run with the config,
summary and per-sample table."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import oig.run
from oig.run import CONF_DIR

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
TOY_TABLE_METHODS = ["ddim_word_swap", "sdedit", "oig", "oig_paper", "diffedit", "pix2pix_zero", "instruct_pix2pix", "pnp",
                     "masactrl", "null_text_p2p"]
ABLATIONS = sorted(p.stem for p in (CONF_DIR / "ablation").glob("*.yaml"))


def _compose(overrides, hydra_cfg=True):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra_cfg)


def _sweep_values(cfg, key):
    return [v.strip() for v in str(cfg.hydra.sweeper.params[key]).split(",")]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from oig.testing import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


def tiny_overrides(sd: str, clip: str, cache: Path) -> list[str]:
    """The toy configs pointed at the tiny random SD and CLIP (no toy weights needed)."""
    return [f"model.pretrained={sd}", f"model.guidance_clip.name={clip}", f"metrics.clip.model={clip}",
            f"metrics.structure.clip_model={clip}", f"cache.dir={cache}", "device=cpu", "progress=false",
            "dataset.n_per_task=1"]


def run_cli(args: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "WANDB_MODE": "offline", "OIG_ROOT": str(cwd), "HYDRA_FULL_ERROR": "1"}
    p = subprocess.run([sys.executable, "-m", "oig.run", *args], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, f"oig-run failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run_dir / "rows").glob("*.json"))]


# ------------------------------------------------------------------ composition
def test_every_preset_is_tested():
    assert set(EXPERIMENTS) >= {"toy_table", "table1", "lambda2_sweep", "lambda1_sweep", "ablation_triplet", "pie_bench"}


#: presets that sweep by vector hyperparameters in one run (oig/sweep.py), the others by Hydra multirun
BATCHED = {"lambda2_sweep": "lambda2", "lambda1_sweep": "lambda1"}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_as_a_multirun_and_every_sweep_value_composes(name):
    cfg = _compose([f"experiment={name}"])
    if name in BATCHED:  # one run; every point also composes as a scalar (the per-job path)
        key = BATCHED[name]
        assert str(cfg.hydra.mode) != "RunMode.MULTIRUN", f"{name}: batched, not a multirun"
        values = list(cfg.method[key])
        assert len(values) >= 5
        for v in values:
            c = _compose([f"experiment={name}", "hydra.mode=MULTIRUN", f"method.{key}={v}"])
            assert float(c.method[key]) == float(v)
        return
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN", f"{name}: must sweep without -m"
    params = cfg.hydra.sweeper.params
    assert params, f"{name}: no sweep"
    for key in params:
        for v in _sweep_values(cfg, key):
            c = _compose([f"experiment={name}", f"{key}={v}"])
            assert c.method._target_, (name, key, v)
            if key.startswith("method."):
                assert float(OmegaConf.select(c, key)) == float(v)


def test_toy_table_runs_every_editor_on_the_toy_world():
    cfg = _compose(["experiment=toy_table"])
    assert _sweep_values(cfg, "method") == TOY_TABLE_METHODS
    assert cfg.model.pretrained == "toy"
    assert cfg.dataset._target_ == "oig.data.toyworld.ToyWorld"
    assert "toy" in cfg.metrics and cfg.metrics.toy._target_ == "eval.toy.ToyOracleMetrics"
    for m in TOY_TABLE_METHODS:  # every method config of the final list exists
        assert _compose(["experiment=toy_table", f"method={m}"]).method._target_


def test_toy_table_step_knob_follows_the_method_choice():
    from hydra.core.hydra_config import HydraConfig

    for method, override, want in [("sdedit", [], 20), ("instruct_pix2pix", ["toy_table.steps.instruct_pix2pix=7"], 7),
                                   ("oig", ["toy_table.steps.default=9"], 9), ("oig", ["method.steps=4"], 4)]:
        cfg = _compose(["experiment=toy_table", f"method={method}", *override])
        HydraConfig.instance().set_config(cfg)
        try:
            assert cfg.method.steps == want, (method, override)
        finally:
            HydraConfig.instance().cfg = None


def test_sweep_folders_name_the_swept_value():
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    cases = [("table1", ["method=pnp", "dataset.num_shards=4", "dataset.shard=2"], "laion_pnp_shard2"),
             ("pie_bench", ["method=oig"], "oig_shard0"), ("lambda2_sweep", ["method.lambda2=1.5"], "oig_lambda2_1.5"),
             ("lambda1_sweep", ["method.lambda1=0.05"], "oig_lambda1_0.05"),
             ("ablation_triplet", ["ablation=layers_up"], "layers_up"), ("toy_table", ["method=masactrl"], "masactrl")]
    for name, overrides, want in cases:
        cfg = _compose([f"experiment={name}", *overrides])
        with open_dict(cfg):
            cfg.hydra.job.num = 3  # set by the launcher
        HydraConfig.instance().set_config(cfg)
        try:
            assert cfg.hydra.sweep.subdir == f"3_{want}", name
            assert Path(cfg.hydra.sweep.dir).parent.name == "multirun" and cfg.hydra.sweep.dir.endswith(f"_{name}")
        finally:
            HydraConfig.instance().cfg = None


def test_paper_presets_use_the_paper_setting():
    t1 = _compose(["experiment=table1"])
    assert t1.model.pretrained == "CompVis/stable-diffusion-v1-4"
    assert t1.dataset._target_ == "oig.data.laion.LaionTasks"
    assert set(t1.metrics) == {"clip", "structure", "background"} and t1.metrics.clip.model == "ViT-B-32-quickgelu"
    methods = _sweep_values(t1, "method")
    assert set(methods) == {"oig", "ddim_word_swap", "sdedit", "diffedit", "pnp", "pix2pix_zero", "null_text_p2p",
                            "masactrl", "instruct_pix2pix"}
    for m in methods:  # the official codes' square resize; InstructPix2Pix's CLI keeps the aspect ratio
        want = "keep_aspect" if m == "instruct_pix2pix" else "square"
        assert _compose(["experiment=table1", f"method={m}"]).method.resize_mode == want, m
    for preset in ("table1", "pie_bench"):  # the real InstructPix2Pix weights, not the toy U-Net
        ip = _compose([f"experiment={preset}", "method=instruct_pix2pix"]).method
        assert (ip.unet, ip.pretrained) == ("ip2p", "ip2p"), (
            f"{preset}: conf/method/instruct_pix2pix.yaml must read model.ip2p "
            "(unet: ${oc.select:model.ip2p.unet,toy_ip2p}, pretrained: ${oc.select:model.ip2p.pretrained,null})")
    pb = _compose(["experiment=pie_bench"])
    assert pb.dataset._target_ == "oig.data.pie_bench.PIEBench"
    assert pb.metrics.background.convention == "pie_bench"
    for m in _sweep_values(pb, "method"):
        c = _compose(["experiment=pie_bench", f"method={m}"])
        assert c.method.steps == 50, m  # PIE-Bench ran InstructPix2Pix with 50 steps too (every setting: test_protocol_cards)
    assert list(_compose(["experiment=lambda2_sweep"]).method.lambda2) == [0, 0.1, 1.0, 10, 30, 100, 300, 1000]
    assert list(_compose(["experiment=lambda1_sweep"]).method.lambda1) == [0, 0.01, 0.1, 1.0, 10]


def test_ablation_variants_set_their_switches():
    cfg = _compose(["experiment=ablation_triplet"])
    assert sorted(_sweep_values(cfg, "ablation")) == ABLATIONS
    want = {"full": {}, "positive_only": {"struct_term": "positive_only"}, "clip_only": {"lambda2": 0.0},
            "structure_only": {"lambda1": 0.0}, "clip_target_only": {"clip_term": "target_only"},
            "grad_conditional": {"grad_branch": "conditional"}, "grad_both": {"grad_branch": "both"},
            "layers_down": {"layers": "down"}, "layers_up": {"layers": "up"}, "lr_constant": {"lr_schedule": "constant"}}
    assert set(want) == set(ABLATIONS)
    base = _compose(["experiment=ablation_triplet"]).method
    for name, switches in want.items():
        c = _compose(["experiment=ablation_triplet", f"ablation={name}"])
        assert c.variant == name
        for k, v in OmegaConf.to_container(base, resolve=True).items():
            assert c.method[k] == switches.get(k, v), (name, k)


def test_launcher_configs_select_the_hydra_plugins():
    j = _compose(["+launcher=joblib"])
    assert j.hydra.launcher._target_.endswith("JoblibLauncher") and j.hydra.launcher.n_jobs == 2
    s = _compose(["+launcher=submitit_slurm"])
    assert s.hydra.launcher._target_.endswith("SlurmLauncher") and s.hydra.launcher.gpus_per_node == 1
    loc = _compose(["+launcher=submitit_local"])
    assert loc.hydra.launcher._target_.endswith("submitit_launcher.LocalLauncher")
    ray = OmegaConf.load(CONF_DIR / "launcher" / "ray.yaml")  # plugin not installed: the file only
    assert {"override /hydra/launcher": "ray"} in OmegaConf.to_container(ray)["defaults"]
    assert ray.hydra.launcher.ray.remote.num_gpus == 1


# ------------------------------------------------------------------ launchers, end to end
def test_toy_table_is_a_multirun_without_m_through_joblib(tmp_path, tiny_sd_path, tiny_clip):
    sweep = tmp_path / "sweep"
    p = run_cli(["experiment=toy_table", "method=ddim_word_swap,sdedit", "+launcher=joblib", "toy_table.steps.default=3",
                 f"hydra.sweep.dir={sweep}", *tiny_overrides(tiny_sd_path, tiny_clip, tmp_path / "cache")], tmp_path)
    assert "Joblib.Parallel(n_jobs=2" in p.stdout + p.stderr
    runs = sorted(d.name for d in sweep.iterdir() if d.is_dir())
    assert runs == ["0_ddim_word_swap", "1_sdedit"]
    for d, method in zip(runs, ["ddim_word_swap", "sdedit"]):
        rows = read_rows(sweep / d)
        assert len(rows) == 4 and {r["status"] for r in rows} == {"ok"}, rows
        assert {r["method"] for r in rows} == {method} and {r["hp_steps"] for r in rows} == {3}
        assert {r["task"] for r in rows} == {"shape_swap", "color_change", "background_change", "appearance_change"}
        assert all(0.0 <= r["toy_edit_success"] <= 1.0 for r in rows)
        assert OmegaConf.load(sweep / d / "config.yaml").tags == ["toy_table"]
    from oig.report import main

    assert main([str(sweep)]) == 0
    table = pd.read_csv(sweep / "report.csv")
    overall = table[(table.task == "all") & (table.metric == "toy_edit_success")]
    assert sorted(overall.method) == ["ddim_word_swap", "sdedit"] and set(overall.n) == {4}


def test_submitit_local_executor_runs_a_job(tmp_path, tiny_sd_path, tiny_clip):
    sweep = tmp_path / "sweep"
    run_cli(["-m", "+launcher=submitit_local", "hydra.launcher.timeout_min=5", "method=sdedit", "method.steps=3",
             "dataset.tasks=[color_change]", "dataset.n_per_task=1", f"hydra.sweep.dir={sweep}",
             *tiny_overrides(tiny_sd_path, tiny_clip, tmp_path / "cache")], tmp_path)
    rows = read_rows(sweep / "0_sdedit")
    assert [(r["id"], r["status"], r["method"]) for r in rows] == [("toy_color_change_0000", "ok", "sdedit")]
    logs = list((sweep / ".submitit").rglob("*_log.out"))
    assert logs, "submitit wrote no job log: the job did not go through the executor"
    assert (sweep / "0_sdedit" / "images" / "toy_color_change_0000" / "edit.png").exists()


# ------------------------------------------------------------------ W&B offline
def wandb_records(path: Path):
    """Records of an offline ``run-*.wandb`` file (LevelDB-style log of protobuf ``Record``s:
    7-byte file header, 32 KiB blocks, 7-byte record headers, FULL/FIRST/MIDDLE/LAST chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, f"{path}: not a W&B log"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and n == 0:
            pos += left - 7
            continue
        buf += data[pos:pos + n]
        pos += n
        if kind in (1, 4):
            r = pb.Record()
            r.ParseFromString(buf)
            buf = b""
            yield r


def _item_key(i) -> str:
    return "/".join(i.nested_key) if i.nested_key else i.key


def test_wandb_offline_run_has_config_summary_and_sample_table(tmp_path, tiny_sd_path, tiny_clip, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))  # artifact staging (table images)
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    out = tmp_path / "multirun" / "2025-01-01_00-00-00_test" / "0_sdedit"
    cfg = _compose(["method=sdedit", "method.steps=3", "logger=wandb", "logger.mode=offline", "dataset.n_per_task=1",
                    "dataset.tasks=[shape_swap,color_change]", f"paths.output_dir={out}",
                    *tiny_overrides(tiny_sd_path, tiny_clip, tmp_path / "cache")], hydra_cfg=False)
    summary = oig.run.run(cfg, output_dir=out)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out / "wandb").iterdir())
    # wandb's service process may still be flushing the log when finish() returns under load: poll
    deadline = time.time() + 30
    while True:
        recs = list(wandb_records(next(runs[0].glob("run-*.wandb"))))
        kinds = {r.WhichOneof("record_type") for r in recs}
        if {"run", "summary"} <= kinds or time.time() > deadline:
            break
        time.sleep(0.5)
    run = next((r.run for r in recs if r.WhichOneof("record_type") == "run"), None)
    assert run is not None, f"no run record in the offline log; record types: {sorted(map(str, kinds))}"
    assert run.project == "oig" and run.display_name == "sdedit-0_sdedit"
    assert run.run_group == "2025-01-01_00-00-00_test"  # runs of one multirun folder share a group
    config = {_item_key(i): json.loads(i.value_json) for i in run.config.update}
    assert config["method"]["_target_"] == "baselines.sdedit.SDEdit" and config["method"]["steps"] == 3
    assert config["dataset"]["tasks"] == ["shape_swap", "color_change"]
    final = {}
    for r in recs:
        if r.WhichOneof("record_type") == "summary":
            final.update({_item_key(i): json.loads(i.value_json) for i in r.summary.update})
    for k in ("clip_acc", "toy_edit_success", "time_total"):
        assert final[k] == pytest.approx(summary[k]), k
    assert final["samples"] == 2 and final["method"] == "sdedit"
    # the per-sample table: rows in the run folder; its images in the run's table artefact (staged offline)
    tables = list((runs[0] / "files" / "media" / "table").glob("samples_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    rows = [dict(zip(table["columns"], d)) for d in table["data"]]
    assert sorted(r["id"] for r in rows) == ["toy_color_change_0000", "toy_shape_swap_0000"]
    assert {r["status"] for r in rows} == {"ok"} and {"source", "edit"} <= set(table["columns"])
    local = {r["id"]: r for r in read_rows(out)}
    for r in rows:
        assert r["clip_score"] == pytest.approx(local[r["id"]]["clip_score"])
    art = next(r.artifact for r in recs if r.WhichOneof("record_type") == "artifact")
    assert art.type == "run_table"
    images = [e for e in art.manifest.contents if e.path.endswith(".png")]
    assert len(images) == 2 * 3  # source, edit, target per sample (sdedit has no reconstruction)
    from PIL import Image

    for e in images:
        assert Path(e.local_path).is_relative_to(tmp_path / "wandb_data")
        with Image.open(e.local_path) as im:
            assert im.size == (16, 16)


def test_oig_benchmark_reports_ratios_and_the_compute_floor(tiny_sd_path, tiny_clip):
    from experiments.bench_oig import main

    r = main(["--model", str(tiny_sd_path), "--clip", tiny_clip, "--steps", "4", "--repeats", "1"])
    assert r["plain_sampling_s"] > 0 and r["oig_edit_cold_s"] > 0 and r["oig_edit_warm_s"] > 0
    assert r["ratio_cold"] == pytest.approx(r["oig_edit_cold_s"] / r["plain_sampling_s"])
    assert set(r["oig_phases_cold_s"]) >= {"inversion", "reconstruction", "editing"}
    assert set(r["step_components_ms"]) == {"unet_fwd_b2", "unet_fwd_b1", "unet_fwd_bwd_b1", "vae_clip_fwd_bwd"}
    assert 0 < r["floor_ratio_cold"]


def test_oig_defaults_are_calibrated_per_model():
    """The toy model ships its own OIG λ2 (validation-split calibration, experiments/README.md §1); SD
    keeps the paper's; oig_paper runs the paper's everywhere; the command line wins over both."""
    lam = lambda ov: (lambda c: (c.method.lambda1, c.method.lambda2))(_compose(ov))  # noqa: E731
    assert lam(["method=oig"]) == (0.1, 100.0) and lam(["method=oig_plus"]) == (0.1, 100.0)
    assert lam(["method=oig", "model=sd14"]) == (0.1, 1.0) and lam(["experiment=table1", "method=oig"]) == (0.1, 1.0)
    assert lam(["method=oig_paper"]) == (0.1, 1.0)
    assert lam(["method=oig", "method.lambda2=3"]) == (0.1, 3)
    assert "oig_paper" in _sweep_values(_compose(["experiment=toy_table"]), "method")
    assert _sweep_values(_compose(["experiment=toy_benchmark"]), "method") == \
        _sweep_values(_compose(["experiment=toy_table"]), "method")
    assert _compose(["experiment=toy_benchmark"]).dataset.n_per_task == 12
