"""Paired comparisons (``eval.paired``) and the report's opening (headline table, paired comparison,
λ sweeps, per-task rule) on synthetic rows with a known effect: one method better by a fixed
margin on every sample, one identical to the reference, one worse; a borderline p-value that Holm
turns into "no difference"; bootstrap CIs that cover the true difference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as st

from eval.paired import holm, paired_bootstrap_ci, paired_comparisons, verdict, wilcoxon_p
from oig import report

METRICS = {"clip_score": "higher", "structure_dist": "lower"}


# ------------------------------------------------------------------ eval.paired
def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 -> 3*0.01, max(., 2*0.03), max(., 1*0.04)
    assert holm([0.01, 0.04, 0.03]).tolist() == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.2, 0.5]).tolist() == pytest.approx([0.4, 0.5])
    assert holm([0.6, 0.9]).tolist() == [1.0, 1.0]  # capped at 1
    out = holm([0.01, math.nan, 0.02])  # NaN is not part of the family (m = 2)
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.02)
    assert holm([0.04]).tolist() == [0.04]


def test_wilcoxon_and_bootstrap_edge_cases():
    assert wilcoxon_p(np.zeros(12)) == 1.0  # identical methods: no test statistic, p = 1
    assert math.isnan(wilcoxon_p([]))
    assert paired_bootstrap_ci(np.zeros(12)) == (0.0, 0.0)
    lo, hi = paired_bootstrap_ci(np.full(20, 0.1))  # a fixed margin on every sample
    assert lo == pytest.approx(0.1) and hi == pytest.approx(0.1)
    assert wilcoxon_p(np.full(20, 0.1)) == pytest.approx(2 / 2**20)  # every difference tied
    assert wilcoxon_p(np.arange(1, 11) * 0.01) == pytest.approx(2 / 2**10)  # exact: all ten positive
    d = np.random.default_rng(3).normal(0.1, 0.2, 30)
    assert paired_bootstrap_ci(d, seed=0) == paired_bootstrap_ci(d, seed=0)  # seeded
    assert paired_bootstrap_ci(d, seed=0) != paired_bootstrap_ci(d, seed=1)
    assert all(math.isnan(x) for x in paired_bootstrap_ci([]))
    assert verdict(0.1, 0.01, "higher") == "better" and verdict(0.1, 0.01, "lower") == "worse"
    assert verdict(-0.1, 0.01, "lower") == "better" and verdict(0.1, 0.2, "higher") == "no difference"
    with pytest.raises(ValueError, match="'higher' or 'lower'"):
        verdict(0.1, 0.01, "up")


def test_wilcoxon_p_equals_scipy():
    """Exact with ties = scipy's exhaustive permutation p-value; without ties = scipy's exact one;
    beyond ``exact_max`` scipy's normal approximation."""
    rng = np.random.default_rng(5)
    for n in (5, 7, 8):  # ties and zeros (scipy permutes all 2^n sign flips)
        d = rng.integers(-2, 3, n).astype(float)
        d[0] = 1.0
        assert wilcoxon_p(d) == pytest.approx(st.wilcoxon(d, method="auto").pvalue, rel=1e-9), d
    for n in (10, 30):
        d = rng.normal(size=n)
        assert wilcoxon_p(d) == pytest.approx(st.wilcoxon(d, method="exact").pvalue, rel=1e-9)
    d = rng.normal(0.1, 1, 200)
    assert wilcoxon_p(d) == pytest.approx(st.wilcoxon(d, method="asymptotic").pvalue, rel=1e-12)
    assert wilcoxon_p(d[:40], exact_max=10) == pytest.approx(st.wilcoxon(d[:40], method="asymptotic").pvalue)
    assert wilcoxon_p(np.full(12, 2.0)) == pytest.approx(2 / 2**12)  # tied: every sign flip, exactly


def test_bootstrap_ci_covers_the_true_difference():
    """200 synthetic paired samples (n = 30, true mean difference 0.1): the 95% intervals cover 0.1
    about 95% of the time (percentile bootstrap runs slightly short at n = 30), and agree with the
    t interval of the differences."""
    rng = np.random.default_rng(0)
    covered, widths = 0, []
    for k in range(200):
        d = 0.1 + rng.normal(0, 0.2, 30)
        lo, hi = paired_bootstrap_ci(d, n_resamples=2000, seed=k)
        covered += lo <= 0.1 <= hi
        widths.append((hi - lo) / (2 * st.t.ppf(0.975, 29) * d.std(ddof=1) / math.sqrt(30)))
    assert 0.90 <= covered / 200 <= 0.99, covered
    assert 0.9 < float(np.median(widths)) < 1.05  # about the t interval's width


def _rows(method: str, values: dict[str, np.ndarray], **extra) -> list[dict]:
    n = len(next(iter(values.values())))
    return [{"id": f"s{i:03d}", "dataset": "d", "method": method, "setting": "", "status": "ok", "task": "t",
             **{m: float(v[i]) for m, v in values.items()}, **extra} for i in range(n)]


def test_verdicts_on_a_known_effect():
    rng = np.random.default_rng(1)
    n, margin = 24, 0.5
    ref = {"clip_score": rng.uniform(20, 30, n), "structure_dist": rng.uniform(0.05, 0.2, n)}
    noise = rng.normal(0, 0.3, n)
    rows = pd.DataFrame(
        _rows("ddim_word_swap", ref)
        + _rows("better", {"clip_score": ref["clip_score"] + margin, "structure_dist": ref["structure_dist"] - 0.01})
        + _rows("same", ref)
        + _rows("worse", {"clip_score": ref["clip_score"] - margin, "structure_dist": ref["structure_dist"] + 0.01})
        + _rows("noisy", {"clip_score": ref["clip_score"] + margin + noise, "structure_dist": ref["structure_dist"]}))
    res = paired_comparisons(rows, {"method": "ddim_word_swap"},
                             [{"method": m} for m in ("better", "same", "worse", "noisy")], METRICS)
    got = res.set_index(["method", "metric"])
    assert got.loc[("better", "clip_score"), "verdict"] == "better"
    assert got.loc[("better", "structure_dist"), "verdict"] == "better"  # lower is better: -0.01 wins
    assert got.loc[("worse", "clip_score"), "verdict"] == "worse"
    assert got.loc[("worse", "structure_dist"), "verdict"] == "worse"
    for m in METRICS:
        s = got.loc[("same", m)]
        assert s["verdict"] == "no difference" and s["diff"] == 0 and s["p"] == 1.0 and s["p_holm"] == 1.0
        assert (s["ci_low"], s["ci_high"]) == (0.0, 0.0)
    b = got.loc[("better", "clip_score")]
    assert b["n"] == n and b["diff"] == pytest.approx(margin) and b["ci_low"] <= margin <= b["ci_high"]
    assert b["ref_mean"] == pytest.approx(ref["clip_score"].mean())
    assert b["mean"] == pytest.approx(ref["clip_score"].mean() + margin)
    z = got.loc[("noisy", "clip_score")]
    assert z["verdict"] == "better" and z["ci_low"] <= margin <= z["ci_high"] and z["ci_low"] > 0
    assert z["diff"] == pytest.approx(margin + noise.mean())
    # Holm across the four methods per metric
    for m in METRICS:
        fam = res[res["metric"] == m]
        assert fam["p_holm"].to_numpy() == pytest.approx(holm(fam["p"].to_numpy()))


def test_holm_turns_a_borderline_p_value_into_no_difference():
    """Differences 0.01..0.10 with the 6th negative: exact Wilcoxon p = 0.027 < 0.05 alone; with two
    more methods compared (one identical, one pure noise) Holm multiplies it by 3: 0.082, no difference."""
    d = np.arange(1, 11) * 0.01
    d[5] *= -1
    p = wilcoxon_p(d)
    assert 0.05 / 3 < p < 0.05  # borderline by construction
    base = np.linspace(20, 29, 10)
    noise = np.array([0.3, -0.2, 0.1, -0.4, 0.25, -0.05, 0.15, -0.35, 0.2, -0.1])
    rows = pd.DataFrame(_rows("ref", {"clip_score": base}) + _rows("edge", {"clip_score": base + d})
                        + _rows("same", {"clip_score": base}) + _rows("noise", {"clip_score": base + noise}))
    alone = paired_comparisons(rows, {"method": "ref"}, [{"method": "edge"}], {"clip_score": "higher"})
    assert alone["p"].iloc[0] == pytest.approx(p) and alone["p_holm"].iloc[0] == pytest.approx(p)
    assert alone["verdict"].iloc[0] == "better"
    fam = paired_comparisons(rows, {"method": "ref"}, [{"method": m} for m in ("edge", "same", "noise")],
                             {"clip_score": "higher"}).set_index("method")
    assert fam.loc["noise", "p"] > p  # the borderline one is the smallest: multiplied by 3
    assert fam.loc["edge", "p_holm"] == pytest.approx(3 * p)
    assert fam.loc["edge", "verdict"] == "no difference"


def test_pairs_are_the_ids_both_have_and_nan_pairs_are_dropped():
    ref = pd.DataFrame(_rows("ref", {"clip_score": np.arange(10.0)}))
    other = pd.DataFrame(_rows("m", {"clip_score": np.arange(10.0) + 1}))
    other = other[other["id"] != "s000"].copy()  # s000 failed for m: not a pair
    other.loc[other["id"] == "s001", "clip_score"] = math.nan  # no value: not a pair for this metric
    extra = pd.DataFrame(_rows("m", {"clip_score": np.array([100.0])}))
    extra["id"] = "only_m"
    res = paired_comparisons(pd.concat([ref, other, extra]), {"method": "ref"}, [{"method": "m"}],
                             {"clip_score": "higher"})
    assert res["n"].iloc[0] == 8 and res["diff"].iloc[0] == pytest.approx(1.0)
    with pytest.raises(KeyError, match="'nope' is not a column"):
        paired_comparisons(ref, {"method": "ref"}, [{"method": "m"}], {"nope": "higher"})


# ------------------------------------------------------------------ the report's opening
def _toy_rows(method: str, n_per_task: int, shift: float = 0.0, hp: dict | None = None,
              tasks=("color_change", "shape_swap"), seed: int = 0) -> list[dict]:
    """Toy-world rows: the same samples (ids) for every method; ``shift`` added to background PSNR
    (both columns) and CLIP score of every sample."""
    rng = np.random.default_rng(seed)
    rows = []
    for t in tasks:
        for j in range(n_per_task):
            psnr = 20.0 + rng.uniform(0, 5)
            r = {"id": f"toy_{t}_{j:04d}", "task": t, "method": method, "model": "toy", "dataset": "toyworld",
                 "seed": 0, "status": "ok", "error": None, "source_prompt": "a red circle", "target_prompt": "a red square",
                 "toy_edit_success": float(j % 2), "toy_attrs_kept": 1.0, "toy_structure_kept": float(j % 3 == 0),
                 "toy_bg_psnr": psnr + shift, "bg_psnr": psnr + shift, "clip_acc": 1.0,
                 "clip_score": 25.0 + rng.uniform(0, 2) + shift, "time_total": 0.5}
            r.update({f"hp_{k}": v for k, v in (hp or {}).items()})
            rows.append(r)
    return rows


def _write_run(folder: Path, rows: list[dict], tags: list[str] | None = None):
    (folder / "rows").mkdir(parents=True)
    for r in rows:
        (folder / "rows" / f"{r['id']}.json").write_text(json.dumps(r))
    if tags is not None:
        (folder / "config.yaml").write_text(f"tags: {json.dumps(tags)}\n")


@pytest.fixture
def toy_table(tmp_path) -> Path:
    """ddim_word_swap (reference), sdedit = reference + 2 dB / +2 CLIP on every sample, masactrl =
    identical to the reference; 6 samples per task (per-task tables withheld)."""
    root = tmp_path / "toy_table"
    _write_run(root / "0_ddim_word_swap", _toy_rows("ddim_word_swap", 6), tags=["toy_table"])
    _write_run(root / "1_sdedit", _toy_rows("sdedit", 6, shift=2.0), tags=["toy_table"])
    masactrl = _toy_rows("masactrl", 6)
    for r in masactrl:
        r["time_total"] = 2.0
    _write_run(root / "2_masactrl", masactrl, tags=["toy_table"])
    return root


def _section(md: str, heading: str) -> str:
    """The text after ``heading`` up to the next ``## `` heading."""
    return md.split(heading, 1)[1].split("\n## ")[0]


def _table(section: str) -> list[list[str]]:
    lines = [x for x in section.splitlines() if x.startswith("|")]
    return [[c.strip() for c in x.strip("|").split("|")] for x in lines if not x.startswith("|---")]


def test_report_opens_with_the_headline_table_and_the_paired_comparison(toy_table):
    written = report.write_report([toy_table])
    md = written["markdown"].read_text()
    heads = [x for x in md.splitlines() if x.startswith("## ")]
    assert heads[:2] == ["## Headline: toy world", "## Paired comparison with ddim_word_swap (toy world)"]

    headline = _table(_section(md, "## Headline: toy world"))
    assert headline[0] == ["method", "n", "edit success ↑", "attributes kept ↑", "structure kept ↑",
                           "background PSNR (dB) ↑", "CLIP accuracy ↑", "time (s) ↓"]
    rows = {r[0]: r for r in headline[1:]}
    assert list(rows) == ["ddim_word_swap", "sdedit", "masactrl"] and rows["sdedit"][1] == "12"
    psnr = np.mean([r["toy_bg_psnr"] for r in _toy_rows("ddim_word_swap", 6)])
    assert rows["sdedit"][5].startswith(f"**{psnr + 2:.3f}** ± ")  # best background PSNR, in bold
    assert rows["ddim_word_swap"][5].startswith(f"{psnr:.3f} ± ")
    assert rows["masactrl"][7].startswith("2.000") and rows["sdedit"][7].startswith("**0.500**")  # time: lower is better
    assert all(r[2].startswith("**0.500**") for r in rows.values())  # a tie: every best value marked

    paired = _table(_section(md, "## Paired comparison with ddim_word_swap (toy world)"))
    assert paired[0][:2] == ["compared", "pairs"] and paired[0][5] == "background PSNR (dB) ↑"
    sd, ma = {r[0]: r for r in paired[1:]}["sdedit"], {r[0]: r for r in paired[1:]}["masactrl"]
    assert sd[1] == "12" and sd[5] == "**better** +2.000 [+2.000, +2.000]"
    assert ma[5] == "no difference +0.000 [+0.000, +0.000]" and ma[7].startswith("**worse** +1.500")
    assert "Against `ddim_word_swap` (DDIM + word swap, the toy world's baseline; --ref METHOD picks another)." in md

    csv = pd.read_csv(written["paired"], keep_default_na=False, na_values=[""])
    r = csv[(csv.method == "sdedit") & (csv.metric == "toy_bg_psnr")].iloc[0]
    assert r["verdict"] == "better" and r["n"] == 12 and r["diff"] == pytest.approx(2.0) and r["reference"] == "ddim_word_swap"
    assert r["p"] == pytest.approx(wilcoxon_p(np.full(12, 2.0)))
    assert set(csv.metric) == {"toy_edit_success", "toy_attrs_kept", "toy_structure_kept", "toy_bg_psnr", "clip_acc",
                               "time_total"}

    # n = 6 per task: no per-task table, one line saying so
    assert ("Per-task tables (toy world) are shown only where every cell has n ≥ 10: no task qualifies here "
            "(smallest n: 6); the per-task statistics of every metric are in report.csv.") in md
    assert "### color_change" not in md
    # bg_psnr duplicates toy_bg_psnr: once in the appendix, with a note; everything in report.csv
    overall = md.split("### Overall")[1].split("###")[0]
    header = next(x for x in overall.splitlines() if x.startswith("| method"))
    assert "toy_bg_psnr ↑" in header and "| bg_psnr" not in header
    assert "Identical columns shown once: `toy_bg_psnr` (= `bg_psnr`)." in md
    assert {"bg_psnr", "toy_bg_psnr"} <= set(pd.read_csv(written["csv"]).metric)
    assert report.NAN_RULE in md and "Paired comparisons use the samples both sides have" in md
    details = _table(_section(md, "### Paired comparisons: every p-value"))
    assert details[0][-3:] == ["p", "p (Holm)", "verdict"] and len(details) == 1 + 2 * 6


def test_per_task_tables_need_ten_samples_per_cell(tmp_path):
    root = tmp_path / "big"
    _write_run(root / "a", _toy_rows("ddim_word_swap", 10))
    _write_run(root / "b", _toy_rows("sdedit", 10, shift=1.0))
    md = report.write_report([root])["markdown"].read_text()
    per = _section(md, "## Per task")
    assert "### color_change (toy world)" in per and "### shape_swap (toy world)" in per
    t = _table(per.split("### color_change (toy world)")[1].split("###")[0])
    assert [r[0] for r in t[1:]] == ["ddim_word_swap", "sdedit"] and t[1][1] == "10"
    # one task below 10 in one cell: that task only is listed
    root2 = tmp_path / "mixed"
    _write_run(root2 / "a", _toy_rows("ddim_word_swap", 10))
    _write_run(root2 / "b", _toy_rows("sdedit", 10, shift=1.0)[:-1])  # shape_swap: 9 samples
    md = report.write_report([root2])["markdown"].read_text()
    per = _section(md, "## Per task")
    assert "### color_change (toy world)" in per and "### shape_swap" not in per
    assert "not shown for shape_swap (smallest n: 9)" in per


def test_lambda_sweep_is_compared_with_lambda_zero(tmp_path):
    root = tmp_path / "l2"
    _write_run(root / "0", _toy_rows("oig", 6, hp={"lambda2": 0.0, "lambda1": 0.1}))
    _write_run(root / "1", _toy_rows("oig", 6, hp={"lambda2": 1.0, "lambda1": 0.1}))  # identical to λ2 = 0
    _write_run(root / "2", _toy_rows("oig", 6, shift=3.0, hp={"lambda2": 10.0, "lambda1": 0.1}))
    written = report.write_report([root])
    md = written["markdown"].read_text()
    sec = _section(md, "## λ sweep: oig, λ2 against λ2 = 0 (toy world)")
    t = {r[0]: r for r in _table(sec)[1:]}
    assert list(t) == ["lambda2=1", "lambda2=10"]
    assert t["lambda2=1"][5].startswith("no difference +0.000") and t["lambda2=10"][5].startswith("**better** +3.000")
    assert "No paired comparison: the reference `ddim_word_swap`" in md  # no baseline among these runs
    csv = pd.read_csv(written["paired"], keep_default_na=False)
    assert set(csv.comparison) == {"sweep lambda2"} and set(csv.reference) == {"oig (lambda2=0)"}
    # a sweep without λ = 0 says so
    root2 = tmp_path / "l2b"
    _write_run(root2 / "1", _toy_rows("oig", 6, hp={"lambda2": 1.0}))
    _write_run(root2 / "2", _toy_rows("oig", 6, hp={"lambda2": 10.0}))
    md = report.write_report([root2])["markdown"].read_text()
    assert "No λ2 = 0 run among these rows" in md


def test_ref_option_and_other_presets(toy_table, tmp_path, caplog):
    out = tmp_path / "out"
    assert report.main([str(toy_table), "--out", str(out), "--ref", "sdedit"]) == 0
    md = (out / "report.md").read_text()
    assert "## Paired comparison with sdedit (toy world)" in md and "(given by --ref)" in md
    t = {r[0]: r for r in _table(_section(md, "## Paired comparison with sdedit"))[1:]}
    assert t["ddim_word_swap"][5] == "**worse** -2.000 [-2.000, -2.000]"
    assert report.main([str(toy_table), "--out", str(out), "--ref", "nope"]) == 2
    assert "--ref nope: no rows of that method" in caplog.text

    # PIE-Bench rows: its seven columns in its units, reference ddim_p2p
    root = tmp_path / "pie"
    for i, (m, shift) in enumerate((("ddim_p2p", 0.0), ("pnp", 0.001))):
        rows = [{"id": f"{j:012d}", "task": "change_object", "method": m, "model": "sd14", "dataset": "pie_bench",
                 "seed": 0, "status": "ok", "structure_dist": 0.02 + 0.001 * j - shift, "bg_psnr": 20.0 + j,
                 "bg_lpips": 0.1, "bg_mse": 0.002, "bg_ssim": 0.8, "clip_score": 25.0, "clip_edit_region": 22.0}
                for j in range(8)]
        _write_run(root / f"{i}_{m}", rows)
    md = report.write_report([root])["markdown"].read_text()
    head = _table(_section(md, "## Headline: PIE-Bench"))
    assert head[0][2:] == ["Structure ×10³ ↓", "PSNR ↑", "LPIPS ×10³ ↓", "MSE ×10⁴ ↓", "SSIM ×10² ↑", "CLIP whole ↑",
                           "CLIP edited ↑"]
    rows = {r[0]: r for r in head[1:]}
    assert rows["pnp"][2].startswith("**22.50** ± ")  # structure 0.0225 -> 22.50 x10^3, the lower one
    assert rows["ddim_p2p"][2].startswith("23.50 ± ") and rows["ddim_p2p"][3].startswith("**23.50** ± ")  # PSNR: a tie
    paired = _table(_section(md, "## Paired comparison with ddim_p2p (PIE-Bench)"))
    assert paired[1][0] == "pnp" and paired[1][2] == "**better** -1.00 [-1.00, -1.00]"
    assert "## PIE-Bench (Table 1 units)" in md  # the detailed section stays
