"""``oig-report`` on PIE-Bench rows written by hand: the ten editing types plus all, PIE-Bench's
Table 1 units (structure x10^3, LPIPS x10^3, MSE x10^4, SSIM x10^2; PSNR and CLIP as they are)
and the published Table 1 row next to each method that reproduces one."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from oig import report
from oig.data.pie_bench import EDITING_TYPES

SCALE = {"structure_dist": 1e3, "bg_psnr": 1.0, "bg_lpips": 1e3, "bg_mse": 1e4, "bg_ssim": 1e2,
         "clip_score": 1.0, "clip_edit_region": 1.0}
PER_TYPE = 3  # samples per editing type


def _value(metric: str, t: int, j: int, method_shift: float) -> float:
    """A distinct, exactly known value per (metric, type, sample)."""
    base = {"structure_dist": 0.01 * (t + 1), "bg_psnr": 20.0 + t, "bg_lpips": 0.1 + 0.01 * t,
            "bg_mse": 0.002 * (t + 1), "bg_ssim": 0.70 + 0.01 * t, "clip_score": 25.0 + 0.1 * t,
            "clip_edit_region": 21.0 + 0.1 * t}[metric]
    return base * (1 + 0.1 * j) + method_shift


def _rows(method: str, dataset: str = "pie_bench", shift: float = 0.0, hp: dict | None = None) -> list[dict]:
    rows = []
    for tid, name in EDITING_TYPES.items():
        t = int(tid)
        for j in range(PER_TYPE):
            r = {"id": f"{t}{j:011d}", "task": name, "method": method, "model": "sd14", "dataset": dataset,
                 "seed": 0, "status": "ok", "error": None, "source_prompt": "a", "target_prompt": "b",
                 "time_total": 1.0}
            r.update({f"hp_{k}": v for k, v in (hp or {}).items()})
            r.update({m: _value(m, t, j, shift) for m in SCALE})
            if name == "change_style" and j == 0:  # e.g. a mask covering the whole image: no unedited part
                for m in ("bg_psnr", "bg_lpips", "bg_mse", "bg_ssim"):
                    r[m] = "nan"  # how oig-run writes NaN into a row file
            rows.append(r)
    rows.append({"id": "900000000099", "task": "change_style", "method": method, "model": "sd14", "dataset": dataset,
                 "seed": 0, "status": "error", "error": "RuntimeError: boom", **{f"hp_{k}": v for k, v in (hp or {}).items()}})
    return rows


def _write_rows(run: Path, rows: list[dict], tags: list[str] | None = None):
    (run / "rows").mkdir(parents=True)
    for r in rows:
        (run / "rows" / f"{r['id']}.json").write_text(json.dumps(r))
    if tags is not None:
        (run / "config.yaml").write_text(f"tags: {json.dumps(tags)}\n")


def _expected(metric: str, types: list[int], shift: float = 0.0) -> float:
    vals = [_value(metric, t, j, shift) for t in types for j in range(PER_TYPE)
            if not (t == 9 and j == 0 and metric.startswith("bg_"))]
    return float(np.mean(vals)) * SCALE[metric]


@pytest.fixture
def pie_runs(tmp_path) -> Path:
    root = tmp_path / "multirun"
    _write_rows(root / "0_ddim_p2p", _rows("ddim_p2p"))
    # the second run as results.parquet only, PnP with PIE-Bench's reconstruction source branch
    pnp = pd.DataFrame(_rows("pnp", shift=0.5, hp={"source_branch": "reconstruction", "steps": 50}))
    for m in SCALE:
        pnp[m] = pd.to_numeric(pnp[m], errors="coerce")
    (root / "1_pnp").mkdir(parents=True)
    pnp.to_parquet(root / "1_pnp" / "results.parquet", index=False)
    _write_rows(root / "2_oig", _rows("oig", shift=1.0))
    return root


def test_per_type_table_has_ten_types_and_all_in_pie_bench_units(pie_runs):
    written = report.write_report([pie_runs])
    pie = pd.read_csv(written["pie_bench"], dtype={"editing_type_id": str}, keep_default_na=False, na_values=[""])
    for method, shift in (("ddim_p2p", 0.0), ("pnp", 0.5), ("oig", 1.0)):
        g = pie[pie["method"] == method]
        assert list(dict.fromkeys(g["editing_type_id"])) == ["all", *EDITING_TYPES]
        assert set(g["editing_type"]) == {"all", *EDITING_TYPES.values()}
        for metric, scale in SCALE.items():
            for tid in EDITING_TYPES:
                r = g[(g["editing_type_id"] == tid) & (g["metric"] == metric)].iloc[0]
                assert r["mean"] == pytest.approx(_expected(metric, [int(tid)], shift), rel=1e-9), (method, metric, tid)
                assert r["scale"] == scale and r["samples"] == PER_TYPE
                assert r["n"] == (PER_TYPE - 1 if tid == "9" and metric.startswith("bg_") else PER_TYPE)
            r = g[(g["editing_type_id"] == "all") & (g["metric"] == metric)].iloc[0]
            # the overall mean is over samples (PIE-Bench averages its per-image CSV), not over types
            assert r["mean"] == pytest.approx(_expected(metric, list(range(10)), shift), rel=1e-9), (method, metric)
            assert r["samples"] == 10 * PER_TYPE  # the error row is left out
    # published Table 1 values on the "all" lines of methods that reproduce a row
    pub = pie[pie["editing_type_id"] == "all"].set_index(["method", "metric"])
    assert pub.loc[("ddim_p2p", "structure_dist"), "published"] == 69.43
    assert pub.loc[("ddim_p2p", "bg_mse"), "published"] == 219.88
    assert pub.loc[("ddim_p2p", "clip_edit_region"), "published"] == 22.44
    assert pub.loc[("pnp", "bg_lpips"), "published"] == 113.46  # DDIM + PnP: the reconstruction source branch
    assert pub.loc[("ddim_p2p", "bg_psnr"), "published_row"] == "DDIM + P2P"
    assert math.isnan(pub.loc[("oig", "bg_psnr"), "published"])
    assert pie.loc[pie["editing_type_id"] != "all", "published"].isna().all()


def test_markdown_shows_the_scaled_tables_and_the_published_column(pie_runs):
    md = report.write_report([pie_runs])["markdown"].read_text()
    sec = md.split("## PIE-Bench (Table 1 units)")[1].split("## Task")[0]
    overall = sec.split("### All editing types")[1].split("### Per editing type")[0]
    header = next(x for x in overall.splitlines() if x.startswith("| method"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "method", "setting", "n", "Structure ×10³ ↓", "PSNR ↑", "LPIPS ×10³ ↓", "MSE ×10⁴ ↓", "SSIM ×10² ↑",
        "CLIP whole ↑", "CLIP edited ↑"]
    line = next(x for x in overall.splitlines() if x.startswith("| ddim_p2p"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2] == "30" and cells[3].startswith(f"{_expected('structure_dist', list(range(10))):.2f} ± ")
    assert cells[4].endswith("(n=29)")  # PSNR: one sample without an unedited part
    pub = next(x for x in overall.splitlines() if x.startswith("| published: DDIM + P2P"))
    assert [c.strip() for c in pub.strip("|").split("|")][3:] == ["69.43", "17.87", "208.80", "219.88", "71.14",
                                                                  "25.01", "22.44"]
    assert "| published: DDIM + PnP |" in overall and "| published: Null-text" not in overall
    assert not any(x.startswith("| published") for x in overall.split("| oig |")[1].splitlines()[1:])

    per = sec.split("### Per editing type: ddim_p2p")[1].split("###")[0]
    head = next(x for x in per.splitlines() if x.startswith("| metric"))
    cols = [c.strip() for c in head.strip("|").split("|")]
    assert cols == ["metric", *[f"{k} {v}" for k, v in EDITING_TYPES.items()], "all", "published (DDIM + P2P)"]
    mse = [c.strip() for c in next(x for x in per.splitlines() if x.startswith("| MSE")).strip("|").split("|")]
    assert mse[1:11] == [f"{_expected('bg_mse', [t]):.2f}" + (" (n=2)" if t == 9 else "") for t in range(10)]
    assert mse[11] == f"{_expected('bg_mse', list(range(10))):.2f} (n=29)" and mse[12] == "219.88"
    ssim = [c.strip() for c in next(x for x in per.splitlines() if x.startswith("| SSIM")).strip("|").split("|")]
    assert ssim[1] == f"{_expected('bg_ssim', [0]):.2f}" == "77.00"  # 0.70 -> 70, 0.77, 0.84 -> 77.00 x10^2
    samples = [c.strip() for c in next(x for x in per.splitlines() if x.startswith("| samples")).strip("|").split("|")]
    assert samples[1:12] == [str(PER_TYPE)] * 10 + ["30"]
    oig = sec.split("### Per editing type: oig")[1]
    assert next(x for x in oig.splitlines() if x.startswith("| metric")).rstrip().endswith("| published |")


def test_preset_tag_marks_pie_bench_runs_and_other_runs_get_no_section(tmp_path):
    """A run of the pie_bench preset (config tags) counts whatever its dataset is called; a toy run does not."""
    tagged = tmp_path / "tagged"
    _write_rows(tagged / "run", _rows("masactrl", dataset="pie_bench_shard_copy"), tags=["pie_bench"])
    written = report.write_report([tagged])
    pie = pd.read_csv(written["pie_bench"], dtype={"editing_type_id": str})
    assert set(pie["method"]) == {"masactrl"}
    assert pie.loc[(pie["editing_type_id"] == "all") & (pie["metric"] == "structure_dist"), "published"].iloc[0] == 28.38
    assert "| published: DDIM + MasaCtrl |" in written["markdown"].read_text()

    toy = tmp_path / "toy"
    rows = [{**r, "task": "shape_swap"} for r in _rows("ddim_p2p", dataset="toyworld")]
    _write_rows(toy / "run", rows, tags=["toy"])
    written = report.write_report([toy])
    assert "pie_bench" not in written and not (toy / "report_pie_bench.csv").exists()
    assert "## PIE-Bench" not in written["markdown"].read_text()


def test_published_row_mapping():
    assert report.pie_bench_published_row("null_text_p2p") == ("Null-text", "P2P")
    assert report.pie_bench_published_row("pix2pix_zero") == ("DDIM", "Pix2Pix-Zero")
    assert report.pie_bench_published_row("pnp", {"source_branch": "inversion"}) == ("DirectInversion", "PnP")
    assert report.pie_bench_published_row("pnp") == ("DirectInversion", "PnP")
    assert report.pie_bench_published_row("instruct_pix2pix") is None
    for key, vals in report.PIE_BENCH_TABLE1.items():
        assert len(vals) == len(report.PIE_BENCH_COLUMNS), key
