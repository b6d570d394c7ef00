"""The one aggregation every report uses: per-group mean, std, n and 95% confidence interval.

Rules:

* NaN values are excluded per metric: ``n`` counts the non-NaN values of that metric in the
  group, ``n_nan`` the excluded ones. A group with ``n = 0`` has NaN statistics.
* ``std`` is the sample standard deviation (ddof = 1); ``ci95`` the half-width of the
  two-sided Student-t interval, ``t_{0.975, n-1} * std / sqrt(n)``. With ``n = 1`` both are NaN.
* Infinite values are *kept*: they make the mean (and std/CI) infinite or NaN, so an
  uncapped infinity is visible rather than silently dropped; ``n_inf`` counts them. The
  metrics of this package never produce inf (PSNR is capped at 100 dB).
* Booleans count as 0/1. Columns that are not numeric are never aggregated.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

STAT_COLUMNS = ("mean", "std", "n", "ci95", "n_nan", "n_inf")


def summarize(values: Iterable[float], confidence: float = 0.95) -> dict[str, float]:
    """mean, std, n, ci95 (half-width), n_nan, n_inf of one list of values (rules in the module docstring)."""
    from scipy import stats

    a = np.asarray(list(values), dtype=np.float64).ravel()
    nan = np.isnan(a)
    a = a[~nan]
    n = int(a.size)
    out = {"mean": math.nan, "std": math.nan, "n": n, "ci95": math.nan, "n_nan": int(nan.sum()),
           "n_inf": int(np.isinf(a).sum())}
    if n == 0:
        return out
    with np.errstate(invalid="ignore", over="ignore"):
        out["mean"] = float(a.mean())
        if n > 1:
            sd = float(a.std(ddof=1))
            out["std"] = sd
            out["ci95"] = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n))
    return out


def aggregate(rows: pd.DataFrame | Sequence[dict], by: Sequence[str] = ("method",), metrics: Sequence[str] | None = None,
              confidence: float = 0.95) -> pd.DataFrame:
    """Long-format table: one row per (group, metric) with columns ``*by, metric, mean, std, n, ci95,
    n_nan, n_inf``. ``metrics`` defaults to every numeric column not in ``by``. ``by`` may be empty
    (one group: everything)."""
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    by = list(by)
    missing = [c for c in by if c not in df.columns]
    if missing:
        raise KeyError(f"aggregate: group columns {missing} not in the results (columns: {list(df.columns)})")
    if metrics is None:
        metrics = [c for c in df.columns if c not in by and
                   (pd.api.types.is_numeric_dtype(df[c]) or pd.api.types.is_bool_dtype(df[c]))]
    else:
        metrics = list(metrics)
        missing = [c for c in metrics if c not in df.columns]
        if missing:
            raise KeyError(f"aggregate: metric columns {missing} not in the results (columns: {list(df.columns)})")
    out = []
    groups = df.groupby(by, sort=True, dropna=False) if by else [((), df)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        for m in metrics:
            vals = pd.to_numeric(g[m].astype("float64") if g[m].dtype == bool else g[m], errors="coerce")
            out.append({**dict(zip(by, key)), "metric": m, **summarize(vals.to_numpy(dtype=np.float64), confidence)})
    return pd.DataFrame(out, columns=[*by, "metric", *STAT_COLUMNS])


def _fmt(x: float, digits: int) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    return f"{x:.{digits}f}"


def to_markdown(agg: pd.DataFrame, by: Sequence[str] | None = None, metrics: Sequence[str] | None = None,
                digits: int = 3, ci: bool = True) -> str:
    """Markdown table of an :func:`aggregate` result: one row per group, one column per metric,
    cells ``mean ± ci95``; a column ``n`` gives the group's largest n, and a cell whose metric has a
    smaller n (NaNs dropped) says so as ``(n=k)``."""
    if by is None:
        by = [c for c in agg.columns if c not in ("metric", *STAT_COLUMNS)]
    by = list(by)
    metrics = list(dict.fromkeys(agg["metric"])) if metrics is None else list(metrics)
    header = [*by, "n", *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(by) + ["---:"] * (1 + len(metrics))) + "|"]
    groups = agg.groupby(by, sort=False, dropna=False) if by else [((), agg)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        stats_by_metric = {r["metric"]: r for _, r in g.iterrows()}
        n_max = int(max((stats_by_metric[m]["n"] for m in metrics if m in stats_by_metric), default=0))
        cells = []
        for m in metrics:
            r = stats_by_metric.get(m)
            if r is None:
                cells.append("")
                continue
            c = _fmt(r["mean"], digits)
            if ci and not math.isnan(r["ci95"]):
                c += f" ± {_fmt(r['ci95'], digits)}"
            if int(r["n"]) != n_max:
                c += f" (n={int(r['n'])})"
            cells.append(c)
        lines.append("| " + " | ".join([*(str(k) for k in key), str(n_max), *cells]) + " |")
    return "\n".join(lines) + "\n"
