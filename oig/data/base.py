"""The dataset interface every benchmark implements.

A dataset is a deterministic list of *entries* (a sample id plus whatever the subclass needs
to build the sample). The base class owns what every dataset shares:

* **ids** — :func:`sanitize_id` makes every id filesystem-safe (only ``A-Z a-z 0-9 . _ -``,
  never a path separator, never ``..``, no leading dot, at most 120 characters, long ids
  keep a hash suffix); ids that collide after sanitising get ``-2``, ``-3``, ... in list order.
* **sharding and limit** — entry ``i`` of the full list goes to shard ``i % num_shards``;
  ``limit`` then keeps the first ``limit`` entries *of that shard*. So ``num_shards=4,
  limit=10`` runs at most 40 samples over four jobs, and concatenating the shards in
  order ``i % num_shards`` gives back the full list.
* **errors** — a sample that cannot be read (missing, corrupt or too small file, bad
  annotation) is yielded as ``Sample(image=None, error="<file>: <reason>")`` instead of
  raising, so a run writes an error row and goes on. Configuration errors (missing model
  weights, an offline captioner) still raise: they would fail every sample alike.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from oig.image import ImageError
from oig.types import Sample

log = logging.getLogger(__name__)

MAX_ID_LEN = 120
# what counts as "this sample could not be read" (ImageError is a ValueError)
READ_ERRORS = (OSError, ValueError, EOFError, KeyError, IndexError)


class SampleError(ValueError):
    """A sample that cannot be used; the message already names the file and the reason."""


def sanitize_id(raw: Any, max_len: int = MAX_ID_LEN) -> str:
    """A filesystem-safe id: runs of other characters become ``_``, ``..`` is broken up,
    leading/trailing dots and underscores are stripped, over-long ids are cut and get an
    8-character hash of the raw id."""
    raw = str(raw)
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", raw)
    s = re.sub(r"\.{2,}", "_", s)
    s = s.strip("._") or "_"
    if len(s) > max_len or (s != raw and len(s) > max_len - 9):
        s = s[: max_len - 9].rstrip("._") + "_" + hashlib.sha1(raw.encode()).hexdigest()[:8]
    return s


def one_line(e: BaseException | str) -> str:
    msg = str(e) if isinstance(e, str) else (str(e) or type(e).__name__)
    return " ".join(msg.split())


def plain(x: Any) -> Any:
    """OmegaConf containers (what Hydra passes) -> plain dicts/lists; anything else unchanged."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(x, (DictConfig, ListConfig)):
            return OmegaConf.to_container(x, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return x


def as_str_list(x: Any, what: str) -> list[str] | None:
    x = plain(x)
    if x is None:
        return None
    if isinstance(x, (str, int)):
        return [str(x)]
    if isinstance(x, Sequence):
        return [str(v) for v in x]
    raise TypeError(f"{what} must be a list of strings, got {type(x).__name__}")


def load_mask(path: str | Path) -> np.ndarray:
    """A mask image as a boolean HxW array (True where the grey value is > 127), or
    :class:`ImageError` naming the file."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: mask file not found")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "PA") and im.getchannel("A").getextrema()[0] < 255:
                im = im.getchannel("A")  # a transparent cut-out: opaque = edit region
            a = np.asarray(im.convert("L"))
    except UnidentifiedImageError:
        raise ImageError(f"{path}: mask is not an image or an unsupported format") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path}: corrupt or truncated mask image ({e})") from None
    return a > 127


def fit_mask(mask: np.ndarray | None, size: tuple[int, int], source: str) -> np.ndarray | None:
    """Resize a mask (nearest) to an image ``size`` = (w, h), warning when it had to."""
    if mask is None:
        return None
    h, w = mask.shape[:2]
    if (w, h) == tuple(size):
        return mask
    log.warning("%s: mask is %dx%d but the image is %dx%d; resizing the mask (nearest)", source, w, h, *size)
    m = Image.fromarray(mask.astype(np.uint8) * 255).resize(tuple(size), Image.NEAREST)
    return np.asarray(m) > 127


class EditDataset:
    """Base class: subclasses implement :meth:`_list` and :meth:`_load` (and optionally
    :meth:`_describe` so error rows keep their prompts and task).

    ``limit`` (None = all), ``shard`` and ``num_shards`` select a deterministic subset:
    entry ``i`` goes to shard ``i % num_shards``, then the first ``limit`` of that shard.
    """

    name: str = "dataset"

    def __init__(self, limit: int | None = None, shard: int = 0, num_shards: int = 1, name: str | None = None):
        if limit is not None:
            limit = int(limit)
            if limit < 0:
                raise ValueError(f"limit must be >= 0 or None, got {limit}")
        shard, num_shards = int(shard), int(num_shards)
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard must be in [0, {num_shards}), got {shard}")
        self.limit = limit
        self.shard = shard
        self.num_shards = num_shards
        if name is not None:
            self.name = str(name)
        self._entries: list[tuple[str, Any]] | None = None
        self._full: list[tuple[str, Any]] | None = None

    # ------------------------------------------------------------------ subclass API
    def _list(self) -> list[tuple[str, Any]]:
        """The full, ordered list of ``(raw_id, data)`` entries (before sharding)."""
        raise NotImplementedError

    def _load(self, sid: str, data: Any) -> Sample:
        """Build the sample; may raise a reading error (turned into an error sample)."""
        raise NotImplementedError

    def _describe(self, data: Any) -> dict[str, Any]:
        """Sample fields known without reading the file (prompts, task, meta) for error rows."""
        return {}

    # ------------------------------------------------------------------ public
    def all_ids(self) -> list[str]:
        """Sanitised, unique ids of the full list (every shard)."""
        return [sid for sid, _ in self._all()]

    def _all(self) -> list[tuple[str, Any]]:
        if self._full is None:
            seen: dict[str, int] = {}
            out = []
            for raw, data in self._list():
                sid = sanitize_id(raw)
                if sid in seen:
                    seen[sid] += 1
                    new = f"{sid}-{seen[sid]}"
                    while new in seen:
                        seen[sid] += 1
                        new = f"{sid}-{seen[sid]}"
                    log.warning("%s: duplicate sample id %r renamed to %r", self.name, sid, new)
                    sid = new
                seen.setdefault(sid, 1)
                out.append((sid, data))
            self._full = out
        return self._full

    def entries(self) -> list[tuple[str, Any]]:
        """This shard's entries after ``limit``."""
        if self._entries is None:
            mine = self._all()[self.shard :: self.num_shards]
            self._entries = mine if self.limit is None else mine[: self.limit]
        return self._entries

    def ids(self) -> list[str]:
        """This shard's sample ids, without loading anything (for resuming)."""
        return [sid for sid, _ in self.entries()]

    def __len__(self) -> int:
        return len(self.entries())

    def __iter__(self) -> Iterator[Sample]:
        return self.iter_samples()

    def iter_samples(self, skip: set[str] | None = None) -> Iterator[Sample]:
        """Yield samples in order; ids in ``skip`` are not loaded at all (resume)."""
        for sid, data in self.entries():
            if skip and sid in skip:
                continue
            try:
                s = self._load(sid, data)
            except READ_ERRORS as e:
                msg = one_line(e)
                if not isinstance(e, (ImageError, SampleError)):
                    msg = f"{sid}: {type(e).__name__}: {msg}"
                log.warning("%s: %s", self.name, msg)
                s = self.error_sample(sid, data, msg)
            s.id = sid
            yield s

    def error_sample(self, sid: str, data: Any, message: str) -> Sample:
        d = {"source_prompt": "", "target_prompt": ""}
        try:
            d.update(self._describe(data))
        except Exception as e:  # describing must never hide the real error
            log.debug("%s: could not describe %s: %s", self.name, sid, e)
        return Sample(id=sid, image=None, error=one_line(message), **d)

    def __repr__(self) -> str:
        extra = f", limit={self.limit}" if self.limit is not None else ""
        if self.num_shards > 1:
            extra += f", shard={self.shard}/{self.num_shards}"
        return f"{type(self).__name__}(name={self.name!r}{extra})"


def read_table(path: str | Path, what: str = "table") -> list[dict[str, Any]]:
    """Rows of a CSV (header row) or JSON file (a list of objects, or an object mapping a
    key to an object, the key becoming ``file``) as dicts with string keys."""
    import json

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: {what} not found")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        import pandas as pd

        try:
            df = pd.read_csv(path, dtype=str, keep_default_na=False)
        except Exception as e:
            raise ValueError(f"{path}: cannot read CSV ({one_line(e)})") from None
        df.columns = [str(c).strip() for c in df.columns]
        return df.to_dict("records")
    if suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: invalid JSON ({one_line(e)})") from None
        if isinstance(data, Mapping):
            rows = []
            for k, v in data.items():
                if not isinstance(v, Mapping):
                    raise ValueError(f"{path}: entry {k!r} must be an object, got {type(v).__name__}")
                rows.append({"file": k, **v})
            return rows
        if isinstance(data, list):
            for i, v in enumerate(data):
                if not isinstance(v, Mapping):
                    raise ValueError(f"{path}: item {i} must be an object, got {type(v).__name__}")
            return [dict(v) for v in data]
        raise ValueError(f"{path}: expected a list of objects or an object of objects, got {type(data).__name__}")
    raise ValueError(f"{path}: unsupported {what} format {suffix!r}; use .csv or .json")


def cell(row: Mapping[str, Any], key: str) -> str | None:
    """A table cell as a stripped string, or None when absent/empty/NaN."""
    v = row.get(key)
    if v is None:
        return None
    if isinstance(v, float) and np.isnan(v):
        return None
    s = str(v).strip()
    return s or None
