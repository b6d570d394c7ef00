"""``oig-run``: the Hydra app that runs one editor over one dataset and scores it.

The story of a run, top to bottom: load the model, build the editor and bind it, build the
dataset and the metrics, then for each sample edit, score, save images and append one row.
Rows are written one file per sample (``rows/<id>.json``, temp file + rename), so a killed
run loses at most the sample in flight and a re-run in the same folder skips what is done;
``results.parquet`` is rebuilt from them at the end. A failing sample becomes a row with
``status="error"`` and a one-line ``error``; the run goes on unless ``strict=true``. Resuming
(``resume=true``) runs the samples whose row is an error again (``retry_errors=true``): the old
row stays until the new one replaces it, and the summary counts the retried and the fixed rows.

The configs are the package's own (``oig/conf``, Hydra's ``pkg://oig.conf``; the checkout's
top-level ``conf/`` links there), so ``oig-run`` works from any directory once ``oig`` is
installed; installed plugins add theirs (:func:`oig.registry.use_plugin_configs`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

log = logging.getLogger("oig.run")

#: the Hydra configs on disk (inside the package) and as a Hydra search-path entry
CONF_DIR = Path(__file__).resolve().parent / "conf"
CONF_PATH = "pkg://oig.conf"
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def safe_id(s: str) -> str:
    """A sample id as a file name: never a path, never hidden, never '..' (the datasets' own rule,
    applied again so that no dataset can write outside the run folder)."""
    from oig.data.base import sanitize_id

    return sanitize_id(s)


def _atomic_write(path: Path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _jsonable(v):
    if isinstance(v, (np.floating, np.integer)):
        v = v.item()
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return str(v)  # JSON has no NaN/inf; read back by load_rows
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def load_rows(run_dir: Path) -> list[dict]:
    rows = []
    for p in sorted((Path(run_dir) / "rows").glob("*.json")):
        try:
            r = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            log.warning("ignoring unreadable row file %s", p)
            continue
        rows.append({k: float(v) if v in ("nan", "inf", "-inf") else v for k, v in r.items()})
    return rows


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated by torch since the last reset; CPU: the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_line(e: BaseException) -> str:
    """``Type: message`` on one line, for the ``error`` column."""
    from oig.data.base import one_line as flat

    return f"{type(e).__name__}: {flat(str(e))}"[:500]


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def launcher_jobs() -> int | None:
    """How many jobs the current Hydra launcher runs at once on this machine (joblib's ``n_jobs``),
    or None outside a Hydra job or under a launcher that does not say."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    launcher = HydraConfig.get().get("launcher") or {}
    n = launcher.get("n_jobs")
    if n is None:
        return None
    n = int(n)
    return max(1, available_cores() + 1 + n) if n < 0 else max(1, n)  # joblib: -1 = one job per core


def job_threads(setting) -> int | None:
    """The thread count a job should use for torch, OpenMP and MKL, or None to leave the defaults.

    ``threads`` = N: N. ``auto``: the cores shared by the jobs a launcher runs at once on this
    machine, ``cores // n_jobs`` (at least 1), under joblib; submitit's ``cpus_per_task`` when set;
    otherwise None (torch's default: ``OMP_NUM_THREADS`` or every core). ``null``: None.
    """
    if setting is None:
        return None
    if isinstance(setting, str) and setting.strip().lower() == "auto":
        jobs = launcher_jobs()
        if jobs is not None:
            return max(1, available_cores() // jobs)
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            cpus = (HydraConfig.get().get("launcher") or {}).get("cpus_per_task")
            if cpus:
                return int(cpus)
        return None
    n = int(setting) if isinstance(setting, int) and not isinstance(setting, bool) else 0
    if isinstance(setting, str) and setting.strip().isdigit():
        n = int(setting)
    if n < 1:
        raise ValueError(f"threads: expected a positive integer, auto or null, got {setting!r} "
                         "(conf/config.yaml; e.g. threads=4)")
    return n


def set_threads(n: int) -> None:
    """``n`` intra-op threads for torch (its OpenMP and MKL pools), and the same in
    OMP/MKL/OPENBLAS_NUM_THREADS for libraries and processes started later."""
    torch.set_num_threads(n)
    for var in THREAD_ENV:
        os.environ[var] = str(n)


def run(cfg: DictConfig, output_dir: str | Path | None = None) -> dict:
    """Run ``cfg`` and return the summary. ``output_dir`` overrides ``paths.output_dir``."""
    from hydra.utils import instantiate

    from oig.cache import InversionCache
    from oig.image import make_grid
    from oig.models import load_sd
    from oig.types import EditRequest

    from omegaconf import open_dict

    if cfg.get("preflight"):  # check models, data, one edit and the metrics (oig.preflight); run nothing
        from oig.preflight import check_and_print

        status = check_and_print(cfg)
        if status:
            raise SystemExit(status)
        return {"preflight": "ready"}
    if output_dir is not None:  # outside a Hydra app (tests, notebooks): no ${hydra:...} to resolve
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    threads = job_threads(cfg.get("threads"))
    if threads is not None:  # before any torch work of this job
        set_threads(threads)
    log.info("threads: %d (threads=%s, %d cores)", torch.get_num_threads(), cfg.get("threads"), available_cores())
    if cfg.get("deterministic"):  # GPU: deterministic kernels (slower); CPU runs are deterministic anyway
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    models = load_sd(cfg.model.pretrained, device=cfg.device, dtype=cfg.dtype, revision=cfg.model.get("revision"),
                     steps_offset=cfg.model.get("steps_offset"))
    cache = InversionCache(cfg.cache.dir, enabled=cfg.cache.enabled)
    targets = _targets(cfg, out, models, cache)
    sweep = len(targets) > 1 or targets[0].out != out
    method = targets[0].editor.name
    for t in targets:
        log.info("method %s %s%s", method, t.hp, f" -> {t.out.name}" if sweep else "")
    dataset = instantiate(cfg.dataset)
    metrics = {name: instantiate(m) for name, m in (cfg.get("metrics") or {}).items()}
    for m in metrics.values():
        m.setup(models.device)
    logger = instantiate(cfg.logger) if cfg.get("logger") else None
    if logger is not None:
        logger.start(out, OmegaConf.to_container(cfg, resolve=True), name=f"{method}-{out.name}")

    for t in targets:
        t.resume(cfg)
    t_run = time.perf_counter()
    done_all = set.intersection(*(set(t.done) for t in targets))  # samples every point has
    todo = [i for i in dataset.ids() if safe_id(i) not in done_all] if hasattr(dataset, "ids") else None
    samples = dataset.iter_samples(skip=done_all) if hasattr(dataset, "iter_samples") else iter(dataset)
    for sample in tqdm(samples, total=len(todo) if todo is not None else len(dataset), desc=method,
                       disable=not cfg.progress):
        sid = safe_id(sample.id)
        pending = [t for t in targets if sid not in t.done]
        if not pending:
            continue
        row0 = {"id": sid, "task": sample.task, "source_prompt": sample.source_prompt,
                "target_prompt": sample.target_prompt, "method": method, "model": cfg.model.pretrained,
                "dataset": getattr(dataset, "name", type(dataset).__name__), "seed": int(cfg.seed),
                "status": "ok", "error": None}
        rows = [{**row0, **{f"hp_{k}": v for k, v in t.hp.items()}} for t in pending]
        c0 = cache.stats()
        results = [None] * len(pending)
        try:
            if sample.error:
                raise ValueError(sample.error)
            if models.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(models.device)
            req = EditRequest.from_sample(sample, seed=int(cfg.seed))
            if sweep:
                results = pending[0].editor.edit_points(req, [t.editor for t in pending])
            else:
                results = [pending[0].editor(req)]
        except Exception as e:
            if cfg.strict:
                raise
            for row in rows:
                row["status"], row["error"] = "error", one_line(e)
            log.warning("%s: %s", sid, one_line(e))
        peak = peak_memory_mb(models.device)
        cache_delta = {k: v - c0.get(k, 0) for k, v in cache.stats().items()}
        for t, row, res in zip(pending, rows, results):
            images = _score(cfg, row, res, sample, metrics, sid, peak) if res is not None else {}
            row.update(cache_delta)
            t.write(cfg, sid, row, images)
            if logger is not None:
                logger.log_row(row, images)

    summaries = [t.finish(cfg, dataset, make_grid, t_run, cache) for t in targets]
    if not sweep:
        summary = summaries[0]
        log.info("run folder: %s", out)
    else:
        summary = _sweep_summary(out, targets, summaries, cfg, make_grid)
    if logger is not None:
        logger.finish({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
    return summary


class _Target:
    """Where one editor's rows go: the run folder itself, or one point's folder of a sweep."""

    def __init__(self, out: Path, editor, point: dict):
        self.out, self.editor, self.point = out, editor, point
        self.hp = editor.hparams()
        self.done: dict[str, dict] = {}
        self.retry: set[str] = set()
        self.n_new = self.n_err = self.n_retried = self.n_fixed = 0

    def resume(self, cfg):
        previous = {r["id"]: r for r in load_rows(self.out)} if cfg.resume else {}
        self.retry = {i for i, r in previous.items() if r.get("status") == "error"} \
            if cfg.get("retry_errors", True) else set()
        self.done = {i: r for i, r in previous.items() if i not in self.retry}  # error rows to retry are not done
        if previous:
            log.info("resuming in %s: %d rows already written, %d of them errors%s", self.out, len(previous),
                     sum(r.get("status") == "error" for r in previous.values()),
                     f"; retrying those {len(self.retry)} samples" if self.retry else "")

    def write(self, cfg, sid: str, row: dict, images: dict):
        if cfg.save_images and images:
            d = self.out / "images" / sid
            d.mkdir(parents=True, exist_ok=True)
            for k, im in images.items():
                if im is not None:
                    im.save(d / f"{k}.png")
        # a retried sample's old error row is replaced only now, in one rename
        _atomic_write(self.out / "rows" / f"{sid}.json", json.dumps({k: _jsonable(v) for k, v in row.items()}).encode())
        self.done[sid] = row
        self.n_new += 1
        self.n_err += row["status"] == "error"
        if sid in self.retry:
            self.n_retried += 1
            self.n_fixed += row["status"] == "ok"

    def finish(self, cfg, dataset, make_grid, t_run: float, cache) -> dict:
        df = pd.DataFrame(load_rows(self.out))
        if len(df):
            df.to_parquet(self.out / "results.parquet", index=False)
        summary = summarize(df)
        summary.update(method=self.editor.name, samples=len(df), new_samples=self.n_new,
                       errors=int((df.get("status") == "error").sum()) if len(df) else 0,
                       retried=self.n_retried, retried_ok=self.n_fixed, threads=torch.get_num_threads(),
                       run_seconds=round(time.perf_counter() - t_run, 2), **cache.stats())
        (self.out / "summary.json").write_text(json.dumps({k: _jsonable(v) for k, v in summary.items()}, indent=2))
        if cfg.save_images:
            _grid(self.out, df, cfg.grid_rows, make_grid)
        retried = f", {self.n_retried} error rows retried ({self.n_fixed} now ok)" if self.n_retried else ""
        log.info("summary of %s (%d samples, %d errors%s, %d cache hits, %d misses):\n%s", self.out, summary["samples"],
                 summary["errors"], retried, cache.hits, cache.misses, format_summary(summary))
        return summary


def _targets(cfg: DictConfig, out: Path, models, cache) -> list[_Target]:
    """One target per point of the method's vector hyperparameters (:mod:`oig.sweep`); one target
    writing into ``out`` itself when there are none."""
    from hydra.utils import instantiate

    from oig import sweep

    method_cfg = OmegaConf.to_container(cfg.method, resolve=True)
    pts = sweep.points(method_cfg)
    if pts == [{}]:
        return [_Target(out, instantiate(cfg.method).bind(models, cache=cache, progress=False), {})]
    targets = []
    full = OmegaConf.to_container(cfg, resolve=True)
    for j, point in enumerate(pts):
        editor = instantiate(sweep.apply(method_cfg, point)).bind(models, cache=cache, progress=False)
        t = _Target(out / sweep.folder_name(j, editor.name, point), editor, point)
        t.out.mkdir(parents=True, exist_ok=True)
        (t.out / "config.yaml").write_text(OmegaConf.to_yaml({**full, "method": sweep.apply(method_cfg, point)}))
        targets.append(t)
    log.info("sweep over %s: %d points, one run folder each under %s", list(pts[0]), len(pts), out)
    return targets


def _score(cfg, row: dict, res, sample, metrics: dict, sid: str, peak: float) -> dict:
    """Fill ``row`` with one edit's timings, info and metrics; returns its images. A non-finite edit
    makes the row an error; a failing metric leaves the edit and names the metric."""
    from eval.base import MetricInput
    from oig.image import resize_mask

    if not np.isfinite(np.asarray(res.image, dtype=np.float32)).all():
        row["status"], row["error"] = "error", "RuntimeError: non-finite edit"
        return {}
    row.update({f"time_{k}": v for k, v in res.timings.items()})
    row["peak_mem_mb"] = peak
    row.update({k: v for k, v in res.info.items() if isinstance(v, (int, float, str, bool))})
    images = {"source": res.source, "edit": res.image, "reconstruction": res.reconstruction}
    if sample.target_image is not None:
        images["target"] = sample.target_image.resize(res.image.size)
    mi = MetricInput(source=res.source, edit=res.image, source_prompt=sample.source_prompt,
                     target_prompt=sample.target_prompt, mask=resize_mask(sample.mask, res.image.size),
                     target_image=images.get("target"), task=sample.task, meta=sample.meta)
    for name, m in metrics.items():
        try:
            row.update(m([mi])[0])
        except Exception as e:  # a metric failure does not lose the edit
            if cfg.strict:
                raise
            row[f"metric_error_{name}"] = one_line(e)
            log.warning("%s: metric %s failed: %s", sid, name, one_line(e))
    return images


def _sweep_summary(out: Path, targets: list[_Target], summaries: list[dict], cfg, make_grid) -> dict:
    """The sweep folder's ``sweep.json`` (points, folders, summaries) and ``sweep_grid.png``
    (source | the edit of every point, for a few samples); returns the sweep's summary."""
    from PIL import Image

    from oig import sweep

    info = {"points": [{"folder": t.out.name, "values": t.point, **{k: _jsonable(v) for k, v in s.items()}}
                       for t, s in zip(targets, summaries)]}
    (out / "sweep.json").write_text(json.dumps(info, indent=2, default=str))
    if cfg.save_images:
        ok = [set(i for i, r in t.done.items() if r.get("status") == "ok") for t in targets]
        ids = sorted(set.intersection(*ok))[: cfg.grid_rows] if ok else []
        rows = []
        for i in ids:
            src = targets[0].out / "images" / i / "source.png"
            rows.append([Image.open(src).convert("RGB")] +
                        [Image.open(t.out / "images" / i / "edit.png").convert("RGB") for t in targets])
        if rows:
            make_grid(rows, labels=["source"] + [sweep.label(t.point) for t in targets],
                      row_labels=ids).save(out / "sweep_grid.png")
    log.info("sweep folder: %s (%d points)", out, len(targets))
    return {"method": targets[0].editor.name, "points": len(targets),
            "samples": sum(s.get("samples", 0) for s in summaries),
            "errors": sum(s.get("errors", 0) for s in summaries), "sweep": info["points"]}


NON_METRIC = ("seed", "sweep_batch")


def summarize(df: pd.DataFrame) -> dict:
    """Mean of every numeric metric/timing column over the ``ok`` rows, by the evaluation package's
    one aggregation function (NaN excluded per column)."""
    from eval.aggregate import aggregate

    if not len(df):
        return {}
    ok = df[df["status"] == "ok"]
    cols = [c for c in ok.columns if not c.startswith(("hp_", "cache_")) and c not in NON_METRIC
            and (pd.api.types.is_numeric_dtype(ok[c]) or pd.api.types.is_bool_dtype(ok[c]))]
    if not len(ok) or not cols:
        return {}
    agg = aggregate(ok, by=[], metrics=cols)
    return {r.metric: float(r.mean) for r in agg.itertuples()}


def format_summary(summary: dict) -> str:
    lines = ["| metric | mean |", "|---|---|"]
    for k, v in summary.items():
        if isinstance(v, float):
            lines.append(f"| {k} | {v:.4g} |")
    return "\n".join(lines)


def _grid(out: Path, df: pd.DataFrame, n: int, make_grid):
    from PIL import Image

    if not len(df):
        return
    ok = df[df["status"] == "ok"].sort_values("id")
    queues = [list(g["id"]) for _, g in ok.groupby(ok["task"].fillna("").astype(str), sort=True)]
    ids: list[str] = []  # round-robin over tasks: several samples of every task, not the first task's only
    while len(ids) < n and any(queues):
        for q in queues:
            if q and len(ids) < n:
                ids.append(q.pop(0))
    cols = ["source", "edit", "reconstruction", "target"]
    present = [c for c in cols if any((out / "images" / i / f"{c}.png").exists() for i in ids)]
    rows = []
    for i in ids:
        rows.append([Image.open(out / "images" / i / f"{c}.png").convert("RGB")
                     if (out / "images" / i / f"{c}.png").exists() else None for c in present])
    if rows:
        make_grid(rows, labels=present, row_labels=ids).save(out / "grid.png")


def main():
    import hydra

    from oig.registry import use_plugin_configs

    # the importable module's function (not __main__'s under `python -m oig.run`), so that
    # process launchers (joblib/loky, submitit) pickle it by reference
    from oig.run import run as run_

    use_plugin_configs()  # installed plugins' config packages (entry points "oig.configs")

    @hydra.main(config_path=CONF_PATH, config_name="config", version_base="1.3")
    def _main(cfg: DictConfig):
        return run_(cfg)

    _main()


if __name__ == "__main__":
    main()
