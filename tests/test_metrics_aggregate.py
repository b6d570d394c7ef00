"""Aggregation: mean / std / n / 95% CI against numpy and scipy's t interval; NaN and inf rules."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from eval.aggregate import aggregate, summarize, to_markdown


def _rows():
    rng = np.random.default_rng(0)
    rows = []
    for method in ("ddim", "oig"):
        for i in range(7):
            rows.append({"method": method, "task": "a" if i % 2 else "b", "id": f"{method}{i}",
                         "clip_score": float(rng.normal(25, 3)), "bg_psnr": float(rng.normal(30, 5)),
                         "ok": bool(i % 3)})
    rows[0]["bg_psnr"] = math.nan
    rows[3]["bg_psnr"] = math.nan
    return rows


def test_stats_equal_numpy_and_scipy_t_interval():
    df = pd.DataFrame(_rows())
    agg = aggregate(df, by=["method"])
    assert set(agg["metric"]) == {"clip_score", "bg_psnr", "ok"}  # numeric/bool columns only
    for (method, metric), r in agg.set_index(["method", "metric"]).iterrows():
        v = df.loc[df.method == method, metric].astype(float).to_numpy()
        v = v[~np.isnan(v)]
        lo, hi = stats.t.interval(0.95, len(v) - 1, loc=v.mean(), scale=stats.sem(v))
        assert r["n"] == len(v)
        assert r["mean"] == pytest.approx(v.mean(), rel=1e-12)
        assert r["std"] == pytest.approx(v.std(ddof=1), rel=1e-12)
        assert r["ci95"] == pytest.approx((hi - lo) / 2, rel=1e-9)
    psnr = agg[(agg.method == "ddim") & (agg.metric == "bg_psnr")].iloc[0]
    assert psnr["n"] == 5 and psnr["n_nan"] == 2


def test_groups_and_no_groups():
    df = pd.DataFrame(_rows())
    two = aggregate(df, by=["method", "task"], metrics=["clip_score"])
    assert len(two) == 4 and two["n"].sum() == len(df)
    one = aggregate(df, by=[], metrics=["clip_score"])
    assert len(one) == 1 and one.iloc[0]["n"] == len(df)
    assert one.iloc[0]["mean"] == pytest.approx(df.clip_score.mean())
    with pytest.raises(KeyError, match="nope"):
        aggregate(df, by=["nope"])
    with pytest.raises(KeyError, match="lpips"):
        aggregate(df, metrics=["lpips"])


def test_edge_cases():
    s = summarize([])
    assert s["n"] == 0 and math.isnan(s["mean"])
    s = summarize([2.0, math.nan])
    assert s["n"] == 1 and s["mean"] == 2.0 and math.isnan(s["std"]) and math.isnan(s["ci95"]) and s["n_nan"] == 1
    s = summarize([1.0, math.inf, 3.0])  # inf is kept and visible
    assert s["n"] == 3 and s["n_inf"] == 1 and s["mean"] == math.inf
    s = summarize([4.0, 4.0, 4.0])
    assert s["std"] == 0.0 and s["ci95"] == 0.0


def test_markdown():
    agg = aggregate(_rows(), by=["method"], metrics=["clip_score", "bg_psnr"])
    md = to_markdown(agg, digits=2)
    lines = md.strip().splitlines()
    assert lines[0] == "| method | n | clip_score | bg_psnr |"
    assert len(lines) == 4
    r = agg[(agg.method == "ddim") & (agg.metric == "clip_score")].iloc[0]
    p = agg[(agg.method == "ddim") & (agg.metric == "bg_psnr")].iloc[0]
    assert lines[2] == (f"| ddim | 7 | {r['mean']:.2f} ± {r['ci95']:.2f} | {p['mean']:.2f} ± {p['ci95']:.2f} (n=5) |")
    assert "±" not in to_markdown(agg, ci=False)
