"""``oig-report``: tables and figures from one or more run folders.

``oig-report DIR... [--out OUT] [--ref METHOD] [--html]`` finds every run folder under the given
folders (any folder holding ``rows/`` or ``results.parquet``, searched recursively: single runs,
multiruns, shards), merges their rows and writes to ``OUT``:

* ``report.md``, opening with, per preset present (:func:`presets`: the toy world, the paper's
  metrics, PIE-Bench), the **headline table** (:data:`HEADLINE`: only the metrics its protocol
  reports, in its units, one row per method and setting, mean ± 95% CI, the best value per column
  in bold) and the **paired comparison** of every method with a reference (``--ref``, default the
  preset's baseline :data:`DEFAULT_REF`) on the samples both have ``ok``: mean difference, paired
  bootstrap 95% CI, Wilcoxon signed-rank test with Holm correction, verdict (:mod:`eval.paired`);
  λ sweeps (:data:`SWEEP_HPS`) get the same against λ = 0. Then per-task headline tables where
  every cell has n ≥ :data:`PER_TASK_MIN_N` (else one line saying so), the PIE-Bench section, the
  figures, and an appendix: the rules, every metric overall (columns that duplicate another,
  :data:`ALIASES`, once), every p-value; a runs/errors table last;
* ``report.csv``: the statistics of every metric in long format (one line per scope, group and metric);
* ``report_paired.csv``: every paired comparison (reference and λ sweeps), unscaled;
* ``report_rows.csv``: the merged per-sample rows the statistics were computed from;
* ``report_grid.png`` / ``.pdf``: qualitative grid, rows = samples (several per task, the same in
  every column), columns = source (and the exact target when known) then each method's edit;
* ``report_tradeoff_<method>_<hp>.png`` / ``.pdf``: when the runs of one method sweep a
  hyperparameter (e.g. ``hp_lambda2``), a CLIP metric against structure distance, one point
  per value (the paper's Figure 5); ablation variants get the same plot, unconnected.
* ``report_pie_bench.csv`` and a "PIE-Bench" section of ``report.md``, when there are PIE-Bench
  rows (``dataset == "pie_bench"``, or a run whose ``config.yaml`` has ``pie_bench`` in ``tags``):
  PIE-Bench's Table 1 columns in its units (structure x10^3, LPIPS x10^3, MSE x10^4, SSIM x10^2;
  PSNR and CLIP as they are), per method over all samples and per editing type (the ten types,
  from the task name or an ``editing_type_id`` column), next to the published Table 1 row the
  method reproduces (:data:`PIE_BENCH_TABLE1`, :func:`pie_bench_published_row`).
* ``gallery.html`` with ``--html``: one self-contained page to browse every sample (:mod:`oig.gallery`).

Default ``OUT``: the folder given when there is one, else ``reports/<timestamp>``.

Statistics come from :func:`eval.aggregate.aggregate`, the one aggregation of this package, and
the paired comparisons from :mod:`eval.paired`.
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
NOT_MEASURED = ("seed", "sweep_batch")  # run facts, not measurements
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


#: default rows of the qualitative grid: this many samples per task, within [GRID_MIN, GRID_MAX]
GRID_PER_TASK, GRID_MIN, GRID_MAX = 2, 4, 12


def grid_samples(df: pd.DataFrame, n: int | None = None) -> list[str]:
    """Up to ``n`` sample ids, taken round-robin over tasks (so several samples of every task, each
    task's in id order), that every (method, setting) edited successfully (image saved); if no id is
    common to all, the ids covered by the most columns. ``n=None``: :data:`GRID_PER_TASK` per task,
    at least :data:`GRID_MIN`, at most :data:`GRID_MAX`."""
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
    if n is None:
        n = min(GRID_MAX, max(GRID_MIN, GRID_PER_TASK * len(by_task)))
    out = []
    queues = [by_task[t] for t in sorted(by_task)]
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width, break_long_words=True, break_on_hyphens=False) or [""]


def grid_figure(df: pd.DataFrame, n: int | None = None, cell: float = 1.6, label_width: float = 2.0):
    """Qualitative grid (matplotlib Figure): rows = samples (:func:`grid_samples`), columns = source |
    target (when the exact target is known) | each (method, setting)'s edit. Each row's sample id and
    prompts are wrapped into a left margin ``label_width`` inches wide, inside the figure (never
    clipped). ``None`` when no images were saved."""
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
    title_h = 0.14 * max(h.count("\n") + 1 for h in heads) + 0.12  # inches above the first row
    gap = 0.06
    width = label_width + len(heads) * cell + 0.1
    height = title_h + len(ids) * cell + 0.1
    fig = new_figure((width, height))
    axes = fig.subplots(len(ids), len(heads), squeeze=False)
    fig.subplots_adjust(left=label_width / width, right=1 - 0.1 / width, top=1 - title_h / height,
                        bottom=0.1 / height, wspace=gap / (cell - gap), hspace=gap / (cell - gap))
    prompts = {}
    if {"source_prompt", "target_prompt"} <= set(ok.columns):
        prompts = {i: (str(a), str(b)) for i, a, b in zip(ok["id"], ok["source_prompt"], ok["target_prompt"])}
    chars = max(12, int(label_width * 72 / (6 * 0.55)))  # characters per line at 6 pt
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
        lines = _wrap(sid, chars)
        if sid in prompts:
            src, tgt = prompts[sid]
            lines += _wrap(src, chars) + _wrap("→ " + tgt, chars)
        box = axes[r][0].get_position()
        fig.text(0.08 / width, (box.y0 + box.y1) / 2, "\n".join(lines), fontsize=6, ha="left", va="center",
                 linespacing=1.25)
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


# ------------------------------------------------------------------ headline and paired comparisons
#: the metrics each preset's protocol reports, in its units: (column, or "a|b" = the first of them
#: present, header, scale, better). toy: the toy world's oracle metrics (``metrics=toy``); paper:
#: pix2pix-zero's Table 1 metrics (``metrics=paper``, CLIP-Acc in %); pie_bench: PIE-Bench's Table 1.
HEADLINE = {
    "toy": (("toy_edit_success", "edit success", 1.0, "higher"),
            ("toy_attrs_kept", "attributes kept", 1.0, "higher"),
            ("toy_structure_kept", "structure kept", 1.0, "higher"),
            ("toy_bg_psnr|bg_psnr", "background PSNR (dB)", 1.0, "higher"),
            ("clip_acc", "CLIP accuracy", 1.0, "higher"),
            ("time_total", "time (s)", 1.0, "lower")),
    "paper": (("clip_acc", "CLIP-Acc (%)", 100.0, "higher"),
              ("clip_score", "CLIP score", 1.0, "higher"),
              ("structure_dist", "structure distance", 1.0, "lower"),
              ("bg_lpips", "BG-LPIPS", 1.0, "lower")),
    "pie_bench": PIE_BENCH_COLUMNS,
}
PRESET_NAMES = {"toy": "toy world", "paper": "paper metrics (pix2pix-zero / OIG Table 1)", "pie_bench": "PIE-Bench"}
#: each preset's baseline, the default reference of the paired comparison (``--ref`` overrides it)
DEFAULT_REF = {"toy": "ddim_word_swap", "paper": "ddim_word_swap", "pie_bench": "ddim_p2p"}
_REF_NOTE = {"toy": "DDIM + word swap, the toy world's baseline", "paper": "DDIM + word swap, Table 1's baseline",
             "pie_bench": "DDIM + P2P, PIE-Bench's baseline"}
#: decimals of the headline tables (None: the report's ``digits``); PIE-Bench prints two
PRESET_DIGITS = {"pie_bench": 2}
#: per-task tables need at least this many values in every cell
PER_TASK_MIN_N = 10
#: hyperparameters whose sweeps get a paired comparison against the value 0
SWEEP_HPS = ("hp_lambda2", "hp_lambda1")
#: columns that measure the same thing twice (the toy oracle's and the background metric's PSNR/MSE
#: outside the true edit mask): the second is left out of the appendix when the values agree
ALIASES = (("toy_bg_psnr", "bg_psnr"), ("toy_bg_mse", "bg_mse"))

PAIRED_RULE = (
    "Paired comparisons use the samples both sides have `ok` (and a value for the metric): the mean of "
    "the per-sample differences (method − reference), a paired bootstrap 95% CI ({n:,} resamples of the "
    "differences, percentile interval, seed {seed}), the two-sided Wilcoxon signed-rank p-value (zero "
    "differences dropped; exact up to 50 non-zero differences, ties included, normal approximation beyond; "
    "p = 1 when every difference is 0), Holm-corrected across the methods compared with "
    "the same reference on the same metric (a λ sweep: across its λ values). Verdict: better / worse when the "
    "Holm-adjusted p < 0.05 and the mean difference points that way (↑ higher / ↓ lower is better), otherwise "
    "no difference (not significant; not a proof of equality). The verdict follows the test: near the threshold, "
    "or when Holm raises p, the CI may exclude 0 while the verdict says no difference. Module `eval.paired`."
)


def presets(df: pd.DataFrame) -> pd.Series:
    """Each row's preset, which decides the headline metrics: ``pie_bench`` (:func:`pie_bench_mask`),
    ``toy`` (dataset ``toyworld`` scored with the toy oracle) or ``paper`` (everything else)."""
    p = pd.Series("paper", index=df.index, dtype=object)
    if "toy_edit_success" in df.columns:
        toy_ds = set(df.loc[pd.to_numeric(df["toy_edit_success"], errors="coerce").notna(), "dataset"].astype(str))
        p[df["dataset"].astype(str).isin(toy_ds & {"toyworld"})] = "toy"
    p[pie_bench_mask(df)] = "pie_bench"
    return p


def headline_columns(df: pd.DataFrame, preset: str) -> list[tuple[str, str, float, str]]:
    """The preset's :data:`HEADLINE` columns that the ``ok`` rows of ``df`` have values for, as
    ``(column, header, scale, better)``; ``a|b`` resolved to the first of them with values."""
    ok = df[df["status"] == "ok"]
    out = []
    for spec, label, scale, better in HEADLINE[preset]:
        for col in spec.split("|"):
            if col in ok.columns and pd.to_numeric(ok[col], errors="coerce").notna().any():
                out.append((col, label, scale, better))
                break
    return out


def _ref_group(ok: pd.DataFrame, order: list[tuple[str, str]], ref: str) -> tuple[str, str] | None:
    for m, s in order:
        if m == ref and ((ok["method"] == m) & (ok["setting"] == s)).any():
            return m, s
    return None


def _signed(x: float, digits: int) -> str:
    return "nan" if x is None or math.isnan(x) else f"{x:+.{digits}f}"


def _group_label(m: str, s: str) -> str:
    return f"{m} ({s})" if s else m


def _stats_table(stats: pd.DataFrame, scope: str, cols, digits: int, groups: list[tuple]) -> list[str]:
    """Markdown lines of one scope of :func:`statistics` on headline columns: mean ± 95% CI in the
    columns' units, best value per column (within a dataset) in bold."""
    s = stats[stats["task"] == scope]
    multi_ds = "dataset" in s.columns
    by_group = {}
    for _, r in s.iterrows():
        k = ((r["dataset"],) if multi_ds else ()) + (r["method"], r["setting"])
        by_group.setdefault(k, {})[r["metric"]] = r
    keys = [k for k in groups if k in by_group]
    show_setting = any(k[-1] for k in keys)
    best = {}
    for col, _, scale, better in cols:
        for ds in dict.fromkeys(k[0] if multi_ds else None for k in keys):
            vals = [round(by_group[k][col]["mean"] * scale, digits) for k in keys
                    if col in by_group[k] and (not multi_ds or k[0] == ds) and not math.isnan(by_group[k][col]["mean"])]
            if len(vals) > 1:
                best[(ds, col)] = max(vals) if better == "higher" else min(vals)
    head = (["dataset"] if multi_ds else []) + ["method"] + (["setting"] if show_setting else []) + ["n"]
    lines = ["| " + " | ".join(head + [f"{label}{_arrow_of(b)}" for _, label, _, b in cols]) + " |",
             "|" + "---|" * (len(head) - 1) + "---:|" + "---:|" * len(cols)]
    for k in keys:
        g = by_group[k]
        n_max = int(max((g[c]["n"] for c, *_ in cols if c in g), default=0))
        cells = []
        for col, _, scale, _ in cols:
            r = g.get(col)
            if r is None or math.isnan(r["mean"]):
                cells.append("" if r is None else "nan")
                continue
            mean = f"{r['mean'] * scale:.{digits}f}"
            if best.get((k[0] if multi_ds else None, col)) == round(r["mean"] * scale, digits):
                mean = f"**{mean}**"
            c = mean + (f" ± {r['ci95'] * scale:.{digits}f}" if not math.isnan(r["ci95"]) else "")
            if int(r["n"]) != n_max:
                c += f" (n={int(r['n'])})"
            cells.append(c)
        ident = [str(x) for x in k[:-1]] + ([k[-1]] if show_setting else [])
        lines.append("| " + " | ".join(ident + [str(n_max)] + cells) + " |")
    return lines


def _paired_table(res: pd.DataFrame, cols, digits: int, label_of) -> list[str]:
    """Markdown lines: one row per compared group, one column per metric, cells
    ``verdict: difference [95% CI]`` in the columns' units."""
    head = ["compared", "pairs"] + [f"{label}{_arrow_of(b)}" for _, label, _, b in cols]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|" + "---:|" * len(cols)]
    for key, g in res.groupby(["method", "setting"], sort=False):
        by = {r["metric"]: r for _, r in g.iterrows()}
        n_max = int(g["n"].max()) if len(g) else 0
        cells = []
        for col, _, scale, _ in cols:
            r = by.get(col)
            if r is None or r["n"] == 0:
                cells.append("no pairs")
                continue
            v = r["verdict"]
            c = (f"**{v}**" if v in ("better", "worse") else v) + \
                f" {_signed(r['diff'] * scale, digits)} [{_signed(r['ci_low'] * scale, digits)}, " \
                f"{_signed(r['ci_high'] * scale, digits)}]"
            if int(r["n"]) != n_max:
                c += f" (n={int(r['n'])})"
            cells.append(c)
        lines.append("| " + " | ".join([label_of(*key), str(n_max)] + cells) + " |")
    return lines


def sweep_comparisons(ok: pd.DataFrame, order: list[tuple[str, str]]) -> list[dict]:
    """The λ sweeps among ``ok`` rows (:data:`SWEEP_HPS` varying within one method, every other
    hyperparameter fixed): per sweep ``{"method", "hp", "fixed", "ref": setting at 0 or None,
    "others": [settings at the other values, in order]}``."""
    out = []
    for m in dict.fromkeys(mm for mm, _ in order):
        g = ok[ok["method"] == m]
        for h in SWEEP_HPS:
            if h not in g.columns or g[h].astype(str).nunique() < 2:
                continue
            fixed = [c for c in hp_columns(g) + ["model"] if c != h and g[c].astype(str).nunique() > 1]
            parts = g.groupby([g[c].astype(str) for c in fixed], sort=False) if fixed else [((), g)]
            for pkey, part in parts:
                if part[h].astype(str).nunique() < 2:
                    continue
                settings = [s for mm, s in order if mm == m and s in set(part["setting"])]
                value = {s: _num(part.loc[part["setting"] == s, h].iloc[0]) for s in settings}
                zero = [s for s in settings if value[s] == 0]
                pkey = pkey if isinstance(pkey, tuple) else (pkey,)
                out.append({"method": m, "hp": h, "fixed": ", ".join(f"{_hp_name(c)}={v}" for c, v in zip(fixed, pkey)),
                            "ref": zero[0] if zero else None,
                            "others": sorted((s for s in settings if value[s] != 0), key=lambda s: value[s])})
    return out


def headline_sections(df: pd.DataFrame, ref: str | None = None, digits: int = 3, n_resamples: int | None = None,
                      seed: int = 0) -> tuple[str, pd.DataFrame, str]:
    """The report's opening: per preset present (:func:`presets`), the headline table
    (:data:`HEADLINE`, one row per method and setting, best value per column in bold) and the paired
    comparison of every method with the reference (``ref``, default :data:`DEFAULT_REF`), then the λ
    sweeps against λ = 0 and the per-task headline tables (only where every cell has
    n ≥ :data:`PER_TASK_MIN_N`). Returns ``(markdown, paired rows for report_paired.csv, per-task markdown)``."""
    from eval.paired import N_RESAMPLES, paired_comparisons

    n_resamples = n_resamples or N_RESAMPLES
    preset = presets(df)
    parts, per_task, paired = [], [], []
    for p in ("toy", "paper", "pie_bench"):
        dfp = df[preset == p]
        if not len(dfp):
            continue
        name = PRESET_NAMES[p]
        cols = headline_columns(dfp, p)
        d = PRESET_DIGITS.get(p, digits)
        ok = dfp[dfp["status"] == "ok"]
        parts += [f"## Headline: {name}", ""]
        if not cols or not len(ok):
            parts += [f"No successful rows with the {name} headline metrics "
                      f"({', '.join(c.split('|')[0] for c, *_ in HEADLINE[p])}); see the appendix.", ""]
            continue
        stats = statistics(dfp, metrics=[c for c, *_ in cols])
        order = settings_order(dfp)
        multi_ds = dfp["dataset"].nunique() > 1
        groups = [(ds, m, s) for ds in sorted(set(dfp["dataset"])) for m, s in order] if multi_ds else order
        legend = ", ".join(f"{label} = `{c}`" + (f" ×{scale:g}" if scale != 1 else "") for c, label, scale, _ in cols)
        parts += [f"Mean ± 95% CI over the successful samples (rules in the appendix); **bold**: the best value of "
                  f"each column (↑ higher / ↓ lower is better). Columns: {legend}. Every other metric: appendix "
                  f"and report.csv.", ""]
        parts += _stats_table(stats, "all", cols, d, groups) + [""]

        # paired comparison with the reference
        r = ref or DEFAULT_REF[p]
        why = "given by --ref" if ref else f"{_REF_NOTE[p]}; --ref METHOD picks another"
        parts += [f"## Paired comparison with {r} ({name})", ""]
        rg = _ref_group(ok, order, r)
        others = [(m, s) for m, s in order if (m, s) != rg and ((ok["method"] == m) & (ok["setting"] == s)).any()]
        metrics = {c: b for c, _, _, b in cols}
        if rg is None:
            parts += [f"No paired comparison: the reference `{r}` ({why}) has no successful {name} rows "
                      f"(methods here: {', '.join(dict.fromkeys(m for m, _ in order))}).", ""]
        elif not others:
            parts += [f"No paired comparison: `{r}` is the only method here.", ""]
        else:
            res = paired_comparisons(ok, {"method": rg[0], "setting": rg[1]},
                                     [{"method": m, "setting": s} for m, s in others], metrics,
                                     n_resamples=n_resamples, seed=seed)
            res.insert(0, "reference", _group_label(*rg))
            res.insert(0, "comparison", "reference")
            res.insert(0, "preset", p)
            paired.append(res)
            parts += [f"Against `{_group_label(*rg)}` ({why}). Cells: verdict, mean difference method − reference "
                      f"[paired bootstrap 95% CI] in the headline's units; verdict from the Wilcoxon signed-rank "
                      f"test, Holm-corrected across the {len(others)} compared method(s) per metric, α = 0.05. "
                      f"p-values: appendix and report_paired.csv.", ""]
            parts += _paired_table(res, cols, d, _group_label) + [""]

        # λ sweeps against λ = 0
        sweeps = sweep_comparisons(ok, order)
        for sw in sweeps:
            hp = GREEK.get(_hp_name(sw["hp"]), _hp_name(sw["hp"]))
            fixed = f", {sw['fixed']}" if sw["fixed"] else ""
            parts += [f"## λ sweep: {sw['method']}, {hp} against {hp} = 0{fixed} ({name})", ""]
            if sw["ref"] is None:
                parts += [f"No {hp} = 0 run among these rows: nothing to compare the sweep with.", ""]
                continue
            res = paired_comparisons(ok, {"method": sw["method"], "setting": sw["ref"]},
                                     [{"method": sw["method"], "setting": s} for s in sw["others"]], metrics,
                                     n_resamples=n_resamples, seed=seed)
            res.insert(0, "reference", _group_label(sw["method"], sw["ref"]))
            res.insert(0, "comparison", f"sweep {_hp_name(sw['hp'])}")
            res.insert(0, "preset", p)
            paired.append(res)
            parts += [f"Against `{_group_label(sw['method'], sw['ref'])}`, Holm-corrected across the "
                      f"{len(sw['others'])} other value(s) per metric; cells as above.", ""]
            parts += _paired_table(res, cols, d, lambda m, s: s or m) + [""]

        # per-task headline tables, only where every cell has enough samples
        tasks = [t for t in dict.fromkeys(stats["task"]) if t != "all"]
        small = {}
        for t in tasks:
            n = stats.loc[(stats["task"] == t) & stats["metric"].isin(metrics), "n"]
            n_min = int(n.fillna(0).min()) if len(n) else 0
            if n_min >= PER_TASK_MIN_N:
                per_task += [f"### {t} ({name})", ""] + _stats_table(stats, t, cols, d, groups) + [""]
            else:
                small[t] = n_min
        if small:
            what = "no task qualifies here" if len(small) == len(tasks) else f"not shown for {', '.join(small)}"
            per_task += [f"Per-task tables ({name}) are shown only where every cell has n ≥ {PER_TASK_MIN_N}: {what} "
                         f"(smallest n: {min(small.values())}); the per-task statistics of every metric are in "
                         f"report.csv.", ""]
    paired_df = pd.concat(paired, ignore_index=True) if paired else pd.DataFrame()
    return "\n".join(parts), paired_df, "\n".join(per_task)


def paired_details_markdown(paired: pd.DataFrame, digits: int = 3) -> str:
    """The appendix's long table of every paired comparison: n, means, difference, CI, p, Holm p, verdict
    (in the headline's units)."""
    scale = {(p, c): s for p in HEADLINE for c, _, s, _ in HEADLINE[p] for c in c.split("|")}
    label = {(p, c): lab for p in HEADLINE for c, lab, _, _ in HEADLINE[p] for c in c.split("|")}
    lines = ["| preset | reference | compared | metric | pairs | reference mean | mean | difference | 95% CI | p | "
             "p (Holm) | verdict |",
             "|---|---|---|---|---:|---:|---:|---:|---|---:|---:|---|"]
    for _, r in paired.iterrows():
        k = (r["preset"], r["metric"])
        s, d = scale.get(k, 1.0), PRESET_DIGITS.get(r["preset"], digits)
        f = (lambda x: "nan" if math.isnan(x) else f"{x * s:.{d}f}")
        lines.append(f"| {r['preset']} | {r['reference']} | {_group_label(r['method'], r['setting'])} | "
                     f"{label.get(k, r['metric'])}{_arrow_of(r['better'])} | {int(r['n'])} | {f(r['ref_mean'])} | "
                     f"{f(r['mean'])} | {_signed(r['diff'] * s, d)} | [{_signed(r['ci_low'] * s, d)}, "
                     f"{_signed(r['ci_high'] * s, d)}] | {_pval(r['p'])} | {_pval(r['p_holm'])} | {r['verdict']} |")
    return "\n".join(lines) + "\n"


def _pval(p: float) -> str:
    if p is None or math.isnan(p):
        return "nan"
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def alias_columns(df: pd.DataFrame, columns: Sequence[str]) -> dict[str, str]:
    """``{dropped: kept}`` for the :data:`ALIASES` pairs among ``columns`` whose values agree on every
    ``ok`` row (relative tolerance 1e-5, NaN in the same rows)."""
    ok = df[df["status"] == "ok"]
    out = {}
    for keep, drop in ALIASES:
        if keep in columns and drop in columns:
            a = pd.to_numeric(ok[keep], errors="coerce").to_numpy(dtype=np.float64)
            b = pd.to_numeric(ok[drop], errors="coerce").to_numpy(dtype=np.float64)
            same_nan = np.array_equal(np.isnan(a), np.isnan(b))
            if same_nan and np.allclose(a[~np.isnan(a)], b[~np.isnan(b)], rtol=1e-5, atol=1e-8):
                out[drop] = keep
    return out


# ------------------------------------------------------------------ report
def markdown_report(df: pd.DataFrame, stats: pd.DataFrame, runs: Sequence[Path], metrics: Sequence[str],
                    figures: Sequence[str] = (), digits: int = 3, ref: str | None = None,
                    n_resamples: int | None = None, seed: int = 0,
                    headline: tuple[str, pd.DataFrame, str] | None = None) -> str:
    """``report.md``: the headline table and paired comparison of each preset, λ sweeps against
    λ = 0, per-task tables (where n allows), the PIE-Bench section, figures, then the appendix
    (every metric, the rules, every p-value), runs and errors. ``headline``: the result of
    :func:`headline_sections` when already computed."""
    head, paired, per_task = headline if headline is not None else headline_sections(df, ref, digits, n_resamples, seed)
    parts = ["# oig report", "",
             f"{len(df)} rows ({int((df['status'] == 'ok').sum())} ok) from {len(runs)} run folder(s), "
             f"{df['method'].nunique()} method(s), dataset(s): {', '.join(sorted(set(df['dataset'])))}.", ""]
    sweeps = swept_hyperparameters(df)
    if sweeps:
        parts += ["Swept: " + "; ".join(f"{m}: {', '.join(_hp_name(c) for c in cs)}" for m, cs in sweeps.items()), ""]
    parts += [head]
    ok_groups = set(zip(*[df.loc[df["status"] == "ok", c] for c in ("method", "setting")]))
    failed = [f"{m} {s}".strip() for m, s in settings_order(df) if (m, s) not in ok_groups]
    if failed:
        parts += [f"No successful rows (not in the tables; see Runs and errors): {', '.join(failed)}.", ""]
    if per_task:
        parts += ["## Per task", "", per_task]
    pie = pie_bench_statistics(df)
    if pie is not None:
        parts += [pie_bench_markdown(pie)]
    if figures:
        parts += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    aliases = alias_columns(df, metrics)
    shown = [m for m in metrics if m not in aliases]
    parts += ["## Appendix: every metric", "", "### Rules", "", NAN_RULE, "",
              PAIRED_RULE.format(n=n_resamples or _n_resamples(), seed=seed), "",
              "### Overall", "", markdown_table(stats, "all", shown, digits)]
    if aliases:
        same = ", ".join(f"`{k}` (= `{d}`)" for d, k in aliases.items())
        parts += [f"Identical columns shown once: {same}.", ""]
    others = [c for c in metric_columns(df) if c not in metrics]
    if others:
        parts += [f"Other columns (in report.csv): {', '.join(others)}.", ""]
    if len(paired):
        parts += ["### Paired comparisons: every p-value", "", paired_details_markdown(paired, digits)]
    parts += ["## Runs and errors", "", runs_table(df)]
    parts += ["## Run folders", ""] + [f"- `{r}`" for r in runs] + [""]
    return "\n".join(parts)


def _n_resamples() -> int:
    from eval.paired import N_RESAMPLES

    return N_RESAMPLES


def write_report(paths: Sequence[str | Path], out: str | Path | None = None, samples: int | None = None,
                 x: str | None = None, y: str | None = None, metrics: Sequence[str] | None = None,
                 digits: int = 3, ref: str | None = None, html: bool = False, html_images: str = "auto",
                 n_resamples: int | None = None, seed: int = 0) -> dict[str, Path]:
    """Write the report files (module docstring) for the run folders under ``paths``; returns
    ``{kind: path}``. ``ref``: the reference method of the paired comparisons (default: each preset's
    baseline, :data:`DEFAULT_REF`); ``html``: also write ``gallery.html`` (:mod:`oig.gallery`, images
    ``auto`` / ``embed`` / ``link``)."""
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
    if ref is not None and ref not in set(df["method"]):
        raise ValueError(f"oig-report: --ref {ref}: no rows of that method (methods: "
                         f"{', '.join(dict.fromkeys(m for m, _ in settings_order(df)))})")
    shown = list(metrics) if metrics else table_metrics(df)
    stats = statistics(df)
    written: dict[str, Path] = {}
    stats.to_csv(out / "report.csv", index=False)
    written["csv"] = out / "report.csv"
    df.to_csv(out / "report_rows.csv", index=False)
    written["rows"] = out / "report_rows.csv"
    headline = headline_sections(df, ref, digits, n_resamples, seed)
    if len(headline[1]):
        headline[1].to_csv(out / "report_paired.csv", index=False)
        written["paired"] = out / "report_paired.csv"

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
    if html:
        from oig.gallery import write_gallery

        written["html"] = write_gallery(df, out / "gallery.html", images=html_images)
    (out / "report.md").write_text(markdown_report(df, stats, runs, shown, figures, digits, ref, n_resamples, seed,
                                                   headline=headline))
    written["markdown"] = out / "report.md"
    log.info("report in %s: %s", out, ", ".join(p.name for p in written.values()))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="oig-report", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", help="run folders, multirun folders or any folder above them")
    ap.add_argument("--out", help="output folder (default: the folder given, or reports/<timestamp> for several)")
    ap.add_argument("--samples", type=int, default=None,
                    help=f"rows of the qualitative grid (default {GRID_PER_TASK} per task, {GRID_MIN} to {GRID_MAX})")
    ap.add_argument("--x", help=f"trade-off x axis (default: first of {', '.join(TRADEOFF_X)})")
    ap.add_argument("--y", help=f"trade-off y axis (default: first of {', '.join(TRADEOFF_Y)})")
    ap.add_argument("--metrics",
                    help="comma-separated columns of the appendix table (default: quality metrics + costs)")
    ap.add_argument("--digits", type=int, default=3, help="decimals in the markdown tables")
    ap.add_argument("--ref", help="reference method of the paired comparisons (default: the preset's baseline: "
                                  + ", ".join(f"{p}: {m}" for p, m in DEFAULT_REF.items()) + ")")
    ap.add_argument("--html", action="store_true", help="also write gallery.html, a browsable page of every sample")
    ap.add_argument("--html-images", choices=("auto", "embed", "link"), default="auto",
                    help="gallery images: embedded (base64), linked (relative paths), or auto: embedded up to "
                         "a size limit (default auto)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        written = write_report(args.dirs, args.out, samples=args.samples, x=args.x, y=args.y,
                               metrics=args.metrics.split(",") if args.metrics else None, digits=args.digits,
                               ref=args.ref, html=args.html, html_images=args.html_images)
    except (FileNotFoundError, NotADirectoryError, ValueError, KeyError) as e:
        log.error("%s", e.args[0] if e.args else e)
        return 2
    log.info("wrote %s", written["markdown"])
    if "html" in written:
        log.info("wrote %s", written["html"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
