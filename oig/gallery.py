"""``gallery.html``: one self-contained page to browse every sample of a report (``oig-report --html``).

One table row per sample: its id, task and prompts, the source image, the exact target when the
dataset knows it, then each method's (and setting's) edit with the headline metrics of its preset
under the image (:data:`oig.report.HEADLINE`). The page needs no server and no network: open the file.

* **Sort** by the sample id, the task, or any headline metric, either of one method or the mean
  over the methods shown; ascending or descending (samples without a value go last).
* **Filter** by task (rows) and by method (columns, check boxes).
* **Enlarge**: click an image to see it full-window (click or Esc closes).

Images are embedded in the page (``data:`` URIs of the run folders' PNGs) or linked by paths
relative to the page (``images="link"``: the page then works as long as it stays next to the run
folders). ``images="auto"`` embeds them when their files add up to at most :data:`EMBED_LIMIT`
bytes and links them otherwise.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import os
import re
from pathlib import Path
from urllib.parse import quote

import pandas as pd

log = logging.getLogger("oig.gallery")

#: ``images="auto"`` embeds up to this many bytes of image files, links beyond
EMBED_LIMIT = 32 * 1024 * 1024
#: images narrower than this are drawn enlarged with hard pixel edges
THUMB_PX = 160

_CSS = """
body { font: 13px/1.35 system-ui, sans-serif; margin: 0; color: #222; background: #fafafa; }
header { position: sticky; top: 0; z-index: 2; background: #fff; border-bottom: 1px solid #ccc; padding: 8px 12px; }
h1 { font-size: 17px; margin: 0 0 4px; }
#controls { display: flex; flex-wrap: wrap; gap: 6px 16px; align-items: center; }
#method-filter { border: 0; padding: 0; margin: 0; display: flex; flex-wrap: wrap; gap: 2px 10px; }
table { border-collapse: collapse; margin: 8px 12px; }
th { font-weight: 600; padding: 4px; vertical-align: bottom; background: #fafafa; }
td { vertical-align: top; padding: 4px; border-top: 1px solid #e4e4e4; }
td.info { min-width: 210px; max-width: 260px; font-size: 12px; }
td.info .id { font-weight: 600; overflow-wrap: anywhere; }
figure { margin: 0; width: %(px)dpx; }
figure img { width: %(px)dpx; height: auto; display: block; cursor: zoom-in; background: #eee; }
img.small { image-rendering: pixelated; }
figcaption { font-size: 11px; color: #444; }
figcaption .m { display: flex; justify-content: space-between; gap: 6px; }
td.error { color: #a00; font-size: 12px; max-width: %(px)dpx; word-break: break-word; }
.hidden { display: none; }
#overlay { position: fixed; inset: 0; background: rgba(0,0,0,.85); display: none; z-index: 5;
           align-items: center; justify-content: center; flex-direction: column; cursor: zoom-out; }
#overlay.open { display: flex; }
#overlay img { max-width: 92vw; max-height: 86vh; min-width: min(60vw, 60vh); image-rendering: pixelated; }
#overlay div { color: #fff; margin-top: 8px; font-size: 14px; }
"""

_JS = r"""
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("gallery-data").textContent);
  var tbody = document.querySelector("#gallery tbody");
  var byKey = {};
  data.rows.forEach(function (r) { byKey[r.key] = r; });
  var sortKey = document.getElementById("sort-key");
  var sortDir = document.getElementById("sort-dir");
  var taskFilter = document.getElementById("task-filter");
  var boxes = Array.prototype.slice.call(document.querySelectorAll("#method-filter input"));

  function shownColumns() {
    return boxes.filter(function (b) { return b.checked; }).map(function (b) { return +b.dataset.col; });
  }
  function value(row, spec) {            // spec: "metric:<i>:<column index or 'mean'>"
    var p = spec.split(":"), i = +p[1], vals = [];
    var cols = p[2] === "mean" ? shownColumns() : [+p[2]];
    cols.forEach(function (c) { var v = row.values[c] ? row.values[c][i] : null; if (v !== null) vals.push(v); });
    if (!vals.length) return null;
    return vals.reduce(function (a, b) { return a + b; }, 0) / vals.length;
  }
  function compareText(a, b) { return a < b ? -1 : a > b ? 1 : 0; }
  function apply() {
    var spec = sortKey.value, desc = sortDir.value === "desc", task = taskFilter.value;
    var rows = Array.prototype.slice.call(tbody.rows);
    rows.sort(function (ra, rb) {
      var a = byKey[ra.dataset.key], b = byKey[rb.dataset.key], c;
      if (spec === "id") c = compareText(a.id, b.id);
      else if (spec === "task") c = compareText(a.task, b.task) || compareText(a.id, b.id);
      else {
        var va = value(a, spec), vb = value(b, spec);
        if (va === null || vb === null) return (va === null) - (vb === null) || compareText(a.id, b.id);
        c = va - vb;
        if (c === 0) return compareText(a.id, b.id);
      }
      return desc ? -c : c;
    });
    rows.forEach(function (r) {
      tbody.appendChild(r);
      r.classList.toggle("hidden", task !== "" && byKey[r.dataset.key].task !== task);
    });
    var shown = shownColumns();
    document.querySelectorAll("[data-col]").forEach(function (el) {
      if (el.tagName !== "INPUT") el.classList.toggle("hidden", shown.indexOf(+el.dataset.col) < 0);
    });
    var n = rows.filter(function (r) { return !r.classList.contains("hidden"); }).length;
    document.getElementById("count").textContent = n + " of " + rows.length + " samples";
  }
  [sortKey, sortDir, taskFilter].concat(boxes).forEach(function (el) { el.addEventListener("change", apply); });

  var overlay = document.getElementById("overlay");
  var big = overlay.querySelector("img"), caption = overlay.querySelector("div");
  document.querySelectorAll("#gallery img").forEach(function (img) {
    img.addEventListener("click", function () {
      big.src = img.src;
      caption.textContent = img.alt;
      overlay.classList.add("open");
    });
  });
  function close() { overlay.classList.remove("open"); }
  overlay.addEventListener("click", close);
  document.addEventListener("keydown", function (e) { if (e.key === "Escape") close(); });

  window.oigGallery = {
    apply: apply,
    order: function () {
      return Array.prototype.slice.call(tbody.rows).filter(function (r) { return !r.classList.contains("hidden"); })
        .map(function (r) { return byKey[r.dataset.key].id; });
    }
  };
  apply();
})();
"""


def _esc(x) -> str:
    return html.escape(str(x), quote=True)


def _number(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _fmt(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:.4g}"


def _short(label: str) -> str:
    """A caption label without its unit in parentheses ("background PSNR (dB)" -> "background PSNR")."""
    return re.sub(r"\s*\([^)]*\)$", "", label)


class _Images:
    """Turns image files into ``src`` attributes: ``data:`` URIs or paths relative to the page."""

    def __init__(self, page: Path, embed: bool):
        self.page_dir = page.parent.resolve()
        self.embed = embed
        self.sizes: dict[Path, tuple[int, int]] = {}

    def size(self, p: Path) -> tuple[int, int]:
        from PIL import Image

        if p not in self.sizes:
            with Image.open(p) as im:
                self.sizes[p] = im.size
        return self.sizes[p]

    def src(self, p: Path) -> str:
        if self.embed:
            mime = "image/png" if p.suffix.lower() == ".png" else "image/jpeg"
            return f"data:{mime};base64," + base64.b64encode(p.read_bytes()).decode("ascii")
        return quote(Path(os.path.relpath(p.resolve(), self.page_dir)).as_posix())

    def tag(self, p: Path, alt: str) -> str:
        w, _ = self.size(p)
        cls = ' class="small"' if w < THUMB_PX else ""
        return f'<img src="{self.src(p)}" alt="{_esc(alt)}"{cls}>'


def _image_path(run: str, sid: str, kind: str) -> Path | None:
    p = Path(run) / "images" / sid / f"{kind}.png"
    return p if p.exists() else None


def gallery_data(df: pd.DataFrame) -> dict:
    """What the page shows, without HTML: ``columns`` (one per method and setting, display order),
    ``metrics`` (``(column, label, scale, better)`` of the headline metrics of the presets present),
    and ``samples``: per (dataset, id), its task, prompts, source / target image paths and per column
    ``{"status", "error", "edit": path or None, "values": [scaled value or None per metric]}``."""
    from oig.report import _column_label, headline_columns, presets, settings_order

    cols = settings_order(df)
    preset = presets(df)
    metrics: list[tuple[str, str, float, str]] = []
    for p in dict.fromkeys(preset):
        for spec in headline_columns(df[preset == p], p):
            if spec[0] not in [m[0] for m in metrics]:
                metrics.append(spec)
    samples = []
    order = df.assign(_err=(df["status"] != "ok")).sort_values(["task", "id", "_err"], kind="stable")
    for (ds, sid), g in order.groupby(["dataset", "id"], sort=False):
        first = g.iloc[0]
        runs = list(dict.fromkeys(g["_run"]))
        src = next((p for p in (_image_path(r, sid, "source") for r in runs) if p), None)
        tgt = next((p for p in (_image_path(r, sid, "target") for r in runs) if p), None)
        cells = []
        for m, s in cols:
            r = g[(g["method"] == m) & (g["setting"] == s)]
            if not len(r):
                cells.append(None)
                continue
            r = r.iloc[0]
            ok = r["status"] == "ok"
            cells.append({"status": r["status"], "error": "" if ok else str(r.get("error", "") or ""),
                          "edit": _image_path(r["_run"], sid, "edit") if ok else None,
                          "values": [(_number(r[c]) * sc if _number(r[c]) is not None else None)
                                     if ok and c in r.index else None for c, _, sc, _ in metrics]})
        samples.append({"dataset": ds, "id": sid, "task": str(first["task"]),
                        "source_prompt": str(first.get("source_prompt", "") or ""),
                        "target_prompt": str(first.get("target_prompt", "") or ""),
                        "source": src, "target": tgt, "cells": cells})
    return {"columns": [{"method": m, "setting": s, "label": _column_label(m, s).replace("\n", " ")} for m, s in cols],
            "metrics": metrics, "samples": samples}


def render_gallery(data: dict, page: Path, embed: bool, title: str = "oig gallery") -> str:
    """The HTML text of the page for :func:`gallery_data`'s ``data``, written to ``page`` (image paths
    are relative to its folder when not embedded)."""
    from oig.report import _arrow_of

    imgs = _Images(page, embed)
    cols, metrics, samples = data["columns"], data["metrics"], data["samples"]
    has_target = any(s["target"] is not None for s in samples)
    tasks = sorted({s["task"] for s in samples if s["task"]})

    opts = ['<option value="task">task, then sample id</option>', '<option value="id">sample id</option>']
    for i, (c, label, _, better) in enumerate(metrics):
        opts.append(f'<optgroup label="{_esc(label + _arrow_of(better))}">')
        opts.append(f'<option value="metric:{i}:mean">{_esc(label)}: mean over the methods shown</option>')
        opts += [f'<option value="metric:{i}:{j}">{_esc(label)}: {_esc(col["label"])}</option>'
                 for j, col in enumerate(cols)]
        opts.append("</optgroup>")
    boxes = [f'<label><input type="checkbox" data-col="{j}" checked> {_esc(col["label"])}</label>'
             for j, col in enumerate(cols)]
    controls = (
        '<div id="controls">'
        f'<label>Sort by <select id="sort-key">{"".join(opts)}</select></label>'
        '<select id="sort-dir" aria-label="direction"><option value="asc">ascending</option>'
        '<option value="desc">descending</option></select>'
        '<label>Task <select id="task-filter"><option value="">all tasks</option>'
        + "".join(f'<option value="{_esc(t)}">{_esc(t)}</option>' for t in tasks) + "</select></label>"
        f'<fieldset id="method-filter"><legend class="hidden">methods</legend>{"".join(boxes)}</fieldset>'
        '<span id="count"></span></div>')
    legend = ", ".join(f"{label}{_arrow_of(b)} = <code>{_esc(c)}</code>" + (f" ×{sc:g}" if sc != 1 else "")
                       for c, label, sc, b in metrics)

    head = ["<th>sample</th>", "<th>source</th>"] + (["<th>target</th>"] if has_target else [])
    head += [f'<th data-col="{j}">{_esc(col["label"])}</th>' for j, col in enumerate(cols)]
    body, rows_json = [], []
    for k, s in enumerate(samples):
        info = (f'<td class="info"><div class="id">{_esc(s["id"])}</div><div>{_esc(s["task"])}</div>'
                f'<div>{_esc(s["source_prompt"])}</div><div>→ {_esc(s["target_prompt"])}</div></td>')
        tds = [info, _figure(imgs, s["source"], f'{s["id"]}: source', "source")]
        if has_target:
            tds.append(_figure(imgs, s["target"], f'{s["id"]}: target', "target"))
        values = []
        for j, cell in enumerate(s["cells"]):
            label = cols[j]["label"]
            if cell is None:
                tds.append(f'<td data-col="{j}"></td>')
                values.append(None)
            elif cell["status"] != "ok":
                tds.append(f'<td class="error" data-col="{j}">error: {_esc(cell["error"])}</td>')
                values.append(None)
            else:
                caption = "".join(f'<div class="m"><span>{_esc(_short(lab))}</span><span>{_fmt(v)}</span></div>'
                                  for (_, lab, _, _), v in zip(metrics, cell["values"]))
                tds.append(_figure(imgs, cell["edit"], f'{s["id"]}: {label}', caption, col=j, raw_caption=True))
                values.append(cell["values"])
        body.append(f'<tr data-key="{k}">' + "".join(tds) + "</tr>")
        rows_json.append({"key": k, "id": s["id"], "task": s["task"], "values": values})

    blob = json.dumps({"metrics": [m[0] for m in metrics], "rows": rows_json}, allow_nan=False)
    blob = blob.replace("</", "<\\/")
    css = _CSS % {"px": THUMB_PX}
    n_img = sum(1 for s in samples for c in s["cells"] if c and c["edit"] is not None)
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{_esc(title)}</title><style>{css}</style></head><body>\n"
        f"<header><h1>{_esc(title)}</h1><div>{len(samples)} samples, {len(cols)} method column(s), {n_img} edits; "
        f"under each edit: {legend}. Click an image to enlarge.</div>{controls}</header>\n"
        f'<table id="gallery"><thead><tr>{"".join(head)}</tr></thead><tbody>\n' + "\n".join(body) +
        "\n</tbody></table>\n"
        '<div id="overlay" role="dialog"><img alt=""><div></div></div>\n'
        f'<script type="application/json" id="gallery-data">{blob}</script>\n'
        f"<script>{_JS}</script>\n</body></html>\n")


def _figure(imgs: _Images, path: Path | None, alt: str, caption: str, col: int | None = None,
            raw_caption: bool = False) -> str:
    attr = f' data-col="{col}"' if col is not None else ""
    cap = caption if raw_caption else _esc(caption)
    if path is None:
        return f"<td{attr}><figure><figcaption>{cap} (no image)</figcaption></figure></td>"
    return f"<td{attr}><figure>{imgs.tag(path, alt)}<figcaption>{cap}</figcaption></figure></td>"


def write_gallery(df: pd.DataFrame, page: str | Path, images: str = "auto", title: str = "oig gallery") -> Path:
    """Write ``page`` (usually ``<report>/gallery.html``) for the merged report rows ``df``
    (:func:`oig.report.load_results`); ``images``: ``embed``, ``link`` or ``auto`` (module docstring)."""
    if images not in ("auto", "embed", "link"):
        raise ValueError(f"oig-report: --html-images {images!r}: use auto, embed or link")
    page = Path(page)
    page.parent.mkdir(parents=True, exist_ok=True)
    data = gallery_data(df)
    files = {p for s in data["samples"] for p in [s["source"], s["target"]] +
             [c["edit"] for c in s["cells"] if c] if p is not None}
    total = sum(p.stat().st_size for p in files)
    embed = images == "embed" or (images == "auto" and total <= EMBED_LIMIT)
    if images == "auto" and not embed:
        log.info("gallery: %d images, %.0f MB: linked by relative paths (keep %s next to the run folders; "
                 "--html-images embed forces one file)", len(files), total / 2**20, page.name)
    page.write_text(render_gallery(data, page, embed, title), encoding="utf-8")
    log.info("gallery: %s (%d samples, %d images %s)", page, len(data["samples"]), len(files),
             "embedded" if embed else "linked")
    return page
