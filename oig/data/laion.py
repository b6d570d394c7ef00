"""LAION task subsets (the pix2pix-zero / OIG real-image benchmark) from metadata you have.

Three steps, each resumable and deterministic:

1. :func:`build_manifest` (``oig-laion-manifest``) reads LAION metadata parquet files
   (columns ``URL``/``url``, ``TEXT``/``caption``, ``WIDTH``, ``HEIGHT`` and, where present,
   ``punsafe``, ``pwatermark``, ``NSFW``; names are matched case-insensitively) and keeps,
   per task, rows whose caption contains the task's source word as a whole word (any case,
   plural allowed: "cat", "Cats", not "catalog") and not its target phrase (a caption
   with both "cat" and "dog" is ambiguous for cat -> dog), whose shorter side is at
   least ``min_size`` and whose aspect ratio width/height is within
   ``[min_aspect, max_aspect]``. Rows are dropped as unsafe when ``punsafe >=
   max_punsafe`` (default 0.5), ``pwatermark >= max_pwatermark`` (default 0.8) or ``NSFW``
   is not ``"UNLIKELY"`` — each only where the column exists; a missing value there counts
   as unsafe. ``n_per_task`` rows per task are drawn with ``seed`` by bottom-k hashing of
   the URL, so the draw is independent of file order and streams through files of any
   size. Output: a parquet manifest with ``id, task, url, caption, source_prompt,
   target_prompt, instruction, width, height, source_word, target_word`` (``id`` =
   ``<task>_<sha1(url)[:12]>``; the prompts are the caption and its word swap).
2. :func:`download` (``oig-laion-download``) fetches the images with img2dataset into a
   cache folder. Every call runs img2dataset on the manifest URLs not in the cache index
   yet (URLs that failed before only with ``retry_failed``), in a new ``runs/run_NNNN``
   folder, then merges img2dataset's per-shard parquet (the saved ``id`` column,
   ``status``, ``error_message``, ``key``) into ``index.parquet`` (one row per URL: status,
   error, image path relative to the cache). A call with nothing new makes no request.
3. :class:`LaionTasks` reads manifest + cache as a dataset; URLs that failed to download
   and files that are corrupt or too small become error samples carrying img2dataset's
   or :func:`oig.image.load_image`'s message.

img2dataset starts its worker processes with the ``spawn`` method, which re-imports the
calling script: call :func:`download` from the console commands, ``python -m
oig.data.laion download`` or a script guarded by ``if __name__ == '__main__'``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from oig.image import load_image
from oig.types import Sample

from .base import EditDataset, SampleError, as_str_list, one_line, plain
from .prompts import LazyTextEncoder, _phrase_pattern, make_captioner, swap_details, word_swap
from .tasks import get_tasks, load_tasks_file

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["id", "task", "url", "caption", "source_prompt", "target_prompt", "instruction", "width",
                    "height", "source_word", "target_word"]
INDEX_COLUMNS = ["url", "id", "status", "error", "path", "run"]
COLUMN_ALIASES = {
    "url": ("url",),
    "caption": ("text", "caption"),
    "width": ("width",),
    "height": ("height",),
    "punsafe": ("punsafe",),
    "pwatermark": ("pwatermark",),
    "nsfw": ("nsfw",),
}


# --------------------------------------------------------------------------------------
# 1. manifest


def _resolve_columns(names: Sequence[str], path: Path) -> dict[str, str]:
    lower = {n.lower(): n for n in names}
    cols = {}
    for key, aliases in COLUMN_ALIASES.items():
        for a in aliases:
            if a in lower:
                cols[key] = lower[a]
                break
    missing = [k for k in ("url", "caption") if k not in cols]
    if missing:
        raise ValueError(f"{path}: no {' or '.join(missing)} column (need URL/url and TEXT/caption; has {list(names)})")
    return cols


def _int_or_none(v) -> int | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else int(f)


def task_id(task: str, url: str) -> str:
    return f"{task}_{hashlib.sha1(url.encode()).hexdigest()[:12]}"


def _hash_keys(urls: pd.Series, seed: int, task: str) -> pd.Series:
    key = hashlib.md5(f"{seed}:{task}".encode()).hexdigest()[:16]
    return pd.util.hash_pandas_object(urls, index=False, hash_key=key).astype("uint64")


def build_manifest(metadata_files: Sequence[str | Path] | str | Path, tasks: Any = None, n_per_task: int = 250,
                   seed: int = 0, min_size: int = 512, min_aspect: float | None = 0.5,
                   max_aspect: float | None = 2.0, max_punsafe: float | None = 0.5,
                   max_pwatermark: float | None = 0.8, exclude_target: bool = True,
                   out_path: str | Path | None = None, batch_size: int = 200_000) -> pd.DataFrame:
    """Select ``n_per_task`` rows per task from LAION metadata (see the module docstring)
    and write them to ``out_path`` (parquet) when given. Returns the manifest.

    ``tasks``: None (the pix2pix-zero table), names, ``<src>2<tgt>`` strings or task
    mappings (:func:`oig.data.tasks.get_tasks`). ``min_size=0``, ``min_aspect=None`` and
    ``max_aspect=None`` switch the size filters off (then WIDTH/HEIGHT may be absent);
    ``max_punsafe=None``/``max_pwatermark=None`` switch those safety filters off.
    """
    import pyarrow.parquet as pq

    if isinstance(metadata_files, (str, Path)):
        metadata_files = [metadata_files]
    files = [Path(f).expanduser() for f in plain(metadata_files)]
    if not files:
        raise ValueError("no metadata files given")
    tasks = get_tasks(tasks)
    n_per_task = int(n_per_task)
    if n_per_task < 1:
        raise ValueError(f"n_per_task must be >= 1, got {n_per_task}")
    size_filter = bool(min_size) or min_aspect is not None or max_aspect is not None
    src_re = {t.name: _phrase_pattern(t.source) for t in tasks}
    tgt_re = {t.name: _phrase_pattern(t.target) for t in tasks}
    best: dict[str, pd.DataFrame] = {t.name: pd.DataFrame() for t in tasks}
    seen = {t.name: 0 for t in tasks}
    n_rows = n_kept = 0

    for path in files:
        if not path.exists():
            raise FileNotFoundError(f"{path}: metadata file not found")
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:
            raise ValueError(f"{path}: not a readable parquet file ({one_line(e)})") from None
        cols = _resolve_columns(pf.schema_arrow.names, path)
        if size_filter and ("width" not in cols or "height" not in cols):
            raise ValueError(f"{path}: no WIDTH/HEIGHT columns; pass min_size=0, min_aspect=None, max_aspect=None "
                             f"(--min-size 0 --min-aspect none --max-aspect none) to select without size filters")
        for batch in pf.iter_batches(batch_size=batch_size, columns=list(dict.fromkeys(cols.values()))):
            df = batch.to_pandas().rename(columns={v: k for k, v in cols.items()})
            n_rows += len(df)
            keep = df["url"].notna() & df["caption"].notna()
            keep &= df["url"].astype(str).str.match(r"^https?://", case=False)
            if size_filter:
                w = pd.to_numeric(df["width"], errors="coerce")
                h = pd.to_numeric(df["height"], errors="coerce")
                keep &= w.notna() & h.notna() & (w > 0) & (h > 0)
                if min_size:
                    keep &= w.where(w < h, h) >= min_size
                if min_aspect is not None:
                    keep &= (w / h) >= float(min_aspect)
                if max_aspect is not None:
                    keep &= (w / h) <= float(max_aspect)
            if "punsafe" in df and max_punsafe is not None:
                keep &= pd.to_numeric(df["punsafe"], errors="coerce") < float(max_punsafe)
            if "pwatermark" in df and max_pwatermark is not None:
                keep &= pd.to_numeric(df["pwatermark"], errors="coerce") < float(max_pwatermark)
            if "nsfw" in df:
                keep &= df["nsfw"].astype(str).str.strip().str.upper() == "UNLIKELY"
            df = df[keep.fillna(False).astype(bool)]
            n_kept += len(df)
            if not len(df):
                continue
            caps = df["caption"].astype(str)
            for t in tasks:
                m = caps.str.contains(src_re[t.name])
                if exclude_target and t.target.lower() != t.source.lower():
                    m &= ~caps.str.contains(tgt_re[t.name])
                cand = df[m]
                if not len(cand):
                    continue
                seen[t.name] += len(cand)
                cand = cand.assign(_key=_hash_keys(cand["url"].astype(str), seed, t.name).values)
                merged = pd.concat([best[t.name], cand], ignore_index=True) if len(best[t.name]) else cand
                merged = merged.sort_values(["_key", "url"], kind="stable").drop_duplicates("url")
                best[t.name] = merged.head(n_per_task)

    rows = []
    for t in tasks:
        sel = best[t.name]
        if len(sel) < n_per_task:
            log.warning("task %s: only %d of %d requested images match (%d candidates)", t.name, len(sel),
                        n_per_task, seen[t.name])
        for r in sel.to_dict("records"):
            caption = " ".join(str(r["caption"]).split())
            rows.append({
                "id": task_id(t.name, str(r["url"])), "task": t.name, "url": str(r["url"]), "caption": caption,
                "source_prompt": caption, "target_prompt": word_swap(caption, t.source, t.target),
                "instruction": t.instruction_text(),
                "width": _int_or_none(r.get("width")), "height": _int_or_none(r.get("height")),
                "source_word": t.source, "target_word": t.target,
            })
        log.info("task %s: %d candidates, %d selected", t.name, seen[t.name], len(sel))
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    manifest["width"] = manifest["width"].astype("Int64")
    manifest["height"] = manifest["height"].astype("Int64")
    log.info("read %d metadata rows (%d pass the size/safety filters); manifest has %d rows", n_rows, n_kept,
             len(manifest))
    if out_path is not None:
        out_path = Path(out_path).expanduser()
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_name(out_path.name + f".tmp{os.getpid()}")
        manifest.to_parquet(tmp, index=False)
        os.replace(tmp, out_path)
        log.info("wrote %s", out_path)
    return manifest


def read_manifest(path: str | Path) -> pd.DataFrame:
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: LAION manifest not found; build it with oig-laion-manifest")
    try:
        df = pd.read_parquet(path)
    except Exception as e:
        raise ValueError(f"{path}: cannot read the manifest ({one_line(e)})") from None
    missing = [c for c in ("id", "task", "url", "source_prompt", "target_prompt") if c not in df]
    if missing:
        raise ValueError(f"{path}: manifest lacks columns {missing}")
    if df["id"].duplicated().any():
        raise ValueError(f"{path}: duplicate ids, e.g. {df['id'][df['id'].duplicated()].iloc[0]!r}")
    return df


# --------------------------------------------------------------------------------------
# 2. download


def _clean(v) -> str | None:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return str(v)


def _scan_run(cache_dir: Path, run_dir: Path, encode_format: str) -> pd.DataFrame:
    """img2dataset's per-shard parquet tables of one run -> index rows."""
    rows = []
    for pq_file in sorted(run_dir.glob("*.parquet")):
        try:
            df = pd.read_parquet(pq_file)
        except Exception as e:
            log.warning("%s: unreadable img2dataset shard table (%s); its URLs will be fetched again", pq_file, e)
            continue
        for r in df.to_dict("records"):
            status, err, path = _clean(r.get("status")), _clean(r.get("error_message")), None
            if status == "success":
                f = run_dir / pq_file.stem / f"{r['key']}.{encode_format}"
                if f.exists():
                    path = str(f.relative_to(cache_dir))
                else:
                    status, err = "missing", f"{f}: downloaded file is missing"
            rows.append({"url": _clean(r.get("url")), "id": _clean(r.get("id")), "status": status, "error": err,
                         "path": path, "run": run_dir.name})
    return pd.DataFrame(rows, columns=INDEX_COLUMNS)


def read_index(cache_dir: str | Path) -> pd.DataFrame:
    """The cache index (one row per URL); empty if nothing was downloaded yet."""
    f = Path(cache_dir).expanduser() / "index.parquet"
    if f.exists():
        try:
            return pd.read_parquet(f)
        except Exception as e:
            raise ValueError(f"{f}: unreadable cache index ({one_line(e)}); delete it and run oig-laion-download "
                             f"again to rebuild it from runs/") from None
    return pd.DataFrame(columns=INDEX_COLUMNS)


def _write_index(cache_dir: Path, df: pd.DataFrame):
    tmp = cache_dir / f"index.parquet.tmp{os.getpid()}"
    df.to_parquet(tmp, index=False)
    os.replace(tmp, cache_dir / "index.parquet")


def download(manifest: str | Path | pd.DataFrame, cache_dir: str | Path, tasks: Any = None, thread_count: int = 4,
             processes_count: int = 1, timeout: int = 10, retries: int = 0, retry_failed: bool = False,
             resize_mode: str = "no", image_size: int = 512, encode_format: str = "jpg", encode_quality: int = 95,
             skip_reencode: bool = True, min_image_size: int = 0, user_agent_token: str | None = None,
             disallowed_header_directives: list[str] | None = None) -> dict[str, int]:
    """Download the manifest's images into ``cache_dir`` with img2dataset (resumable).

    ``resize_mode="no"`` keeps the original pixels (JPEGs keep their bytes with
    ``skip_reencode``; other formats are re-encoded to ``encode_format``); img2dataset's
    ``keep_ratio``/``center_crop``/``border`` with ``image_size`` work too. ``tasks``
    restricts the download to some tasks. img2dataset's default ``X-Robots-Tag`` opt-out
    handling (noai, noimageai, ...) is kept unless ``disallowed_header_directives`` is given.

    Returns counts: ``pending`` (URLs sent to img2dataset in this call), ``success`` and
    ``failed`` (of those), ``cached`` (already downloaded), ``failed_before`` (skipped
    because they failed in an earlier call).
    """
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations would query PyPI on import
    import img2dataset

    cache_dir = Path(cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    df = manifest if isinstance(manifest, pd.DataFrame) else read_manifest(manifest)
    names = as_str_list(tasks, "tasks")
    if names is not None:
        df = df[df["task"].isin(names)]
    urls = df.drop_duplicates("url")[["url", "id"]]

    index = read_index(cache_dir)
    runs_dir = cache_dir / "runs"
    # runs that finished after the last index write (a crash between the two) are merged too
    indexed_runs = set(index["run"].dropna()) if len(index) else set()
    for rd in sorted(runs_dir.glob("run_*")) if runs_dir.exists() else []:
        if rd.is_dir() and rd.name not in indexed_runs:
            index = pd.concat([index, _scan_run(cache_dir, rd, encode_format)], ignore_index=True)
    if len(index):
        index = index.drop_duplicates("url", keep="last").reset_index(drop=True)
    paths = dict(zip(index["url"], index["path"])) if len(index) else {}
    ok = set(index.loc[index["status"] == "success", "url"]) if len(index) else set()
    ok = {u for u in ok if paths.get(u) and (cache_dir / str(paths[u])).exists()}
    failed = set(index.loc[index["status"] != "success", "url"]) if len(index) else set()  # deleted files: refetch
    skip = ok if retry_failed else ok | failed
    pending = urls[~urls["url"].isin(skip)]
    counts = {"pending": len(pending), "cached": int(urls["url"].isin(ok).sum()),
              "failed_before": int(urls["url"].isin(failed).sum()) if not retry_failed else 0,
              "success": 0, "failed": 0}
    if not len(pending):
        log.info("nothing to download: %d cached, %d failed earlier (retry_failed=%s)", counts["cached"],
                 counts["failed_before"], retry_failed)
        _write_index(cache_dir, index if len(index) else pd.DataFrame(columns=INDEX_COLUMNS))
        return counts

    runs_dir.mkdir(exist_ok=True)
    nums = [int(p.name[4:]) for p in runs_dir.glob("run_*") if p.is_dir() and p.name[4:].isdigit()]
    run_dir = runs_dir / f"run_{1 + max(nums, default=-1):04d}"
    url_list = runs_dir / f"{run_dir.name}_input.parquet"
    pending.to_parquet(url_list, index=False)
    log.info("downloading %d images into %s (%d cached)", len(pending), run_dir, counts["cached"])
    kw = {}
    if disallowed_header_directives is not None:
        kw["disallowed_header_directives"] = list(disallowed_header_directives)
    try:
        img2dataset.download(
            url_list=str(url_list), input_format="parquet", url_col="url", save_additional_columns=["id"],
            output_folder=str(run_dir), output_format="files", resize_mode=resize_mode, image_size=int(image_size),
            encode_format=encode_format, encode_quality=int(encode_quality), skip_reencode=bool(skip_reencode),
            processes_count=int(processes_count), thread_count=int(thread_count), timeout=int(timeout),
            retries=int(retries), min_image_size=int(min_image_size), enable_wandb=False,
            incremental_mode="incremental", user_agent_token=user_agent_token, compute_hash=None,
            extract_exif=False, **kw,
        )
    finally:
        url_list.unlink(missing_ok=True)
        shutil.rmtree(run_dir / "_tmp", ignore_errors=True)
    new = _scan_run(cache_dir, run_dir, encode_format)
    counts["success"] = int((new["status"] == "success").sum())
    counts["failed"] = int(len(new) - counts["success"])
    if len(new) < len(pending):
        log.warning("img2dataset reported on %d of %d URLs; the rest will be fetched next time", len(new), len(pending))
    index = pd.concat([index, new], ignore_index=True) if len(index) else new
    index = index.drop_duplicates("url", keep="last").reset_index(drop=True)
    _write_index(cache_dir, index)
    log.info("downloaded %d, failed %d (%s)", counts["success"], counts["failed"], run_dir)
    return counts


# --------------------------------------------------------------------------------------
# 3. dataset


class LaionTasks(EditDataset):
    """The images of a LAION task manifest, read from a :func:`download` cache.

    ``manifest``: the parquet from ``oig-laion-manifest``; ``cache_dir``: the folder of
    ``oig-laion-download``; ``tasks``: task names to keep (None = all, in manifest order).

    ``source_prompts``: ``manifest`` (default; the LAION caption and its word swap) or
    ``captioner`` (the official pix2pix-zero/OIG protocol: the BLIP caption of the image,
    target by word swap with the CLIP most-similar-word fallback of ``swap_clip``, e.g.
    ``ViT-B-32`` with ``swap_clip_pretrained=openai`` as OIG's ``make_target_prompt``).
    ``captioner``: a BLIP model id/folder, a mapping of
    :class:`~oig.data.prompts.Captioner` arguments or a Captioner.

    A URL that failed to download becomes an error sample with img2dataset's message; a
    corrupt or too-small file one with :func:`oig.image.load_image`'s; a URL not in the
    cache yet one saying to run ``oig-laion-download``.
    """

    name = "laion"

    def __init__(self, manifest: str, cache_dir: str, tasks: list[str] | None = None,
                 source_prompts: str = "manifest", captioner: Any = None, swap_clip: Any = None,
                 swap_clip_pretrained: str | None = None, limit: int | None = None, shard: int = 0,
                 num_shards: int = 1, name: str | None = None):
        super().__init__(limit=limit, shard=shard, num_shards=num_shards, name=name)
        self.manifest_path = Path(manifest).expanduser()
        self.cache_dir = Path(cache_dir).expanduser()
        if source_prompts not in ("manifest", "captioner"):
            raise ValueError(f"source_prompts must be 'manifest' or 'captioner', got {source_prompts!r}")
        self.source_prompts = source_prompts
        self.captioner = make_captioner(captioner)
        if source_prompts == "captioner" and self.captioner is None:
            raise ValueError("source_prompts='captioner' needs a captioner (e.g. Salesforce/blip-image-captioning-base)")
        self._swap_clip = LazyTextEncoder(swap_clip, swap_clip_pretrained)
        df = read_manifest(self.manifest_path)
        names = as_str_list(tasks, "tasks")
        if names is not None:
            unknown = sorted(set(names) - set(df["task"]))
            if unknown:
                raise ValueError(f"{self.manifest_path}: no tasks {unknown} in the manifest (has {sorted(set(df['task']))})")
            df = df[df["task"].isin(names)]
        self.tasks = names
        self._df = df.reset_index(drop=True)
        index = read_index(self.cache_dir)
        self._index = {r["url"]: r for r in index.to_dict("records")} if len(index) else {}
        if not self._index:
            log.warning("%s: no downloaded images yet; run oig-laion-download %s --cache-dir %s", self.cache_dir,
                        self.manifest_path, self.cache_dir)

    def _list(self) -> list[tuple[str, Any]]:
        return [(r["id"], r) for r in self._df.to_dict("records")]

    def _describe(self, r) -> dict[str, Any]:
        meta = {"url": r["url"], "caption": r.get("caption"), "source_word": r.get("source_word"),
                "target_word": r.get("target_word")}
        return {"source_prompt": r["source_prompt"], "target_prompt": r["target_prompt"],
                "instruction": r.get("instruction") or None, "task": r["task"], "meta": meta}

    def text_encoder(self):
        return self._swap_clip.get()

    def _load(self, sid: str, r) -> Sample:
        d = self._describe(r)
        e = self._index.get(r["url"])
        if e is None:
            raise SampleError(f"{r['url']}: not downloaded yet (run oig-laion-download {self.manifest_path} "
                              f"--cache-dir {self.cache_dir})")
        if e["status"] != "success":
            raise SampleError(f"{r['url']}: download failed ({e['status']}: {e.get('error') or 'no message'})")
        f = self.cache_dir / e["path"]
        img = load_image(f)
        if self.source_prompts == "captioner":
            src, tgt = r.get("source_word"), r.get("target_word")
            if not src or not tgt:
                raise SampleError(f"{self.manifest_path}: {sid} has no source_word/target_word for the word swap")
            caption = self.captioner(img)
            try:
                sw = swap_details(caption, src, tgt, text_encoder=self.text_encoder())
            except ValueError as err:
                raise SampleError(f"{f}: {err}") from None
            d["source_prompt"], d["target_prompt"] = caption, sw.prompt
            d["meta"]["swap"] = sw.method
        d["meta"]["file"] = str(f)
        return Sample(id=sid, image=img, **d)


# --------------------------------------------------------------------------------------
# console commands


def _setup_logging(verbose: bool):
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _none_or_float(s: str) -> float | None:
    return None if s.lower() in ("none", "null", "off", "") else float(s)


def manifest_parser(prog: str = "oig-laion-manifest") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Select LAION images for word-swap editing tasks from "
                                "metadata parquet files and write a manifest.")
    p.add_argument("metadata", nargs="+", help="LAION metadata parquet files (URL, TEXT, WIDTH, HEIGHT, ...)")
    p.add_argument("-o", "--out", required=True, help="output manifest (.parquet)")
    p.add_argument("--tasks", nargs="*", default=None,
                   help="task names (default: all pix2pix-zero tasks) or <src>2<tgt>")
    p.add_argument("--tasks-file", default=None, help="YAML/JSON list of {name, source, target, instruction}, "
                   "e.g. conf/tasks/pix2pix_zero.yaml")
    p.add_argument("-n", "--n-per-task", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-size", type=int, default=512, help="minimum shorter side in pixels (0: off)")
    p.add_argument("--min-aspect", type=_none_or_float, default=0.5, help="minimum width/height ('none': off)")
    p.add_argument("--max-aspect", type=_none_or_float, default=2.0, help="maximum width/height ('none': off)")
    p.add_argument("--max-punsafe", type=_none_or_float, default=0.5, help="keep punsafe < this ('none': off)")
    p.add_argument("--max-pwatermark", type=_none_or_float, default=0.8, help="keep pwatermark < this ('none': off)")
    p.add_argument("--keep-target", action="store_true", help="keep captions that also contain the target word")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main_manifest(argv: Sequence[str] | None = None) -> int:
    """``oig-laion-manifest``."""
    a = manifest_parser().parse_args(argv)
    _setup_logging(a.verbose)
    tasks: Any = a.tasks or None
    if a.tasks_file:
        try:
            tasks = load_tasks_file(a.tasks_file)
        except (OSError, ValueError) as e:
            raise SystemExit(f"oig-laion-manifest: error: {one_line(e)}") from None
        if a.tasks:
            unknown = set(a.tasks) - {t.name for t in tasks}
            if unknown:
                raise SystemExit(f"oig-laion-manifest: error: {a.tasks_file}: no tasks {sorted(unknown)}")
            tasks = [t for t in tasks if t.name in set(a.tasks)]
    try:
        m = build_manifest(a.metadata, tasks=tasks, n_per_task=a.n_per_task, seed=a.seed, min_size=a.min_size,
                           min_aspect=a.min_aspect, max_aspect=a.max_aspect, max_punsafe=a.max_punsafe,
                           max_pwatermark=a.max_pwatermark, exclude_target=not a.keep_target, out_path=a.out)
    except (OSError, ValueError, TypeError) as e:
        raise SystemExit(f"oig-laion-manifest: error: {one_line(e)}") from None
    for task, n in m.groupby("task", sort=False).size().items():
        log.info("%s: %d images", task, n)
    return 0


def download_parser(prog: str = "oig-laion-download") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Download a LAION task manifest's images with img2dataset "
                                "(resumable: only URLs not in the cache are fetched).")
    p.add_argument("manifest", help="manifest parquet from oig-laion-manifest")
    p.add_argument("--cache-dir", required=True, help="image cache folder (index.parquet + runs/)")
    p.add_argument("--tasks", nargs="*", default=None, help="only these tasks")
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--timeout", type=int, default=10, help="seconds per request")
    p.add_argument("--retries", type=int, default=0)
    p.add_argument("--retry-failed", action="store_true", help="fetch URLs that failed before again")
    p.add_argument("--resize-mode", default="no", help="img2dataset resize mode: no | keep_ratio | center_crop | border")
    p.add_argument("--image-size", type=int, default=512, help="target size for the resize modes other than 'no'")
    p.add_argument("--encode-format", default="jpg")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main_download(argv: Sequence[str] | None = None) -> int:
    """``oig-laion-download``."""
    a = download_parser().parse_args(argv)
    _setup_logging(a.verbose)
    try:
        c = download(a.manifest, a.cache_dir, tasks=a.tasks, thread_count=a.threads, processes_count=a.processes,
                     timeout=a.timeout, retries=a.retries, retry_failed=a.retry_failed, resize_mode=a.resize_mode,
                     image_size=a.image_size, encode_format=a.encode_format)
    except (OSError, ValueError) as e:
        raise SystemExit(f"oig-laion-download: error: {one_line(e)}") from None
    log.info("done: %s", ", ".join(f"{k} {v}" for k, v in c.items()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m oig.data.laion manifest|download ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m oig.data.laion", description="LAION task subsets: build a manifest "
                                "from metadata, then download its images ('<command> -h' for each command's help).")
    p.add_argument("command", choices=["manifest", "download"])
    a = p.parse_args(argv[:1])
    return {"manifest": main_manifest, "download": main_download}[a.command](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
