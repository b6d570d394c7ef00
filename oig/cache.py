"""Content-addressed cache of inversions (and any other per-source tensors).

A key is the SHA-256 of every input that determines the result (model fingerprint, image
bytes, preprocessing, prompt, steps, inversion type and parameters). Entries are
safetensors files written to a temporary name and renamed into place, so a reader never
sees a partial file and two jobs writing the same key both end with one valid file.
Hits and misses are counted per process (and per run by the runner).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)


class InversionCache:
    def __init__(self, root: str | Path, enabled: bool = True):
        self.root = Path(root)
        self.enabled = enabled
        self.counts: dict[str, list[int]] = {}  # kind -> [hits, misses]
        self.writes = 0

    @property
    def hits(self) -> int:
        """Inversion hits (kind ``inversion``); other kinds are in :meth:`stats`."""
        return self.counts.get("inversion", [0, 0])[0]

    @property
    def misses(self) -> int:
        return self.counts.get("inversion", [0, 0])[1]

    def _count(self, kind: str, hit: bool):
        self.counts.setdefault(kind, [0, 0])[0 if hit else 1] += 1

    @staticmethod
    def key(**fields) -> str:
        blob = json.dumps(fields, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def path(self, key: str) -> Path:
        if not all(c in "0123456789abcdef" for c in key) or len(key) != 64:
            raise ValueError(f"invalid cache key {key!r}")  # keys never become arbitrary paths
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, key: str, device=None, kind: str = "inversion") -> dict[str, torch.Tensor] | None:
        """The entry or None. ``kind`` only sorts the hit/miss counters (inversion, reconstruction, ...)."""
        if not self.enabled:
            self._count(kind, False)
            return None
        p = self.path(key)
        if not p.exists():
            self._count(kind, False)
            return None
        try:
            out = load_file(str(p), device=str(device) if device is not None else "cpu")
        except Exception as e:  # a damaged entry is recomputed, not fatal
            log.warning("inversion cache: unreadable entry %s (%s); recomputing", p, e)
            self._count(kind, False)
            return None
        self._count(kind, True)
        return out

    def put(self, key: str, tensors: dict[str, torch.Tensor]):
        if not self.enabled:
            return
        p = self.path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=p.parent)
        os.close(fd)
        try:
            # clone: entries may alias each other (a trajectory holds x_T and z0), which safetensors refuses
            save_file({k: v.detach().to("cpu").clone().contiguous() for k, v in tensors.items()}, tmp)
            os.replace(tmp, p)
            self.writes += 1
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def stats(self) -> dict[str, int]:
        """``cache_hits`` / ``cache_misses`` for inversions, ``cache_<kind>_hits`` / ``_misses`` for the rest."""
        out = {"cache_hits": self.hits, "cache_misses": self.misses}
        for kind, (h, m) in self.counts.items():
            if kind != "inversion":
                out[f"cache_{kind}_hits"], out[f"cache_{kind}_misses"] = h, m
        return out
