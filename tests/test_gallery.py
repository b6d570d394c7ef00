"""``oig-report --html``: the gallery page opened in a real headless browser (Debian's ``chromium``):
every image loads, sorting reorders the rows, the task and method filters hide rows and columns,
a click enlarges; a screenshot is saved in the test's folder. Also the grid image's labels
(``oig.image.make_grid``)."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oig import report
from oig.gallery import gallery_data, write_gallery
from oig.image import make_grid

TASKS = ("color_change", "shape_swap")
PER_TASK = 3
METHODS = ("ddim_word_swap", "sdedit")
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _psnr(method: str, t: int, j: int) -> float:
    """Distinct background PSNR per (method, sample): sdedit's order differs from the ids'."""
    return 20.0 + 3 * t + j if method == "ddim_word_swap" else 30.0 - 4 * j - t


def _png(path: Path, colour: tuple[int, int, int], size: int = 64):
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.zeros((size, size, 3), np.uint8)
    a[:] = colour
    a[size // 4: size // 2, size // 4: size // 2] = 255 - np.array(colour, np.uint8)
    Image.fromarray(a).save(path)


@pytest.fixture
def runs(tmp_path) -> Path:
    """Two toy-world run folders with images; sdedit's last shape_swap sample is an error row."""
    root = tmp_path / "runs"
    for k, m in enumerate(METHODS):
        run = root / f"{k}_{m}"
        (run / "rows").mkdir(parents=True)
        for t, task in enumerate(TASKS):
            for j in range(PER_TASK):
                sid = f"toy_{task}_{j:04d}"
                row = {"id": sid, "task": task, "method": m, "model": "toy", "dataset": "toyworld", "seed": 0,
                       "status": "ok", "error": None, "source_prompt": f"a red circle {j} <b>",
                       "target_prompt": "a red square & more", "toy_edit_success": float(j % 2),
                       "toy_attrs_kept": 1.0, "toy_structure_kept": 0.0, "toy_bg_psnr": _psnr(m, t, j),
                       "clip_acc": 1.0, "time_total": 0.25 + k}
                if m == "sdedit" and task == "shape_swap" and j == PER_TASK - 1:
                    row = {k2: row[k2] for k2 in ("id", "task", "method", "model", "dataset", "seed")}
                    row.update(status="error", error="EditError: boom")
                else:
                    _png(run / "images" / sid / "edit.png", (40 * t + 20, 60 * j, 100 + 50 * k))
                _png(run / "images" / sid / "source.png", (200, 10 * j, 30 * t))
                _png(run / "images" / sid / "target.png", (10 * j, 200, 30 * t))
                (run / "rows" / f"{sid}.json").write_text(json.dumps(row))
    return root


def _expected_order(method: str, desc: bool) -> list[str]:
    vals = {f"toy_{task}_{j:04d}": _psnr(method, t, j) for t, task in enumerate(TASKS) for j in range(PER_TASK)}
    if method == "sdedit":
        vals.pop(f"toy_shape_swap_{PER_TASK - 1:04d}")  # error row: no value, sorted last
    order = sorted(vals, key=lambda i: (-vals[i] if desc else vals[i], i))
    return order + sorted(set(f"toy_{task}_{j:04d}" for task in TASKS for j in range(PER_TASK)) - set(vals))


def _browser() -> str:
    for b in BROWSERS:
        exe = shutil.which(b)
        if exe:
            return exe
    pytest.fail("no headless browser found (looked for: " + ", ".join(BROWSERS) + "): the gallery test needs "
                "Debian's chromium. `.ci/run` installs it (apt-get install chromium); for `make test` on your "
                "machine: `sudo apt-get install chromium`.")


def _chromium(exe: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           "--hide-scrollbars", f"--user-data-dir={profile}", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, (cmd, p.stdout[-2000:], p.stderr[-3000:])
    return p


# drives the page through its own controls after everything has loaded, writes the findings into the DOM
PROBE = r"""
<script>
window.addEventListener("load", function () {
  var out = {}, $ = function (s) { return document.querySelector(s); };
  function change(el, v) { if (typeof v === "boolean") el.checked = v; else el.value = v;
                           el.dispatchEvent(new Event("change")); }
  var imgs = Array.prototype.slice.call(document.querySelectorAll("#gallery img"));
  out.images = imgs.length;
  out.broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).map(function (i) { return i.alt; });
  out.initial = oigGallery.order();
  change($("#sort-dir"), "desc"); change($("#sort-key"), "metric:3:1");
  out.sdedit_desc = oigGallery.order();
  change($("#sort-dir"), "asc");
  out.sdedit_asc = oigGallery.order();
  change($("#sort-key"), "metric:3:0");
  out.ddim_asc = oigGallery.order();
  change($("#sort-key"), "metric:3:mean");
  out.mean_asc = oigGallery.order();
  change($("#task-filter"), "color_change");
  out.filtered = oigGallery.order();
  out.count = $("#count").textContent;
  change($("#task-filter"), "");
  change($('#method-filter input[data-col="0"]'), false);
  out.hidden_col0 = document.querySelectorAll('#gallery .hidden[data-col="0"]').length;
  out.shown_col1 = document.querySelectorAll('#gallery [data-col="1"]:not(.hidden)').length;
  out.mean_without_col0 = (change($("#sort-key"), "metric:3:mean"), oigGallery.order());
  var img = $('#gallery td[data-col="1"] img');
  img.click();
  out.overlay_open = $("#overlay").classList.contains("open");
  out.overlay_src_same = $("#overlay img").src === img.src;
  out.overlay_caption = $("#overlay div").textContent;
  $("#overlay").click();
  out.overlay_closed = !$("#overlay").classList.contains("open");
  var pre = document.createElement("pre"); pre.id = "probe"; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
"""


def _probe(exe: str, page: Path, tmp: Path) -> dict:
    probed = page.with_name("probe_" + page.name)
    probed.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    p = _chromium(exe, tmp / "profile_probe", "--virtual-time-budget=10000", "--dump-dom", probed.as_uri())
    m = re.search(r'<pre id="probe">(.*?)</pre>', p.stdout, re.S)
    assert m, "the probe script did not run: " + p.stdout[-2000:] + p.stderr[-2000:]
    return json.loads(html.unescape(m.group(1)))


def test_gallery_in_a_headless_browser(runs, tmp_path):
    exe = _browser()
    out = tmp_path / "report"
    assert report.main([str(runs), "--out", str(out), "--html"]) == 0
    page = out / "gallery.html"
    text = page.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text  # no network
    n_images = len(TASKS) * PER_TASK * (2 + len(METHODS)) - 1  # source, target, edits; one error row
    assert text.count("<img src=\"data:image/png;base64,") == n_images  # embedded: one self-contained file
    assert "a red circle 0 &lt;b&gt;" in text and "error: EditError: boom" in text  # escaped text, error cell

    got = _probe(exe, page, tmp_path)
    assert got["images"] == n_images and got["broken"] == [], got["broken"]
    ids = [f"toy_{t}_{j:04d}" for t in TASKS for j in range(PER_TASK)]
    assert got["initial"] == ids  # task, then id
    assert got["sdedit_desc"] == _expected_order("sdedit", desc=True) != got["initial"]
    assert got["sdedit_asc"] == _expected_order("sdedit", desc=False)
    assert got["ddim_asc"] == _expected_order("ddim_word_swap", desc=False)
    means = {i: np.mean([_psnr(m, TASKS.index(i[4:-5]), int(i[-4:])) for m in METHODS
                         if not (m == "sdedit" and i == f"toy_shape_swap_{PER_TASK - 1:04d}")]) for i in ids}
    assert got["mean_asc"] == sorted(ids, key=lambda i: (means[i], i))
    assert got["filtered"] == [i for i in got["mean_asc"] if "color_change" in i] and got["count"] == f"{PER_TASK} of {len(ids)} samples"
    assert got["hidden_col0"] == len(ids) + 1  # every row's cell and the header
    assert got["shown_col1"] == len(ids) + 1
    assert got["mean_without_col0"] == _expected_order("sdedit", desc=False)  # the mean over the shown method only
    assert got["overlay_open"] and got["overlay_src_same"] and got["overlay_closed"]
    assert got["overlay_caption"] == f"{got['mean_without_col0'][0]}: sdedit"

    shot = tmp_path / "gallery_screenshot.png"
    _chromium(exe, tmp_path / "profile_shot", "--window-size=1280,900", f"--screenshot={shot}", page.as_uri())
    with Image.open(shot) as im:
        a = np.asarray(im.convert("RGB"))
    assert a.shape == (900, 1280, 3) and a.std() > 10  # a page was drawn, not a blank window

    # linked images (relative paths) load as well
    linked = write_gallery(report.load_results([runs]), tmp_path / "elsewhere" / "linked.html", images="link")
    ltext = linked.read_text(encoding="utf-8")
    assert "data:image" not in ltext and 'src="../runs/0_ddim_word_swap/images/' in ltext
    got = _probe(exe, linked, tmp_path)
    assert got["images"] == n_images and got["broken"] == []


def test_gallery_data_and_options(runs):
    df = report.load_results([runs])
    data = gallery_data(df)
    assert [c["label"] for c in data["columns"]] == list(METHODS)
    assert [m[0] for m in data["metrics"]] == ["toy_edit_success", "toy_attrs_kept", "toy_structure_kept",
                                               "toy_bg_psnr", "clip_acc", "time_total"]
    s = next(x for x in data["samples"] if x["id"] == "toy_color_change_0001")
    assert s["cells"][1]["values"][3] == _psnr("sdedit", 0, 1) and s["target"].name == "target.png"
    err = next(x for x in data["samples"] if x["id"] == f"toy_shape_swap_{PER_TASK - 1:04d}")
    assert err["cells"][1]["status"] == "error" and err["cells"][1]["edit"] is None
    with pytest.raises(ValueError, match="--html-images 'png': use auto, embed or link"):
        write_gallery(df, runs / "g.html", images="png")


def test_make_grid_labels_are_not_clipped():
    ims = [[Image.new("RGB", (64, 64), c) for c in ((200, 0, 0), (0, 200, 0), (0, 0, 200))] for _ in range(2)]
    labels = ["source", "reconstruction", "a very long column label that cannot fit"]
    rows = ["toy_appearance_change_0000", "s1"]
    g = np.asarray(make_grid(ims, labels=labels, row_labels=rows))
    white = np.all(g == 255, axis=-1)
    assert white[:, 0].all() and white[0, :].all() and white[:, -1].all()  # nothing touches the edges
    left = next(x for x in range(g.shape[1]) if np.all(g[g.shape[0] // 2, x] == (200, 0, 0)))
    assert left > 100 and not white[:, 2:left - 2].all()  # a margin as wide as the row label, with its text
    top = next(y for y in range(g.shape[0]) if np.all(g[y, left + 5] == (200, 0, 0)))
    assert top > 8 and not white[:top - 1, left:left + 64].all()  # header text above the first column
    assert not white[:top - 1, left + 66:left + 130].all()  # "reconstruction" is drawn (shrunk to fit)
    plain = make_grid(ims)
    assert plain.size == (3 * 66 + 2, 2 * 66 + 2)  # no labels: no margins
