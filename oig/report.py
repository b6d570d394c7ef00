"""``oig-report``: tables and figures from one or more run folders.

``oig-report DIR... [--out OUT]`` finds every run folder under the given folders (any folder
holding ``rows/`` or ``results.parquet``, searched recursively: single runs, multiruns,
shards), merges their rows and writes to ``OUT``:

* ``report.md``: the results table overall and per task (mean ± 95% CI per method and, when
  runs of one method differ, per setting), a runs/errors table and the rules used;
* ``report.csv``: the same statistics in long format (one line per scope, group and metric);
* ``report_rows.csv``: the merged per-sample rows the statistics were computed from;
* ``report_grid.png`` / ``.pdf``: qualitative grid, rows = samples, columns = source (and the
  exact target when known) then each method's edit, the same samples in every column;
* ``report_tradeoff_<method>_<hp>.png`` / ``.pdf``: when the runs of one method sweep a
  hyperparameter (e.g. ``hp_lambda2``), a CLIP metric against structure distance, one point
  per value (the paper's Figure 5); ablation variants get the same plot, unconnected.
* ``report_pie_bench.csv`` and a "PIE-Bench" section of ``report.md``, when there are PIE-Bench
  rows (``dataset == "pie_bench"``, or a run whose ``config.yaml`` has ``pie_bench`` in ``tags``):
  PIE-Bench's Table 1 columns in its units (structure x10^3, LPIPS x10^3, MSE x10^4, SSIM x10^2;
  PSNR and CLIP as they are), per method over all samples and per editing type (the ten types,
  from the task name or an ``editing_type_id`` column), next to the published Table 1 row the
  method reproduces (:data:`PIE_BENCH_TABLE1`, :func:`pie_bench_published_row`).

Default ``OUT``: the folder given when there is one, else ``reports/<timestamp>``.

Statistics come from :func:`eval.aggregate.aggregate`, the one aggregation of this package.
Rows from several folders (e.g. dataset shards) are concatenated; a row whose
(method, model, dataset, seed, hyperparameters, id) was already seen is a duplicate and
dropped with a warning (an ``ok`` row wins over an ``error`` row, then the first folder given).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger("oig.report")

#: quality metrics in table order, with the direction that is better
METRIC_DIRECTION = {
    "clip_acc": "higher", "clip_margin": "higher", "clip_score": "higher", "clip_edit_region": "higher", "clip_dir": "higher",
    "clip_img_sim": "higher", "structure_dist": "lower", "bg_lpips": "lower", "bg_psnr": "higher",
    "bg_ssim": "higher", "bg_mse": "lower", "toy_edit_success": "higher", "toy_attrs_kept": "higher",
    "toy_structure_kept": "higher", "toy_iou": "higher", "toy_center_err": "lower", "toy_bg_psnr": "higher",
    "toy_bg_mse": "lower", "toy_target_psnr": "higher", "toy_target_mse": "lower",
}
#: secondary metrics: in report.csv, not in the markdown table
SECONDARY = ("clip_dir", "clip_img_sim", "toy_iou", "toy_center_err", "toy_bg_mse", "toy_target_mse")
#: cost columns shown in the markdown table after the quality metrics
COST_COLUMNS = ("time_total", "peak_mem_mb")
COST_DIRECTION = {"time_total": "lower", "peak_mem_mb": "lower"}
#: numeric row columns that are identifiers, not measurements
NOT_MEASURED = ("seed",)
#: trade-off plot axes: the first column present (with values) is used
TRADEOFF_Y = ("clip_score", "clip_acc", "toy_edit_success")  # a continuous CLIP metric first (clip_acc saturates)
TRADEOFF_X = ("structure_dist", "toy_center_err", "toy_bg_mse", "bg_lpips")
#: display order of methods (others follow alphabetically)
METHOD_ORDER = ("ddim_recon", "ddim_word_swap", "sdedit", "diffedit", "pix2pix_zero", "pnp", "masactrl",
                "ddim_p2p", "null_text_p2p", "null_text", "instruct_pix2pix", "oig", "oig_plus")
GREEK = {"lambda1": "λ1", "lambda2": "λ2", "lambda3_ratio": "λ3/λ4", "lambda4": "λ4", "beta_p": "β_p",
         "beta_f": "β_f"}
DEDUP_KEYS = ("method", "model", "dataset", "seed", "id")

NAN_RULE = (
    "Rows with `status = error` are left out of every statistic and counted in the runs table. "
    "NaN values (a metric not defined for a sample, e.g. no mask) are excluded per metric: `n` is the "
    "number of values a cell averages, and a cell with fewer values than its row's `n` says `(n=k)`. "
    "Cells are mean ± half-width of the two-sided 95% Student-t interval (t·s/√n, s with ddof=1); "
    "no interval with n = 1. Infinite values are kept and make the mean infinite (the package's "
    "metrics cap PSNR at 100 dB). Booleans count as 0/1 (e.g. `clip_acc`, `toy_edit_success` are "
    "fractions). ↑ higher is better, ↓ lower is better."
)


# ------------------------------------------------------------------ loading
def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Every run folder (one holding ``rows/`` or ``results.parquet``) at or under ``paths``, in
    the order given, each folder once. A run folder's own subfolders are not searched."""
    found: list[Path] = []
    seen: set[Path] = set()
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise FileNotFoundError(f"oig-report: {p}: no such folder")
        if not p.is_dir():
            raise NotADirectoryError(f"oig-report: {p}: not a folder (give run folders or folders above them)")
        for root, dirs, files in os.walk(p):
            r = Path(root)
            dirs.sort()
            if (r / "rows").is_dir() or "results.parquet" in files:
                if r.resolve() not in seen:
                    seen.add(r.resolve())
                    found.append(r)
                dirs[:] = []  # images/, rows/, wandb/ hold no runs
    return found


def load_run(run_dir: str | Path) -> pd.DataFrame:
    """The rows of one run folder: ``rows/*.json`` (the source of truth; what a killed run has
    written so far) or, without them, ``results.parquet``. Adds ``_run`` (the folder) and
    ``variant`` when the run's ``config.yaml`` names one (ablation presets do)."""
    from oig.run import load_rows

    run_dir = Path(run_dir)
    rows = load_rows(run_dir) if (run_dir / "rows").is_dir() else []
    if rows:
        df = pd.DataFrame(rows)
    elif (run_dir / "results.parquet").exists():
        try:
            df = pd.read_parquet(run_dir / "results.parquet")
        except Exception as e:
            raise ValueError(f"oig-report: {run_dir / 'results.parquet'}: unreadable ({e})") from e
    else:
        df = pd.DataFrame()
    if not len(df):
        log.warning("%s: no rows", run_dir)
        return df
    missing = [c for c in ("id", "method", "status") if c not in df.columns]
    if missing:
        raise ValueError(f"oig-report: {run_dir}: rows lack the columns {missing}; not an oig-run folder?")
    df["_run"] = str(run_dir)
    variant = _config_value(run_dir, "variant")
    if variant is not None:
        df["variant"] = str(variant)
    tags = _config_value(run_dir, "tags")  # experiment=pie_bench tags its runs with pie_bench
    if tags is not None and not isinstance(tags, str) and "pie_bench" in [str(t) for t in tags]:
        df["_preset"] = "pie_bench"
    return df


def _config_value(run_dir: Path, key: str):
    cfg = run_dir / "config.yaml"
    if not cfg.exists():
        return None
    try:
        from omegaconf import OmegaConf

        return OmegaConf.select(OmegaConf.load(cfg), key, default=None)
    except Exception as e:
        log.warning("%s: unreadable config (%s)", cfg, e)
        return None


def load_results(paths: Iterable[str | Path]) -> pd.DataFrame:
    """Merged rows of every run folder under ``paths``, duplicates dropped (see the module
    docstring), with a ``setting`` column (see :func:`add_settings`)."""
    paths = list(paths)
    runs = find_runs(paths)
    if not runs:
        raise FileNotFoundError(f"oig-report: no run folders (with rows/ or results.parquet) under "
                                f"{', '.join(map(str, paths))}")
    frames = [f for f in (load_run(r) for r in runs) if len(f)]
    if not frames:
        raise ValueError(f"oig-report: the {len(runs)} run folder(s) under {', '.join(map(str, paths))} have no rows")
    df = pd.concat(frames, ignore_index=True, sort=False)
    df = drop_duplicates(df)
    for c in ("task", "model", "dataset"):
        if c not in df.columns:
            df[c] = ""
        df[c] = df[c].fillna("").astype(str)
    if "seed" not in df.columns:
        df["seed"] = 0
    log.info("%d rows from %d run folder(s)", len(df), len(runs))
    return add_settings(df)


def hp_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith("hp_")]


def drop_duplicates(df: pd.DataFrame) -> pd.DataFrame:
    """Drop rows whose (method, model, dataset, seed, hp_*, id) was already seen; ``ok`` rows win
    over ``error`` rows, then earlier folders over later ones. Logs a warning naming the folders."""
    keys = [c for c in DEDUP_KEYS if c in df.columns] + hp_columns(df)
    key_frame = df[keys].astype(str)  # hp values may mix types across runs; NaN -> 'nan' (equal)
    order = np.lexsort((np.arange(len(df)), (df["status"] != "ok").to_numpy()))
    dup = key_frame.iloc[order].duplicated(keep="first")
    drop = df.index[order][dup.to_numpy()]
    if len(drop):
        where = sorted(set(df.loc[drop, "_run"])) if "_run" in df.columns else []
        log.warning("dropping %d duplicate row(s) (same method, hyperparameters and sample id seen in another "
                    "run folder) from: %s", len(drop), ", ".join(where))
    return df.drop(index=drop).reset_index(drop=True)


def _fmt_value(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:g}"
    return str(v)


def _hp_name(col: str) -> str:
    return col[3:] if col.startswith("hp_") else col


def add_settings(df: pd.DataFrame) -> pd.DataFrame:
    """Label each row's configuration within its method in a ``setting`` column: the ablation
    ``variant`` when every row of the method has one, else ``name=value`` of the hyperparameters
    (and model) that differ between the method's rows; "" when they do not differ."""
    df = df.copy()
    df["setting"] = ""
    hps = hp_columns(df) + ["model"]
    for m, g in df.groupby("method", sort=False):
        if "variant" in g.columns and g["variant"].notna().all():
            df.loc[g.index, "setting"] = g["variant"].astype(str)
            continue
        varying = [c for c in hps if g[c].astype(str).nunique() > 1]
        if varying:
            df.loc[g.index, "setting"] = [", ".join(f"{_hp_name(c)}={_fmt_value(r[c])}" for c in varying)
                                          for _, r in g.iterrows()]
    return df


def swept_hyperparameters(df: pd.DataFrame) -> dict[str, list[str]]:
    """Per method, the hp_ columns whose value differs between its rows."""
    out = {}
    for m, g in df.groupby("method", sort=False):
        varying = [c for c in hp_columns(df) if g[c].astype(str).nunique() > 1]
        if varying:
            out[m] = varying
    return out


# ------------------------------------------------------------------ ordering
def _method_rank(m: str) -> tuple:
    return (METHOD_ORDER.index(m), "") if m in METHOD_ORDER else (len(METHOD_ORDER), m)


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.inf


def settings_order(df: pd.DataFrame) -> list[tuple[str, str]]:
    """(method, setting) pairs in display order: methods by :data:`METHOD_ORDER`, settings by the
    numeric value of the swept hyperparameters (then their text)."""
    sweeps = swept_hyperparameters(df)
    pairs = []
    for (m, s), g in df.groupby(["method", "setting"], sort=False):
        r = g.iloc[0]
        key = tuple((_num(r[c]), str(r[c])) for c in sweeps.get(m, []))
        pairs.append((_method_rank(m), key, s, m))
    pairs.sort(key=lambda t: (t[0], t[1], t[2]))
    return [(m, s) for _, _, s, m in pairs]


def metric_columns(df: pd.DataFrame) -> list[str]:
    """Every numeric (or boolean) measurement column: quality metrics first in
    :data:`METRIC_DIRECTION` order, then costs, then the rest (editor info, time per phase)."""
    num = [c for c in df.columns if not c.startswith(("hp_", "_")) and c not in NOT_MEASURED
           and (pd.api.types.is_numeric_dtype(df[c]) or pd.api.types.is_bool_dtype(df[c]))]
    known = [c for c in METRIC_DIRECTION if c in num]
    cost = [c for c in COST_COLUMNS if c in num]
    return known + cost + sorted(c for c in num if c not in known and c not in cost)


def table_metrics(df: pd.DataFrame) -> list[str]:
    """Columns of the markdown table: the known quality metrics with at least one value, then costs."""
    cols = metric_columns(df)
    ok = df[df["status"] == "ok"]
    known = [c for c in cols if c in METRIC_DIRECTION and c not in SECONDARY and ok[c].notna().any()]
    return known + [c for c in COST_COLUMNS if c in cols]


def _arrow(m: str) -> str:
    d = METRIC_DIRECTION.get(m) or COST_DIRECTION.get(m)
    return {"higher": " ↑", "lower": " ↓"}.get(d, "")


# ------------------------------------------------------------------ statistics
def statistics(df: pd.DataFrame, metrics: Sequence[str] | None = None, per_task: bool = True) -> pd.DataFrame:
    """Long-format statistics of the ``ok`` rows via :func:`eval.aggregate.aggregate`: one line per
    (task scope, [dataset,] method, setting, metric), ``task = "all"`` for the overall scope, plus
    ``rows`` / ``errors`` (rows of the group, error rows among them) and ``better``."""
    from eval.aggregate import aggregate

    metrics = list(metric_columns(df) if metrics is None else metrics)
    multi_ds = df["dataset"].nunique() > 1
    by = (["dataset"] if multi_ds else []) + ["method", "setting"]
    ok = df[df["status"] == "ok"]
    scopes = [("all", ok, df)]
    if per_task:
        scopes += [(t, ok[ok["task"] == t], df[df["task"] == t]) for t in sorted(df["task"].unique()) if t]
    out = []
    for scope, ok_rows, all_rows in scopes:
        if len(ok_rows):
            agg = aggregate(ok_rows, by=by, metrics=metrics)
        else:
            agg = pd.DataFrame(columns=[*by, "metric", "mean", "std", "n", "ci95", "n_nan", "n_inf"])
        counts = all_rows.groupby(by, dropna=False).agg(rows=("id", "size"),
                                                        errors=("status", lambda s: int((s != "ok").sum())))
        counts = counts.reset_index()
        agg = counts.merge(agg, on=by, how="left")
        agg.insert(0, "task", scope)
        out.append(agg)
    res = pd.concat(out, ignore_index=True)
    res["better"] = res["metric"].map(lambda m: METRIC_DIRECTION.get(m) or COST_DIRECTION.get(m) or "")
    return _sort_groups(res, df)


def _sort_groups(stats: pd.DataFrame, df: pd.DataFrame) -> pd.DataFrame:
    rank = {p: i for i, p in enumerate(settings_order(df))}
    scopes = {"all": -1, **{t: i for i, t in enumerate(sorted(df["task"].unique()))}}
    key = [(scopes.get(t, 0), rank.get((m, s), 10**6)) for t, m, s in
           zip(stats["task"], stats["method"], stats["setting"])]
    order = sorted(range(len(stats)), key=lambda i: key[i])
    return stats.iloc[order].reset_index(drop=True)


def markdown_table(stats: pd.DataFrame, scope: str, metrics: Sequence[str], digits: int = 3) -> str:
    """One scope of :func:`statistics` as a markdown table (via :func:`eval.aggregate.to_markdown`)."""
    from eval.aggregate import to_markdown

    s = stats[(stats["task"] == scope) & stats["metric"].isin(metrics)].copy()
    if not len(s):
        return "_no successful rows_\n"
    by = [c for c in ("dataset", "method", "setting") if c in s.columns]
    if (s["setting"] == "").all():
        by.remove("setting")
    s["metric"] = s["metric"].map(lambda m: m + _arrow(m))
    return to_markdown(s.drop(columns=["task", "rows", "errors", "better"]), by=by,
                       metrics=[m + _arrow(m) for m in metrics if m in set(stats["metric"])], digits=digits)


def runs_table(df: pd.DataFrame) -> str:
    """Markdown: per method and setting, run folders, rows, ok, errors and the most common error."""
    lines = ["| method | setting | runs | rows | ok | errors | most common error |", "|---|---|---:|---:|---:|---:|---|"]
    for m, s in settings_order(df):
        g = df[(df["method"] == m) & (df["setting"] == s)]
        err = g[g["status"] != "ok"]
        common = ""
        if len(err) and "error" in err.columns:
            vc = err["error"].fillna("").astype(str).value_counts()
            common = f"{vc.index[0]} (×{vc.iloc[0]})".replace("|", "\\|") if len(vc) else ""
        nruns = g["_run"].nunique() if "_run" in g.columns else 1
        lines.append(f"| {m} | {s} | {nruns} | {len(g)} | {len(g) - len(err)} | {len(err)} | {common} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ figures
def new_figure(size: tuple[float, float]):
    """A matplotlib Figure drawn by the Agg canvas, without pyplot: no global backend state, no
    display needed, garbage-collected like any object (and shown inline by Jupyter's display())."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def _image(run: str, sid: str, kind: str):
    from PIL import Image

    p = Path(run) / "images" / sid / f"{kind}.png"
    if not p.exists():
        return None
    with Image.open(p) as im:
        return im.convert("RGB")


def _column_label(m: str, s: str) -> str:
    if not s:
        return m
    for k, g in GREEK.items():
        s = s.replace(f"{k}=", f"{g}=")
    return f"{m}\n{s}"


def grid_samples(df: pd.DataFrame, n: int = 6) -> list[str]:
    """Up to ``n`` sample ids, taken round-robin over tasks, that every (method, setting) edited
    successfully (image saved); if no id is common to all, the ids covered by the most columns."""
    ok = df[df["status"] == "ok"]
    cols = settings_order(df)
    have: dict[str, int] = {}
    task_of: dict[str, str] = {}
    for m, s in cols:
        g = ok[(ok["method"] == m) & (ok["setting"] == s)]
        for sid, run, task in zip(g["id"], g["_run"], g["task"]):
            if (Path(run) / "images" / sid / "edit.png").exists():
                have[sid] = have.get(sid, 0) + 1
                task_of[sid] = task
    if not have:
        return []
    best = max(have.values())
    ids = sorted(i for i, k in have.items() if k == best)
    by_task: dict[str, list[str]] = {}
    for i in ids:
        by_task.setdefault(task_of[i], []).append(i)
    out = []
    queues = [by_task[t] for t in sorted(by_task)]
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


def grid_figure(df: pd.DataFrame, n: int = 6, cell: float = 1.6):
    """Qualitative grid (matplotlib Figure): rows = samples, columns = source | target (when the
    exact target is known) | each (method, setting)'s edit. ``None`` when no images were saved."""
    ids = grid_samples(df, n)
    if not ids:
        return None
    ok = df[df["status"] == "ok"]
    cols = settings_order(df)
    lookup = {(m, s, i): run for m, s, i, run in zip(ok["method"], ok["setting"], ok["id"], ok["_run"])}
    first_run: dict[str, str] = {}
    for i, run in zip(ok["id"], ok["_run"]):
        first_run.setdefault(i, run)
    has_target = any(_image(first_run[i], i, "target") is not None for i in ids)
    heads = ["source"] + (["target"] if has_target else []) + [_column_label(m, s) for m, s in cols]
    fig = new_figure((cell * len(heads), cell * len(ids) + 0.6))
    axes = fig.subplots(len(ids), len(heads), squeeze=False)
    prompts = {}
    if {"source_prompt", "target_prompt"} <= set(ok.columns):
        prompts = {i: f"{a} → {b}" for i, a, b in zip(ok["id"], ok["source_prompt"], ok["target_prompt"])}
    for r, sid in enumerate(ids):
        imgs = [_image(first_run[sid], sid, "source")]
        if has_target:
            imgs.append(_image(first_run[sid], sid, "target"))
        imgs += [_image(lookup[(m, s, sid)], sid, "edit") if (m, s, sid) in lookup else None for m, s in cols]
        for c, im in enumerate(imgs):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for sp in ax.spines.values():
                sp.set_visible(False)
            if im is not None:
                ax.imshow(np.asarray(im))
            else:  # a blank square keeps the row aligned
                ax.imshow(np.full((8, 8, 3), 255, dtype=np.uint8))
                ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes, fontsize=8)
            if r == 0:
                ax.set_title(heads[c], fontsize=7)
        label = sid if sid not in prompts else f"{sid}\n{prompts[sid]}"
        axes[r][0].set_ylabel(label, fontsize=6, rotation=0, ha="right", va="center")
    fig.tight_layout()
    return fig


def pick_axis(df: pd.DataFrame, candidates: Sequence[str]) -> str | None:
    ok = df[df["status"] == "ok"]
    for c in candidates:
        if c in ok.columns and pd.to_numeric(ok[c], errors="coerce").notna().any():
            return c
    return None


def tradeoff_figures(df: pd.DataFrame, stats: pd.DataFrame | None = None, x: str | None = None,
                     y: str | None = None) -> list[tuple[str, object]]:
    """Per method with two or more settings: mean ``y`` (a CLIP metric) against mean ``x``
    (structure distance), 95% CI bars, each point annotated with its setting. A sweep over one
    numeric hyperparameter is drawn as a line in the order of its values. Returns ``(file stem,
    Figure)`` pairs; empty when no method varies or the axes' metrics are missing."""
    x = x or pick_axis(df, TRADEOFF_X)
    y = y or pick_axis(df, TRADEOFF_Y)
    for name, col in (("x", x), ("y", y)):
        if col is not None and col not in df.columns:
            raise KeyError(f"oig-report: trade-off {name} axis {col!r} is not a column of the results")
    if x is None or y is None:
        log.info("no trade-off plot: results lack a CLIP metric (%s) or a structure metric (%s)",
                 "/".join(TRADEOFF_Y), "/".join(TRADEOFF_X))
        return []
    if stats is None:
        stats = statistics(df, metrics=[x, y], per_task=False)
    overall = stats[stats["task"] == "all"]
    sweeps = swept_hyperparameters(df)
    out = []
    order = settings_order(df)
    for method in dict.fromkeys(m for m, _ in order):
        settings = [s for m, s in order if m == method]
        if len(settings) < 2:
            continue
        pts = []
        for s in settings:
            g = overall[(overall["method"] == method) & (overall["setting"] == s)]
            sx, sy = g[g["metric"] == x], g[g["metric"] == y]
            if not len(sx) or not len(sy):
                continue
            pts.append((s, float(sx["mean"].iloc[0]), float(sy["mean"].iloc[0]),
                        float(sx["ci95"].iloc[0]), float(sy["ci95"].iloc[0])))
        pts = [p for p in pts if not (math.isnan(p[1]) or math.isnan(p[2]))]
        if len(pts) < 2:
            continue
        hps = sweeps.get(method, [])
        rows = df[df["method"] == method]
        named = "variant" in rows.columns and rows["variant"].notna().all()
        one_numeric = len(hps) == 1 and not named and all(not math.isinf(_num(v)) for v in rows[hps[0]])
        fig = new_figure((4.8, 3.8))
        ax = fig.subplots()
        xs, ys = [p[1] for p in pts], [p[2] for p in pts]
        # 95% CIs across samples are drawn light: they include between-image spread, which is
        # shared by every setting (the same images), so the trend is the line, not the bars
        ax.errorbar(xs, ys, xerr=[0 if math.isnan(p[3]) else p[3] for p in pts],
                    yerr=[0 if math.isnan(p[4]) else p[4] for p in pts], fmt="none", ecolor="0.75",
                    capsize=2, lw=0.8, zorder=1)
        ax.plot(xs, ys, "o-" if one_numeric else "o", lw=1.2, ms=4, zorder=2)
        for j, (s, px, py, _, _) in enumerate(pts):
            label = _column_label("", s).strip()
            if one_numeric and "=" in label:
                label = label.split("=", 1)[1]
            ax.annotate(label, (px, py), textcoords="offset points", xytext=(4, 6 if j % 2 == 0 else -10),
                        fontsize=7, zorder=3)
        ax.set_xlabel(x + _arrow(x))
        ax.set_ylabel(y + _arrow(y))
        what = GREEK.get(_hp_name(hps[0]), _hp_name(hps[0])) if one_numeric else "settings"
        ax.set_title(f"{method}: {y} vs {x} over {what}", fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        stem = f"report_tradeoff_{method}_{_hp_name(hps[0]) if one_numeric else 'variants'}"
        out.append((stem, fig))
    return out


# ------------------------------------------------------------------ PIE-Bench
#: PIE-Bench's Table 1 columns: (our column, its header, PIE-Bench's scale factor, better)
PIE_BENCH_COLUMNS = (
    ("structure_dist", "Structure ×10³", 1e3, "lower"),
    ("bg_psnr", "PSNR", 1.0, "higher"),
    ("bg_lpips", "LPIPS ×10³", 1e3, "lower"),
    ("bg_mse", "MSE ×10⁴", 1e4, "lower"),
    ("bg_ssim", "SSIM ×10²", 1e2, "higher"),
    ("clip_score", "CLIP whole", 1.0, "higher"),
    ("clip_edit_region", "CLIP edited", 1.0, "higher"),
)
#: where :data:`PIE_BENCH_TABLE1` comes from
PIE_BENCH_SOURCE = ("Ju et al., PnP Inversion (ICLR 2024), Table 1, as the image "
                    "scripts/compare_direct_inversion_with_other_inversion_techniques.png of "
                    "github.com/cure-lab/PnPInversion (commit 07f97f4, also in its README); PnP rows with "
                    "SD v1.5, the others SD v1.4; Null-text = mean of an A800 and an RTX 3090 run")
#: PIE-Bench's published Table 1 (:data:`PIE_BENCH_SOURCE`): (inversion, editing) -> values in the
#: units and order of :data:`PIE_BENCH_COLUMNS`
PIE_BENCH_TABLE1 = {
    ("DDIM", "P2P"): (69.43, 17.87, 208.80, 219.88, 71.14, 25.01, 22.44),
    ("Null-text", "P2P"): (13.44, 27.03, 60.67, 35.86, 84.11, 24.75, 21.86),
    ("Negative-prompt", "P2P"): (16.17, 26.21, 69.01, 39.73, 83.40, 24.61, 21.87),
    ("StyleDiffusion", "P2P"): (11.65, 26.05, 66.10, 38.63, 83.42, 24.78, 21.72),
    ("DirectInversion", "P2P"): (11.65, 27.22, 54.55, 32.86, 84.76, 25.02, 22.10),
    ("DDIM", "MasaCtrl"): (28.38, 22.17, 106.62, 86.97, 79.67, 23.96, 21.16),
    ("DirectInversion", "MasaCtrl"): (24.70, 22.64, 87.94, 81.09, 81.33, 24.38, 21.35),
    ("DDIM", "Pix2Pix-Zero"): (61.68, 20.44, 172.22, 144.12, 74.67, 22.80, 20.54),
    ("DirectInversion", "Pix2Pix-Zero"): (49.22, 21.53, 138.98, 127.32, 77.05, 23.31, 21.05),
    ("DDIM", "PnP"): (28.22, 22.28, 113.46, 83.64, 79.05, 25.41, 22.55),
    ("DirectInversion", "PnP"): (24.29, 22.46, 106.06, 80.45, 79.68, 25.41, 22.62),
}


def pie_bench_published_row(method: str, hparams: dict | None = None) -> tuple[str, str] | None:
    """The Table 1 row (:data:`PIE_BENCH_TABLE1` key) a method of this package reproduces, or None:
    ``ddim_p2p`` = DDIM + P2P, ``null_text_p2p`` = Null-text + P2P, ``masactrl`` = DDIM + MasaCtrl,
    ``pix2pix_zero`` = DDIM + Pix2Pix-Zero, ``pnp`` = DDIM + PnP with ``source_branch=reconstruction``
    (PIE-Bench's ``ddim+pnp`` runner) and DirectInversion + PnP otherwise (its source branch reads the
    inversion trajectory, which is what ``directinversion+pnp`` does)."""
    hp = hparams or {}
    fixed = {"ddim_p2p": ("DDIM", "P2P"), "null_text_p2p": ("Null-text", "P2P"), "masactrl": ("DDIM", "MasaCtrl"),
             "pix2pix_zero": ("DDIM", "Pix2Pix-Zero")}
    if method in fixed:
        return fixed[method]
    if method == "pnp":
        return ("DDIM", "PnP") if str(hp.get("source_branch", "")) == "reconstruction" else ("DirectInversion", "PnP")
    return None


def pie_bench_mask(df: pd.DataFrame) -> pd.Series:
    """Rows of PIE-Bench runs: ``dataset == "pie_bench"`` or a run tagged ``pie_bench`` (the preset)."""
    m = df["dataset"].astype(str) == "pie_bench" if "dataset" in df.columns else pd.Series(False, index=df.index)
    if "_preset" in df.columns:
        m = m | (df["_preset"].astype(str) == "pie_bench")
    return m


def _editing_type_ids(df: pd.DataFrame) -> pd.Series:
    """Each row's PIE-Bench editing type id "0".."9" (``editing_type_id`` column, else from the task
    name); "" when unknown."""
    from oig.data.pie_bench import EDITING_TYPES

    by_name = {v: k for k, v in EDITING_TYPES.items()}
    ids = df["task"].astype(str).map(lambda t: by_name.get(t, ""))
    if "editing_type_id" in df.columns:
        given = df["editing_type_id"].map(lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v))
                                          else str(int(v)) if isinstance(v, (int, float)) else str(v))
        ids = given.where(given.isin(list(EDITING_TYPES)), ids)
    return ids


def pie_bench_statistics(df: pd.DataFrame) -> pd.DataFrame | None:
    """PIE-Bench's Table 1 columns for the PIE-Bench ``ok`` rows (None without such rows), long format:
    ``method, setting, editing_type_id, editing_type, metric, label, scale, mean, ci95, n, samples,
    published, published_row``. ``editing_type_id`` is "0".."9" or "all"; ``mean`` and ``ci95`` are
    in PIE-Bench's units (the aggregate of :func:`eval.aggregate.aggregate` times ``scale``);
    ``samples`` counts the ok rows of the group; ``published`` is the Table 1 value of the method's
    row (:func:`pie_bench_published_row`) on the "all" lines, NaN elsewhere."""
    from eval.aggregate import aggregate
    from oig.data.pie_bench import EDITING_TYPES

    pie = df[pie_bench_mask(df) & (df["status"] == "ok")].copy()
    cols = [c for c, *_ in PIE_BENCH_COLUMNS if c in pie.columns and pd.to_numeric(pie[c], errors="coerce").notna().any()]
    if not len(pie) or not cols:
        return None
    pie["_type"] = _editing_type_ids(pie)
    spec = {c: (label, scale) for c, label, scale, _ in PIE_BENCH_COLUMNS}
    out = []
    hps = hp_columns(pie)
    for (method, setting), g in pie.groupby(["method", "setting"], sort=False):
        first = g.iloc[0]
        row = pie_bench_published_row(method, {_hp_name(c): first[c] for c in hps})
        published = PIE_BENCH_TABLE1.get(row) if row else None
        scopes = [("all", g)] + [(t, g[g["_type"] == t]) for t in EDITING_TYPES]
        for tid, sub in scopes:
            agg = aggregate(sub, by=[], metrics=cols) if len(sub) else pd.DataFrame(
                {"metric": cols, "mean": math.nan, "ci95": math.nan, "n": 0})
            for r in agg.itertuples():
                label, scale = spec[r.metric]
                pub = math.nan
                if tid == "all" and published is not None:
                    pub = published[[c for c, *_ in PIE_BENCH_COLUMNS].index(r.metric)]
                out.append({"method": method, "setting": setting, "editing_type_id": tid,
                            "editing_type": "all" if tid == "all" else EDITING_TYPES[tid], "metric": r.metric,
                            "label": label, "scale": scale, "mean": r.mean * scale, "ci95": r.ci95 * scale,
                            "n": int(r.n), "samples": len(sub), "published": pub,
                            "published_row": " + ".join(row) if row else ""})
    res = pd.DataFrame(out)
    rank = {p: i for i, p in enumerate(settings_order(df))}
    res["_order"] = [rank.get((m, s), 10**6) for m, s in zip(res["method"], res["setting"])]
    return res.sort_values("_order", kind="stable").drop(columns="_order").reset_index(drop=True)


def _pie_cell(r, samples: int, ci: bool = True) -> str:
    if r is None or math.isnan(r["mean"]):
        return "nan" if r is not None else ""
    c = f"{r['mean']:.2f}"
    if ci and not math.isnan(r["ci95"]):
        c += f" ± {r['ci95']:.2f}"
    if int(r["n"]) != samples:
        c += f" (n={int(r['n'])})"
    return c


def pie_bench_markdown(pie: pd.DataFrame) -> str:
    """The "PIE-Bench" section of ``report.md`` from :func:`pie_bench_statistics`."""
    from oig.data.pie_bench import EDITING_TYPES

    metrics = list(dict.fromkeys(pie["metric"]))
    spec = {c: (label, better) for c, label, _, better in PIE_BENCH_COLUMNS}
    head = [f"{spec[m][0]}{_arrow_of(spec[m][1])}" for m in metrics]
    parts = ["## PIE-Bench (Table 1 units)", "",
             "PIE-Bench's columns in its units: structure distance ×10³, LPIPS ×10³, MSE ×10⁴, SSIM ×10² "
             "(PSNR, LPIPS, MSE, SSIM of the unedited part), PSNR in dB and CLIP scores as they are; cells are "
             "mean ± 95% CI in those units (rules above). `published` rows: " + PIE_BENCH_SOURCE + ". "
             "Which row a method reproduces: ddim_p2p = DDIM + P2P, null_text_p2p = Null-text + P2P, masactrl = "
             "DDIM + MasaCtrl, pix2pix_zero = DDIM + Pix2Pix-Zero, pnp = DDIM + PnP with "
             "source_branch=reconstruction, else DirectInversion + PnP.", "",
             "### All editing types", "",
             "| method | setting | n | " + " | ".join(head) + " |",
             "|---|---|---:|" + "---:|" * len(head)]
    groups = list(dict.fromkeys(zip(pie["method"], pie["setting"])))
    for m, s in groups:
        g = pie[(pie["method"] == m) & (pie["setting"] == s) & (pie["editing_type_id"] == "all")]
        by = {r["metric"]: r for _, r in g.iterrows()}
        samples = int(g["samples"].iloc[0])
        parts.append(f"| {m} | {s} | {samples} | " + " | ".join(_pie_cell(by.get(x), samples) for x in metrics) + " |")
        row = g["published_row"].iloc[0]
        if row:
            parts.append(f"| published: {row} | | | " + " | ".join(
                f"{by[x]['published']:.2f}" if x in by and not math.isnan(by[x]["published"]) else "" for x in metrics)
                + " |")
    parts.append("")
    for m, s in groups:
        g = pie[(pie["method"] == m) & (pie["setting"] == s)]
        row = g["published_row"].iloc[0]
        ids = [t for t in EDITING_TYPES if (g["editing_type_id"] == t).any()] + ["all"]
        heads = [f"{t} {EDITING_TYPES[t]}" if t != "all" else "all" for t in ids]
        parts += [f"### Per editing type: {m}{f' ({s})' if s else ''}", "",
                  "| metric | " + " | ".join(heads) + f" | published{f' ({row})' if row else ''} |",
                  "|---|" + "---:|" * (len(heads) + 1)]
        samples = {t: int(g.loc[g["editing_type_id"] == t, "samples"].iloc[0]) for t in ids}
        parts.append("| samples | " + " | ".join(str(samples[t]) for t in ids) + " | |")
        for x in metrics:
            cells = []
            for t in ids:
                r = g[(g["editing_type_id"] == t) & (g["metric"] == x)]
                cells.append(_pie_cell(r.iloc[0] if len(r) else None, samples[t], ci=False))
            pub = g[(g["editing_type_id"] == "all") & (g["metric"] == x)]["published"]
            pub_txt = f"{pub.iloc[0]:.2f}" if len(pub) and not math.isnan(pub.iloc[0]) else ""
            parts.append(f"| {spec[x][0]}{_arrow_of(spec[x][1])} | " + " | ".join(cells) + f" | {pub_txt} |")
        parts.append("")
    return "\n".join(parts)


def _arrow_of(better: str) -> str:
    return {"higher": " ↑", "lower": " ↓"}.get(better, "")


# ------------------------------------------------------------------ report
def markdown_report(df: pd.DataFrame, stats: pd.DataFrame, runs: Sequence[Path], metrics: Sequence[str],
                    figures: Sequence[str] = (), digits: int = 3) -> str:
    parts = ["# oig report", "",
             f"{len(df)} rows ({int((df['status'] == 'ok').sum())} ok) from {len(runs)} run folder(s), "
             f"{df['method'].nunique()} method(s), dataset(s): {', '.join(sorted(set(df['dataset'])))}.", ""]
    sweeps = swept_hyperparameters(df)
    if sweeps:
        parts += ["Swept: " + "; ".join(f"{m}: {', '.join(_hp_name(c) for c in cs)}" for m, cs in sweeps.items()), ""]
    parts += ["## Rules", "", NAN_RULE, "", "## Overall", "", markdown_table(stats, "all", metrics, digits)]
    ok_groups = set(zip(*[df.loc[df["status"] == "ok", c] for c in ("method", "setting")]))
    failed = [f"{m} {s}".strip() for m, s in settings_order(df) if (m, s) not in ok_groups]
    if failed:
        parts += [f"No successful rows (not in the tables; see Runs and errors): {', '.join(failed)}.", ""]
    pie = pie_bench_statistics(df)
    if pie is not None:
        parts += [pie_bench_markdown(pie)]
    for t in [t for t in dict.fromkeys(stats["task"]) if t != "all"]:
        parts += [f"## Task: {t}", "", markdown_table(stats, t, metrics, digits)]
    parts += ["## Runs and errors", "", runs_table(df)]
    others = [c for c in metric_columns(df) if c not in metrics]
    if others:
        parts += [f"Other columns (in report.csv): {', '.join(others)}.", ""]
    if figures:
        parts += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    parts += ["## Run folders", ""] + [f"- `{r}`" for r in runs] + [""]
    return "\n".join(parts)


def write_report(paths: Sequence[str | Path], out: str | Path | None = None, samples: int = 6,
                 x: str | None = None, y: str | None = None, metrics: Sequence[str] | None = None,
                 digits: int = 3) -> dict[str, Path]:
    """Write the report files (module docstring) for the run folders under ``paths``; returns
    ``{kind: path}``."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("oig-report: give at least one folder")
    runs = find_runs(paths)
    df = load_results(paths)
    out = Path(out) if out else (paths[0] if len(paths) == 1 else Path("reports") / time.strftime("%Y-%m-%d_%H-%M-%S"))
    out.mkdir(parents=True, exist_ok=True)
    if metrics:
        bad = [m for m in metrics if m not in df.columns]
        if bad:
            raise KeyError(f"oig-report: metrics {bad} are not columns of the results "
                           f"(numeric columns: {metric_columns(df)})")
    shown = list(metrics) if metrics else table_metrics(df)
    stats = statistics(df)
    written: dict[str, Path] = {}
    stats.to_csv(out / "report.csv", index=False)
    written["csv"] = out / "report.csv"
    df.to_csv(out / "report_rows.csv", index=False)
    written["rows"] = out / "report_rows.csv"

    figures = []
    fig = grid_figure(df, samples)
    if fig is not None:
        for ext in ("png", "pdf"):
            fig.savefig(out / f"report_grid.{ext}", dpi=150)
            written[f"grid_{ext}"] = out / f"report_grid.{ext}"
        figures.append("report_grid.png")
    else:
        log.warning("no qualitative grid: no saved edit images in the run folders")
    for stem, fig in tradeoff_figures(df, stats, x=x, y=y):
        for ext in ("png", "pdf"):
            fig.savefig(out / f"{stem}.{ext}", dpi=150)
            written[f"{stem}_{ext}"] = out / f"{stem}.{ext}"
        figures.append(f"{stem}.png")
    pie = pie_bench_statistics(df)
    if pie is not None:
        pie.to_csv(out / "report_pie_bench.csv", index=False)
        written["pie_bench"] = out / "report_pie_bench.csv"
    (out / "report.md").write_text(markdown_report(df, stats, runs, shown, figures, digits))
    written["markdown"] = out / "report.md"
    log.info("report in %s: %s", out, ", ".join(p.name for p in written.values()))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="oig-report", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", help="run folders, multirun folders or any folder above them")
    ap.add_argument("--out", help="output folder (default: the folder given, or reports/<timestamp> for several)")
    ap.add_argument("--samples", type=int, default=6, help="rows of the qualitative grid (default 6)")
    ap.add_argument("--x", help=f"trade-off x axis (default: first of {', '.join(TRADEOFF_X)})")
    ap.add_argument("--y", help=f"trade-off y axis (default: first of {', '.join(TRADEOFF_Y)})")
    ap.add_argument("--metrics", help="comma-separated columns of the markdown table (default: quality metrics + costs)")
    ap.add_argument("--digits", type=int, default=3, help="decimals in the markdown table")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        written = write_report(args.dirs, args.out, samples=args.samples, x=args.x, y=args.y,
                               metrics=args.metrics.split(",") if args.metrics else None, digits=args.digits)
    except (FileNotFoundError, NotADirectoryError, ValueError, KeyError) as e:
        log.error("%s", e.args[0] if e.args else e)
        return 2
    log.info("wrote %s", written["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
