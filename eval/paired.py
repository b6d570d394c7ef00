"""Paired comparisons: is method A better than method B on the *same* samples?

Every method of a run table edits the same images, so a comparison pairs the two methods' values
sample by sample and looks at the differences ``d_i = A_i - B_i``. Rules (the report states them):

* **Pairs**: the sample keys (by default ``dataset`` + ``id``) present in both groups; a pair whose
  value is NaN on either side is left out for that metric (``n`` counts the pairs used). When a
  group holds a key more than once (e.g. two seeds), its values for that key are averaged first.
* **Mean difference** ``mean(d)`` and its **paired bootstrap 95% CI**: ``n_resamples`` (default
  10,000) resamples of the n differences with replacement, percentile interval of their means,
  drawn from ``numpy.random.default_rng(seed)`` (default seed 0): the same rows give the same
  interval.
* **Wilcoxon signed-rank p-value** (two-sided, zero differences dropped as in Wilcoxon's original
  test): exact up to :data:`EXACT_MAX` non-zero differences, ties included (the same value as
  scipy's exact or permutation p-value, without its 2^n cost), :func:`scipy.stats.wilcoxon`'s
  normal approximation beyond. All differences zero (identical values): p = 1.
* **Holm correction** (:func:`holm`) across the comparisons of one family: all methods compared
  with the same reference on the same metric (or all λ values of one sweep on the same metric).
* **Verdict**: ``better`` / ``worse`` when the Holm-adjusted p is below ``alpha`` (0.05) and the
  mean difference points that way (direction-aware: for a "lower is better" metric a negative
  difference is better); otherwise ``no difference`` (not significant: not evidence of equality);
  ``no pairs`` when nothing could be paired.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

N_RESAMPLES = 10_000
#: up to this many non-zero differences the Wilcoxon p-value is exact (:func:`wilcoxon_p`)
EXACT_MAX = 50
ALPHA = 0.05
PAIRED_COLUMNS = ("metric", "better", "n", "ref_mean", "mean", "diff", "ci_low", "ci_high", "p", "p_holm", "verdict")


def paired_bootstrap_ci(diffs, n_resamples: int = N_RESAMPLES, confidence: float = 0.95,
                        seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of paired differences (NaN, NaN for no values)."""
    d = np.asarray(diffs, dtype=np.float64).ravel()
    if d.size == 0:
        return math.nan, math.nan
    if n_resamples < 1:
        raise ValueError(f"paired_bootstrap_ci: n_resamples must be >= 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples, dtype=np.float64)
    chunk = max(1, 4_000_000 // d.size)  # bounded memory for large n
    for start in range(0, n_resamples, chunk):
        k = min(chunk, n_resamples - start)
        means[start:start + k] = d[rng.integers(0, d.size, size=(k, d.size))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def wilcoxon_p(diffs, exact_max: int = EXACT_MAX) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired differences, zeros dropped; 1.0 when every
    difference is zero, NaN without values.

    Up to ``exact_max`` non-zero differences the p-value is exact: the null distribution of the
    signed-rank statistic given the observed ranks (midranks for ties), every sign flip equally
    likely, computed by dynamic programming over the doubled ranks. It equals scipy's exact p-value
    without ties and scipy's (exhaustive) permutation p-value with ties, which scipy itself needs
    2^n evaluations for. Beyond ``exact_max``: :func:`scipy.stats.wilcoxon`'s normal approximation
    (with its tie correction)."""
    from scipy import stats

    d = np.asarray(diffs, dtype=np.float64).ravel()
    if d.size == 0:
        return math.nan
    d = d[d != 0]
    if d.size == 0:
        return 1.0
    if d.size > exact_max:
        return float(stats.wilcoxon(d, zero_method="wilcox", alternative="two-sided", method="asymptotic").pvalue)
    ranks2 = np.rint(2 * stats.rankdata(np.abs(d))).astype(np.int64)  # midranks x 2: integers
    w = int(ranks2[d > 0].sum())
    total = int(ranks2.sum())
    dist = np.zeros(total + 1)
    dist[0] = 1.0
    for r in ranks2:  # each rank joins the positive sum with probability 1/2
        nxt = 0.5 * dist
        nxt[r:] += 0.5 * dist[: total + 1 - r]
        dist = nxt
    return float(min(1.0, 2 * min(dist[: w + 1].sum(), dist[w:].sum())))


def holm(pvalues) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1). NaN entries are not part
    of the family and stay NaN."""
    p = np.asarray(pvalues, dtype=np.float64).ravel()
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(~np.isnan(p))
    m = idx.size
    if m == 0:
        return out
    order = idx[np.argsort(p[idx], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def verdict(diff: float, p_adjusted: float, better: str, alpha: float = ALPHA) -> str:
    """``better`` / ``worse`` / ``no difference`` for a mean difference (method − reference) whose
    Holm-adjusted p-value is ``p_adjusted``; ``better`` is ``"higher"`` or ``"lower"``."""
    if better not in ("higher", "lower"):
        raise ValueError(f"verdict: better must be 'higher' or 'lower', got {better!r}")
    if math.isnan(p_adjusted) or math.isnan(diff):
        return "no pairs"
    if p_adjusted >= alpha or diff == 0:
        return "no difference"
    return "better" if (diff > 0) == (better == "higher") else "worse"


def compare(ref, values, n_resamples: int = N_RESAMPLES, seed: int = 0) -> dict:
    """Statistics of one pairing (two equally long arrays, NaN pairs dropped): ``n, ref_mean, mean,
    diff, ci_low, ci_high, p`` (``p``: Wilcoxon, not adjusted)."""
    a = np.asarray(values, dtype=np.float64).ravel()
    b = np.asarray(ref, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"compare: {a.size} values against {b.size} reference values; pair them first")
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    d = a - b
    lo, hi = paired_bootstrap_ci(d, n_resamples=n_resamples, seed=seed)
    return {"n": int(d.size), "ref_mean": float(b.mean()) if d.size else math.nan,
            "mean": float(a.mean()) if d.size else math.nan, "diff": float(d.mean()) if d.size else math.nan,
            "ci_low": lo, "ci_high": hi, "p": wilcoxon_p(d)}


def _values_by_key(rows: pd.DataFrame, key: Sequence[str], metric: str) -> pd.Series:
    v = pd.to_numeric(rows[metric].astype("float64") if rows[metric].dtype == bool else rows[metric],
                      errors="coerce")
    return v.groupby([rows[k] for k in key], sort=True).mean()


def paired_comparisons(rows: pd.DataFrame, ref: Mapping[str, object], others: Sequence[Mapping[str, object]],
                       metrics: Mapping[str, str], key: Sequence[str] = ("dataset", "id"),
                       n_resamples: int = N_RESAMPLES, seed: int = 0, alpha: float = ALPHA) -> pd.DataFrame:
    """Compare each group in ``others`` with the group ``ref`` on each metric.

    ``rows`` are the successful per-sample rows; a group is a mapping ``{column: value}`` selecting
    its rows (e.g. ``{"method": "sdedit", "setting": ""}``); ``metrics`` maps metric column ->
    ``"higher"`` / ``"lower"`` (which is better). Returns one line per (group, metric) with the
    group's columns then :data:`PAIRED_COLUMNS`; ``p_holm`` is adjusted across ``others`` per metric
    (the module docstring has every rule)."""
    key = [k for k in key if k in rows.columns]
    if "id" not in key:
        raise KeyError("paired_comparisons: the rows need an 'id' column to pair samples")

    def select(group):
        missing = [c for c in group if c not in rows.columns]
        if missing:
            raise KeyError(f"paired_comparisons: group columns {missing} are not columns of the rows")
        m = np.ones(len(rows), dtype=bool)
        for c, v in group.items():
            m &= (rows[c] == v).to_numpy()
        return rows[m]

    ref_rows = select(ref)
    out = []
    for metric, better in metrics.items():
        if metric not in rows.columns:
            raise KeyError(f"paired_comparisons: metric {metric!r} is not a column of the rows")
        ref_v = _values_by_key(ref_rows, key, metric) if len(ref_rows) else pd.Series(dtype=float)
        lines = []
        for g in others:
            v = _values_by_key(select(g), key, metric)
            common = v.index.intersection(ref_v.index)
            stats = compare(ref_v.loc[common].to_numpy(), v.loc[common].to_numpy(), n_resamples, seed)
            lines.append({**g, "metric": metric, "better": better, **stats})
        adjusted = holm([r["p"] for r in lines])
        for r, pa in zip(lines, adjusted):
            r["p_holm"] = float(pa)
            r["verdict"] = verdict(r["diff"], r["p_holm"], better, alpha)
        out += lines
    cols = list(dict.fromkeys([c for g in others for c in g])) + list(PAIRED_COLUMNS)
    return pd.DataFrame(out, columns=cols)
