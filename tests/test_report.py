"""``oig-report`` and the analysis notebook on tiny real runs (tiny random SD + CLIP, toy world):
tables with CIs and the error/NaN rules, the qualitative grid, the λ2 trade-off plot, merging of
shards with duplicate removal, CLI errors, and the notebook executed by nbclient."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

import oig.run
from oig import report
from oig.run import CONF_DIR

ROOT = Path(__file__).resolve().parent.parent  # the checkout (CONF_DIR is inside the package)
TASKS = ["appearance_change", "background_change", "color_change", "shape_swap"]


def tiny_overrides(sd: str, clip: str, cache: Path) -> list[str]:
    return [f"model.pretrained={sd}", f"model.guidance_clip.name={clip}", f"metrics.clip.model={clip}",
            f"metrics.structure.clip_model={clip}", f"cache.dir={cache}", "device=cpu", "progress=false",
            "dataset.n_per_task=1"]


def run_inprocess(out: Path, overrides: list[str]) -> Path:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*overrides, f"paths.output_dir={out}"])
    oig.run.run(cfg, output_dir=out)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_sd_path):
    from oig.testing import make_tiny_clip

    clip = make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))
    return tiny_overrides(tiny_sd_path, clip, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny) -> Path:
    """A two-method multirun folder: ddim_word_swap and sdedit, 4 toy samples each."""
    sweep = tmp_path_factory.mktemp("multirun") / "2025-01-01_00-00-00_pair"
    for i, m in enumerate(["ddim_word_swap", "sdedit"]):
        run_inprocess(sweep / f"{i}_{m}", [f"method={m}", "method.steps=3", *tiny])
    return sweep


@pytest.fixture(scope="module")
def lambda2(tmp_path_factory, tiny) -> Path:
    """A 3-point λ2 sweep of OIG through the real preset (batched: one run, one folder per point)."""
    tmp = tmp_path_factory.mktemp("l2")
    sweep = tmp / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "OIG_ROOT": str(tmp)}
    p = subprocess.run([sys.executable, "-m", "oig.run", "experiment=lambda2_sweep", "method.lambda2=[0,1.0,3.0]",
                        "method.steps=3", f"hydra.run.dir={sweep}", *tiny], cwd=tmp, env=env, capture_output=True,
                       text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return sweep


def rows_of(run_dir: Path) -> pd.DataFrame:
    return pd.DataFrame(oig.run.load_rows(run_dir))


def is_png(p: Path, min_side: int = 100) -> tuple[int, int]:
    with Image.open(p) as im:
        assert im.format == "PNG"
        im.load()
        assert min(im.size) >= min_side, im.size
        return im.size


def is_pdf(p: Path):
    data = p.read_bytes()
    assert data.startswith(b"%PDF-") and b"%%EOF" in data[-1024:], p


# ------------------------------------------------------------------ tables and grid
def test_two_method_multirun_report(pair):
    from scipy import stats as st

    written = report.write_report([pair])
    for k in ("markdown", "csv", "rows", "grid_png", "grid_pdf"):
        assert written[k].exists() and written[k].parent == pair, k
    assert not list(pair.glob("report_tradeoff_*")), "no sweep, no trade-off plot"
    is_png(written["grid_png"])
    is_pdf(written["grid_pdf"])

    stats = pd.read_csv(written["csv"], keep_default_na=False, na_values=[""])
    assert set(stats.task) == {"all", *TASKS}
    assert {"mean", "std", "n", "ci95", "n_nan", "rows", "errors", "better"} <= set(stats.columns)
    for m in ["ddim_word_swap", "sdedit"]:
        raw = rows_of(pair / f"{['ddim_word_swap', 'sdedit'].index(m)}_{m}")
        for metric in ["clip_score", "toy_bg_psnr", "time_total"]:
            s = stats[(stats.task == "all") & (stats.method == m) & (stats.metric == metric)].iloc[0]
            v = raw[metric].to_numpy(float)
            assert s.n == 4 and s.rows == 4 and s.errors == 0
            assert s["mean"] == pytest.approx(v.mean())
            assert s.ci95 == pytest.approx(st.t.ppf(0.975, 3) * v.std(ddof=1) / 2)
        per_task = stats[(stats.task == "color_change") & (stats.method == m) & (stats.metric == "clip_score")]
        assert per_task.n.tolist() == [1] and math.isnan(per_task.ci95.iloc[0])

    md = written["markdown"].read_text()
    assert report.NAN_RULE in md
    heads = [x for x in md.splitlines() if x.startswith("## ")]
    assert heads[:2] == ["## Headline: toy world", "## Paired comparison with ddim_word_swap (toy world)"]
    paired = md.split("## Paired comparison with ddim_word_swap (toy world)")[1].split("\n## ")[0]
    assert next(x for x in paired.splitlines() if x.startswith("| sdedit |")).split("|")[2].strip() == "4"  # pairs
    overall = md.split("### Overall")[1].split("\n#")[0]
    header = next(line for line in overall.splitlines() if line.startswith("| method"))
    assert "clip_acc ↑" in header and "structure_dist ↓" in header and "time_total ↓" in header
    assert "setting" not in header  # nothing swept
    body = [line for line in overall.splitlines() if line.startswith("| ddim") or line.startswith("| sdedit")]
    assert [b.split("|")[1].strip() for b in body] == ["ddim_word_swap", "sdedit"]
    assert all(" ± " in b for b in body)
    assert "## Task" not in md and "no task qualifies here (smallest n: 1)" in md  # n = 1 per task: no tables

    df = report.load_results([pair])
    ids = report.grid_samples(df, 6)
    assert sorted(i.split("_0000")[0].removeprefix("toy_") for i in ids) == TASKS  # one per task, all 4
    fig = report.grid_figure(df, 2)
    axes = np.array(fig.axes).reshape(2, -1)
    assert [a.get_title() for a in axes[0]] == ["source", "target", "ddim_word_swap", "sdedit"]
    renderer = fig.canvas.get_renderer()
    for t in fig.texts:  # each row's id and prompts: inside the figure, left of the first image (not clipped)
        bb = t.get_window_extent(renderer)
        assert bb.x0 >= 0 and bb.y0 >= 0 and bb.x1 <= axes[0][0].get_window_extent(renderer).x0
        assert bb.y1 <= fig.bbox.height
    assert [t.get_text().splitlines()[0] for t in fig.texts] == ids[:2]
    assert report.grid_samples(df) == ids  # default: 2 per task, at least 4 rows (here every sample: 1 per task)
    edit = np.asarray(Image.open(pair / "1_sdedit" / "images" / ids[0] / "edit.png").convert("RGB"))
    assert np.array_equal(axes[0][3].images[0].get_array(), edit)  # the same sample in every column


def test_errors_and_nan_values_follow_the_stated_rule(pair, tmp_path):
    d = tmp_path / "runs"
    shutil.copytree(pair, d)
    sd = d / "1_sdedit" / "rows"
    bad = json.loads((sd / "toy_shape_swap_0000.json").read_text())
    keep = ("id", "task", "method", "model", "dataset", "seed", "cache_hits", "cache_misses")
    err = {k: v for k, v in bad.items() if k in keep or k.startswith("hp_")}
    err.update(status="error", error="EditError: non-finite values (NaN/inf) in the latent after sampling")
    (sd / "toy_shape_swap_0000.json").write_text(json.dumps(err))
    nanrow = json.loads((sd / "toy_color_change_0000.json").read_text())
    nanrow["structure_dist"] = "nan"  # as the runner writes a NaN
    (sd / "toy_color_change_0000.json").write_text(json.dumps(nanrow))
    for f in d.rglob("results.parquet"):
        f.unlink()

    written = report.write_report([d], out=tmp_path / "out")
    stats = pd.read_csv(written["csv"])
    s = stats[(stats.task == "all") & (stats.method == "sdedit")].set_index("metric")
    assert s.loc["clip_score", "n"] == 3 and s.loc["clip_score", "errors"] == 1 and s.loc["clip_score", "rows"] == 4
    assert s.loc["structure_dist", "n"] == 2 and s.loc["structure_dist", "n_nan"] == 1
    ok = rows_of(d / "1_sdedit")
    ok = ok[ok.status == "ok"]
    assert s.loc["structure_dist", "mean"] == pytest.approx(ok.structure_dist.dropna().mean())
    md = written["markdown"].read_text()
    line = next(x for x in md.split("## Overall")[1].splitlines() if x.startswith("| sdedit"))
    assert line.split("|")[2].strip() == "3" and "(n=2)" in line
    runs = md.split("## Runs and errors")[1]
    sd_line = next(x for x in runs.splitlines() if x.startswith("| sdedit"))
    assert [c.strip() for c in sd_line.split("|")[3:7]] == ["1", "4", "3", "1"]
    assert "EditError: non-finite values" in sd_line


def test_shards_merge_and_duplicates_are_dropped_with_a_warning(tmp_path, tiny, caplog):
    sweep = tmp_path / "multirun" / "table"
    for s in (0, 1):
        run_inprocess(sweep / f"{s}_sdedit_shard{s}",
                      ["method=sdedit", "method.steps=3", "dataset.num_shards=2", f"dataset.shard={s}", *tiny])
    assert len(rows_of(sweep / "0_sdedit_shard0")) == 2 and len(rows_of(sweep / "1_sdedit_shard1")) == 2
    again = tmp_path / "rerun" / "0_sdedit_shard0"
    shutil.copytree(sweep / "0_sdedit_shard0", again)
    with caplog.at_level(logging.WARNING, logger="oig.report"):
        df = report.load_results([sweep, tmp_path / "rerun"])
    assert len(df) == 4 and sorted(df.id) == sorted(f"toy_{t}_0000" for t in TASKS)
    assert (df["_run"] != str(again)).all(), "the first folder given wins"
    warn = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("dropping 2 duplicate row(s)" in w and str(again) in w for w in warn), warn
    stats = report.statistics(df)
    assert stats[(stats.task == "all") & (stats.metric == "clip_score")].n.tolist() == [4]


def test_a_changed_hyperparameter_is_not_a_duplicate(pair, tmp_path):
    d = tmp_path / "runs"
    shutil.copytree(pair / "1_sdedit", d / "a")
    shutil.copytree(pair / "1_sdedit", d / "b")
    for p in (d / "b" / "rows").glob("*.json"):
        r = json.loads(p.read_text())
        r["hp_strength"] = 0.5
        p.write_text(json.dumps(r))
    df = report.load_results([d])
    assert len(df) == 8 and sorted(set(df.setting)) == ["strength=0.5", "strength=0.8"]


# ------------------------------------------------------------------ the λ2 sweep
def test_lambda2_sweep_gives_a_tradeoff_plot(lambda2):
    assert sorted(p.name for p in lambda2.iterdir() if p.is_dir() and not p.name.startswith(".")) == \
        ["0_oig_lambda2_0", "1_oig_lambda2_1.0", "2_oig_lambda2_3.0"]
    written = report.write_report([lambda2])
    png, pdf = lambda2 / "report_tradeoff_oig_lambda2.png", lambda2 / "report_tradeoff_oig_lambda2.pdf"
    assert written["report_tradeoff_oig_lambda2_png"] == png
    is_png(png)
    is_pdf(pdf)
    md = written["markdown"].read_text()
    assert "Swept: oig: lambda2" in md
    overall = md.split("### Overall")[1].split("\n#")[0]
    settings = [x.split("|")[2].strip() for x in overall.splitlines() if x.startswith("| oig")]
    assert settings == ["lambda2=0", "lambda2=1", "lambda2=3"]
    sweep = md.split("## λ sweep: oig, λ2 against λ2 = 0 (toy world)")[1].split("\n## ")[0]
    assert [x.split("|")[1].strip() for x in sweep.splitlines() if x.startswith("| lambda2")] == ["lambda2=1", "lambda2=3"]
    paired = pd.read_csv(written["paired"])
    assert set(paired.reference) == {"oig (lambda2=0)"} and (paired.n == 4).all()

    df = report.load_results([lambda2])
    stats = report.statistics(df)
    [(stem, fig)] = report.tradeoff_figures(df, stats)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "structure_dist ↓" and ax.get_ylabel() == "clip_score ↑"  # continuous CLIP metric first
    [line] = [ln for ln in ax.lines if ln.get_marker() == "o"]
    means = stats[stats.task == "all"].pivot_table(index="setting", columns="metric", values="mean")
    assert np.allclose(line.get_xdata(), means.loc[settings, "structure_dist"])
    assert np.allclose(line.get_ydata(), means.loc[settings, "clip_score"])
    assert [t.get_text() for t in ax.texts] == ["0", "1", "3"]  # the swept values (λ2 is in the title)
    _, fig2 = report.tradeoff_figures(df, stats, x="toy_bg_psnr", y="clip_score")[0]
    assert fig2.axes[0].get_xlabel() == "toy_bg_psnr ↑"


def test_per_job_lambda2_sweep_reports_like_the_batched_one(lambda2, tiny, tmp_path):
    """The per-job path (hydra.mode=MULTIRUN over the same key) stays: same folders, same settings and
    sample counts, metric means equal to the batched sweep's up to float rounding of the batch."""
    sweep = tmp_path / "per_job"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "OIG_ROOT": str(tmp_path)}
    p = subprocess.run([sys.executable, "-m", "oig.run", "experiment=lambda2_sweep", "hydra.mode=MULTIRUN",
                        "method.lambda2=0,1.0,3.0", "method.steps=3", f"hydra.sweep.dir={sweep}", *tiny], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert sorted(q.name for q in sweep.iterdir() if q.is_dir()) == \
        ["0_oig_lambda2_0", "1_oig_lambda2_1.0", "2_oig_lambda2_3.0"]
    a, b = report.load_results([sweep]), report.load_results([lambda2])
    sa, sb = report.statistics(a), report.statistics(b)
    key = ["method", "setting", "task", "metric"]
    m = sa.merge(sb, on=key, suffixes=("_job", "_batched"))
    assert len(m) == len(sa) == len(sb) and (m.n_job == m.n_batched).all()
    m = m[~m.metric.str.startswith(("time_", "peak_mem", "cache_", "source_feature", "inversion_", "reconstruction_"))]
    np.testing.assert_allclose(m.mean_batched, m.mean_job, rtol=0.02, atol=0.02)


def test_notebook_executes_on_a_sweep(lambda2, monkeypatch):
    import nbclient
    import nbformat
    from jupyter_client.manager import KernelManager

    assert KernelManager(kernel_name="python3").format_kernel_cmd()[0] == sys.executable  # the venv's python
    nb = nbformat.read(ROOT / "notebooks" / "analysis.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    monkeypatch.setenv("OIG_RUN_DIR", str(lambda2))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=180,
                            resources={"metadata": {"path": str(lambda2)}}).execute()
    outs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outs if o.output_type == "error"]
    pngs = [o for o in outs if "image/png" in o.get("data", {})]
    assert len(pngs) == 2  # the grid and the λ2 trade-off plot
    mds = "\n".join(o["data"]["text/markdown"] for o in outs if "text/markdown" in o.get("data", {}))
    assert "lambda2=0" in mds and "lambda2=3" in mds and " ± " in mds
    assert "12 rows (12 ok) from 3 run folder(s)" in "".join(o.get("text", "") for o in outs)


# ------------------------------------------------------------------ command line
def test_cli(pair, tmp_path, capsys, caplog):
    out = tmp_path / "out"
    assert report.main([str(pair), "--out", str(out), "--samples", "2", "--metrics", "clip_score,toy_edit_success"]) == 0
    md = (out / "report.md").read_text()
    header = next(x for x in md.split("## Overall")[1].splitlines() if x.startswith("| method"))
    assert header == "| method | n | clip_score ↑ | toy_edit_success ↑ |"
    assert np.array(report.grid_figure(report.load_results([pair]), 2).axes).size == 2 * 4
    caplog.clear()
    assert report.main([str(tmp_path / "missing")]) == 2
    assert "missing: no such folder" in caplog.text
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty")]) == 2
    assert "no run folders" in caplog.text
    assert report.main([str(pair), "--out", str(out), "--metrics", "nope"]) == 2
    assert "['nope'] are not columns" in caplog.text
    exe = shutil.which("oig-report", path=str(Path(sys.executable).parent))
    assert exe, "console script oig-report not installed"


def test_ablation_variants_are_labelled_by_name(tmp_path, tiny):
    sweep = tmp_path / "multirun" / "abl"
    for i, v in enumerate(["full", "clip_only"]):
        run_inprocess(sweep / f"{i}_{v}", ["experiment=ablation_triplet", f"ablation={v}", "method.steps=3",
                                           "dataset.tasks=[color_change,shape_swap]", *tiny])
    written = report.write_report([sweep])
    df = report.load_results([sweep])
    assert sorted(set(df.setting)) == ["clip_only", "full"] and set(df.hp_lambda2) == {0.0, 100.0}  # the toy model's calibrated λ2
    md = written["markdown"].read_text()
    rows = [x.split("|")[2].strip() for x in md.split("### Overall")[1].split("##")[0].splitlines()
            if x.startswith("| oig")]
    assert rows == ["clip_only", "full"]
    assert (sweep / "report_tradeoff_oig_variants.png").exists() and (sweep / "report_tradeoff_oig_variants.pdf").exists()
    _, fig = report.tradeoff_figures(df)[0]
    assert sorted(t.get_text() for t in fig.axes[0].texts) == ["clip_only", "full"]
    assert not fig.axes[0].lines or fig.axes[0].lines[0].get_linestyle() == "None"  # variants are not a curve


def test_a_folder_with_only_results_parquet_is_a_run(pair, tmp_path):
    d = tmp_path / "old_run"
    shutil.copytree(pair / "0_ddim_word_swap", d)
    shutil.rmtree(d / "rows")
    assert report.find_runs([tmp_path]) == [d]
    got = report.load_results([d]).drop(columns=["_run", "setting"]).sort_values("id").reset_index(drop=True)
    want = rows_of(pair / "0_ddim_word_swap").sort_values("id").reset_index(drop=True)
    pd.testing.assert_frame_equal(got[want.columns], want, check_dtype=False)
