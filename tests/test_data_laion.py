"""LAION task subsets for real: metadata -> manifest (CLI) -> img2dataset download from a local
HTTP server -> dataset, with unsafe/small/substring rows filtered and bad URLs as error rows."""

import http.server
import io
import os
import socket
import subprocess
import sys
import threading
from collections import Counter

import pandas as pd
import pytest
from PIL import Image

from oig.data.laion import LaionTasks, build_manifest, main_download, main_manifest, read_index


def _jpeg(size, color):
    b = io.BytesIO()
    Image.new("RGB", size, color).save(b, "JPEG", quality=95)
    return b.getvalue()


def _png(size, color):
    b = io.BytesIO()
    Image.new("RGB", size, color).save(b, "PNG")
    return b.getvalue()


FILES = {
    "/cat1.jpg": _jpeg((64, 48), (200, 40, 40)),
    "/cat2.png": _png((40, 40), (40, 200, 40)),
    "/corrupt.jpg": b"\xff\xd8\xff\xe0 this is not really a jpeg" * 4,
    "/tiny.jpg": _jpeg((8, 8), (0, 0, 255)),
    "/dog1.jpg": _jpeg((50, 50), (90, 90, 90)),
    "/horse1.jpg": _jpeg((48, 64), (120, 80, 40)),
}


@pytest.fixture(scope="module")
def server():
    hits = Counter()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits[self.path] += 1
            data = FILES.get(self.path)
            if data is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png" if self.path.endswith(".png") else "image/jpeg")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", hits
    srv.shutdown()
    srv.server_close()


def _closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def metadata(tmp_path_factory, server):
    base, _ = server
    d = tmp_path_factory.mktemp("laion_meta")
    dead = f"http://127.0.0.1:{_closed_port()}/gone.jpg"
    # LAION-5B style columns
    rows = [
        (f"{base}/cat1.jpg", "A cat on a sofa", 800, 600, 0.01, 0.1),
        (f"{base}/cat2.png", "two Cats sleeping.", 640, 640, 0.02, 0.2),
        (f"{base}/corrupt.jpg", "my cat photo", 700, 700, 0.01, 0.1),
        (f"{base}/tiny.jpg", "cat portrait", 600, 600, 0.01, 0.1),
        (dead, "a cat in a box", 600, 600, 0.01, 0.1),
        (f"{base}/unsafe.jpg", "a cat", 600, 600, 0.93, 0.1),  # unsafe
        (f"{base}/nan_unsafe.jpg", "a cat", 600, 600, float("nan"), 0.1),  # unknown safety
        (f"{base}/small.jpg", "a cat", 100, 100, 0.01, 0.1),  # too small
        (f"{base}/wide.jpg", "a cat panorama", 2400, 600, 0.01, 0.1),  # aspect 4
        (f"{base}/watermark.jpg", "a cat", 600, 600, 0.01, 0.95),  # watermarked
        (f"{base}/catalog.jpg", "furniture catalog, bobcat edition", 600, 600, 0.01, 0.1),  # substrings only
        (f"{base}/both.jpg", "a cat and a dog", 600, 600, 0.01, 0.1),  # ambiguous for cat->dog and dog->cat
        (f"{base}/dog1.jpg", "A dog running", 600, 800, 0.01, 0.1),
    ]
    pd.DataFrame(rows, columns=["URL", "TEXT", "WIDTH", "HEIGHT", "punsafe", "pwatermark"]).to_parquet(d / "part-0.parquet")
    # LAION-400M style: lower-case names and an NSFW tag; a duplicate URL with another caption
    rows2 = [
        (f"{base}/horse1.jpg", "a horse in a field", 600, 600, "UNLIKELY"),
        (f"{base}/horse_nsfw.jpg", "a horse", 600, 600, "NSFW"),
        (f"{base}/cat1.jpg", "cat again", 800, 600, "UNLIKELY"),
    ]
    pd.DataFrame(rows2, columns=["url", "caption", "WIDTH", "HEIGHT", "NSFW"]).to_parquet(d / "part-1.parquet")
    return [d / "part-0.parquet", d / "part-1.parquet"], base, dead


def test_manifest_filters_and_is_deterministic(metadata, tmp_path):
    files, base, dead = metadata
    out = tmp_path / "m.parquet"
    assert main_manifest([str(f) for f in files] + ["-o", str(out), "--tasks", "cat2dog", "dog2cat", "horse2zebra",
                                                    "-n", "10", "--min-size", "512"]) == 0
    m = pd.read_parquet(out)
    assert list(m.columns)[:9] == ["id", "task", "url", "caption", "source_prompt", "target_prompt", "instruction",
                                   "width", "height"]
    by_task = {t: set(g["url"]) for t, g in m.groupby("task")}
    assert by_task["cat2dog"] == {f"{base}/cat1.jpg", f"{base}/cat2.png", f"{base}/corrupt.jpg", f"{base}/tiny.jpg", dead}
    assert by_task["dog2cat"] == {f"{base}/dog1.jpg"}
    assert by_task["horse2zebra"] == {f"{base}/horse1.jpg"}
    assert m["id"].is_unique and all(i.startswith(t + "_") for i, t in zip(m["id"], m["task"]))
    row = m.set_index("url").loc[f"{base}/cat2.png"]
    assert row["source_prompt"] == "two Cats sleeping." and row["target_prompt"] == "two Dogs sleeping."
    assert row["instruction"] == "turn the cat into a dog" and row["width"] == 640
    assert m.set_index("url").loc[f"{base}/horse1.jpg", "target_prompt"] == "a zebra in a field"

    # the shipped task table through --tasks-file
    from pathlib import Path

    table = Path(__file__).resolve().parents[1] / "conf" / "tasks" / "pix2pix_zero.yaml"
    main_manifest([str(f) for f in files] + ["-o", str(tmp_path / "t.parquet"), "--tasks-file", str(table),
                                             "--tasks", "dog2cat", "cat2cat_glasses"])
    t = pd.read_parquet(tmp_path / "t.parquet").set_index("url")
    assert set(t["task"]) == {"dog2cat", "cat2cat_glasses"}
    assert t.loc[f"{base}/cat2.png", "target_prompt"] == "two Cats wearing glasses sleeping."
    with pytest.raises(SystemExit, match="no tasks"):
        main_manifest([str(files[0]), "-o", str(tmp_path / "u.parquet"), "--tasks-file", str(table), "--tasks", "x2y"])

    # n per task: a seeded draw that does not depend on the order of the files
    a = build_manifest(files, tasks=["cat2dog"], n_per_task=2, seed=3)
    b = build_manifest(files[::-1], tasks=["cat2dog"], n_per_task=2, seed=3)
    c = [set(build_manifest(files, tasks=["cat2dog"], n_per_task=2, seed=s)["url"]) for s in range(6)]
    assert list(a["id"]) == list(b["id"]) and len(a) == 2
    assert len({frozenset(x) for x in c}) > 1  # the seed matters

    # python -m entry point, and a clear error for files without size columns
    nosize = tmp_path / "nosize.parquet"
    pd.DataFrame({"url": [f"{base}/cat1.jpg"], "caption": ["a cat"]}).to_parquet(nosize)
    r = subprocess.run([sys.executable, "-m", "oig.data.laion", "manifest", str(nosize), "-o", str(tmp_path / "x.parquet")],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 1 and "oig-laion-manifest: error:" in r.stderr and "no WIDTH/HEIGHT columns" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "oig.data.laion", "manifest", str(nosize), "-o", str(tmp_path / "x.parquet"),
                        "--min-size", "0", "--min-aspect", "none", "--max-aspect", "none", "--tasks", "cat2dog"],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert pd.read_parquet(tmp_path / "x.parquet")["target_prompt"].tolist() == ["a dog"]


def test_download_twice_and_read_back(metadata, server, tmp_path):
    files, base, dead = metadata
    _, hits = server
    man = tmp_path / "manifest.parquet"
    main_manifest([str(f) for f in files] + ["-o", str(man), "--tasks", "cat2dog", "dog2cat", "horse2zebra"])
    cache = tmp_path / "cache"
    before = Counter(hits)
    assert main_download([str(man), "--cache-dir", str(cache), "--threads", "4", "--timeout", "5"]) == 0
    fetched = hits - before
    assert fetched == Counter({p: 1 for p in FILES})  # each served URL once; filtered rows never
    idx = read_index(cache).set_index("url")
    assert idx.loc[f"{base}/cat1.jpg", "status"] == "success"
    assert idx.loc[f"{base}/corrupt.jpg", "status"] == "failed_to_resize"
    assert idx.loc[dead, "status"] == "failed_to_download"
    assert set(idx["id"]) <= set(pd.read_parquet(man)["id"])  # mapped back through the saved id column

    # resumable: a second run requests nothing
    snapshot = Counter(hits)
    assert main_download([str(man), "--cache-dir", str(cache)]) == 0
    assert hits == snapshot
    assert len(list((cache / "runs").glob("run_*"))) == 1

    ds = LaionTasks(str(man), str(cache))
    out = {s.meta["url"]: s for s in ds}
    assert len(out) == 7 and ds.name == "laion"
    ok = out[f"{base}/cat1.jpg"]
    assert ok.error is None and ok.image.size == (64, 48) and ok.task == "cat2dog"
    assert ok.source_prompt == "A cat on a sofa" and ok.target_prompt == "A dog on a sofa"
    assert out[f"{base}/cat2.png"].image.size == (40, 40)
    assert out[f"{base}/horse1.jpg"].error is None and out[f"{base}/horse1.jpg"].target_prompt == "a zebra in a field"
    bad = out[f"{base}/corrupt.jpg"]
    assert bad.image is None and "corrupt.jpg: download failed" in bad.error and "decoding" in bad.error.lower()
    assert bad.target_prompt == "my dog photo"  # error rows keep their prompts
    assert "too small (8x8" in out[f"{base}/tiny.jpg"].error
    assert out[dead].image is None and "gone.jpg: download failed (failed_to_download" in out[dead].error
    assert "refused" in out[dead].error.lower() or "urlopen" in out[dead].error.lower()

    # task filter + sharding; captioner prompts (a stub captioner; the word swap needs the word or a CLIP)
    assert len(LaionTasks(str(man), str(cache), tasks=["cat2dog"])) == 5
    assert len(LaionTasks(str(man), str(cache), num_shards=2, shard=1)) == 3
    with pytest.raises(ValueError, match="no tasks"):
        LaionTasks(str(man), str(cache), tasks=["zebra2horse"])
    cap = LaionTasks(str(man), str(cache), tasks=["cat2dog"], source_prompts="captioner", captioner=lambda im: "a cat on a bed")
    s = next(s for s in cap if s.error is None)
    assert s.source_prompt == "a cat on a bed" and s.target_prompt == "a dog on a bed" and s.meta["swap"] == "exact"
    kitten = LaionTasks(str(man), str(cache), tasks=["cat2dog"], source_prompts="captioner", captioner=lambda im: "a kitten")
    s = next(s for s in kitten if s.meta["url"] == f"{base}/cat1.jpg")
    assert s.image is None and "'cat' does not occur" in s.error and ".jpg" in s.error

    # a file deleted from the cache is fetched again; failures only with --retry-failed
    gone = cache / idx.loc[f"{base}/dog1.jpg", "path"]
    gone.unlink()
    snapshot = Counter(hits)
    assert main_download([str(man), "--cache-dir", str(cache), "--retry-failed", "--tasks", "dog2cat", "cat2dog"]) == 0
    assert hits - snapshot == Counter({"/dog1.jpg": 1, "/corrupt.jpg": 1})
    assert next(s for s in LaionTasks(str(man), str(cache), tasks=["dog2cat"])).error is None
