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
        self.hits = 0
        self.misses = 0
        self.writes = 0

    @staticmethod
    def key(**fields) -> str:
        blob = json.dumps(fields, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def path(self, key: str) -> Path:
        if not all(c in "0123456789abcdef" for c in key) or len(key) != 64:
            raise ValueError(f"invalid cache key {key!r}")  # keys never become arbitrary paths
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, key: str, device=None) -> dict[str, torch.Tensor] | None:
        if not self.enabled:
            self.misses += 1
            return None
        p = self.path(key)
        if not p.exists():
            self.misses += 1
            return None
        try:
            out = load_file(str(p), device=str(device) if device is not None else "cpu")
        except Exception as e:  # a damaged entry is recomputed, not fatal
            log.warning("inversion cache: unreadable entry %s (%s); recomputing", p, e)
            self.misses += 1
            return None
        self.hits += 1
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
        return {"cache_hits": self.hits, "cache_misses": self.misses}
