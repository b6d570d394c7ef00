"""PIE-Bench (PnPInversion, Ju et al. 2024): 700 images, ten editing types, edit masks.

Layout of ``root``::

    mapping_file.json          {"000000000000": {"image_path": "0_random_140/000000000000.jpg",
                                                 "original_prompt": "a [cat] sitting on a car",
                                                 "editing_prompt": "a [dog] sitting on a car",
                                                 "editing_instruction": "...", "editing_type_id": "1",
                                                 "blended_word": "cat dog", "mask": [s, n, s, n, ...]}, ...}
    annotation_images/<image_path>

Prompts mark the edited words with ``[ ]``; the brackets are stripped for the sample's
prompts and the raw prompts are kept in ``meta``. ``mask`` is run-length encoded over the
row-major flattened 512x512 image as ``[start, length, start, length, ...]``, 1 = region
to edit (:func:`decode_rle`). The official evaluation additionally marks the one-pixel
image border as edit region ("to avoid annotation errors in boundary");
``mask_border=True`` (default) does the same so background metrics match it.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from oig.image import load_image
from oig.types import Sample

from .base import EditDataset, SampleError, as_str_list, fit_mask

log = logging.getLogger(__name__)

EDITING_TYPES = {
    "0": "random",
    "1": "change_object",
    "2": "add_object",
    "3": "delete_object",
    "4": "change_attribute_content",
    "5": "change_attribute_pose",
    "6": "change_attribute_color",
    "7": "change_attribute_material",
    "8": "change_background",
    "9": "change_style",
}


def decode_rle(rle, h: int = 512, w: int = 512, border: bool = False) -> np.ndarray:
    """PIE-Bench RLE ``[start, length, ...]`` over the row-major flattened ``h x w`` image
    -> boolean (h, w) mask, True = region to edit. Runs past the end are clipped (as the
    official decoder does); ``border=True`` also marks the outermost rows and columns."""
    a = np.asarray(rle if rle is not None else [], dtype=np.int64).reshape(-1)
    if a.size % 2:
        raise ValueError(f"RLE mask must have an even number of values (start, length pairs), got {a.size}")
    if (a < 0).any():
        raise ValueError("RLE mask has negative values")
    n = h * w
    flat = np.zeros(n, dtype=bool)
    starts, lengths = a[0::2], a[1::2]
    if (starts >= n).any() and (lengths[starts >= n] > 0).any():
        raise ValueError(f"RLE mask has a run starting at {int(starts.max())}, outside the {h}x{w} image")
    for s, l in zip(starts.tolist(), lengths.tolist()):
        flat[s : min(s + l, n)] = True
    m = flat.reshape(h, w)
    if border:
        m[0, :] = m[-1, :] = True
        m[:, 0] = m[:, -1] = True
    return m


def strip_brackets(prompt: str) -> str:
    return " ".join(re.sub(r"[\[\]]", "", prompt or "").split())


class PIEBench(EditDataset):
    """PIE-Bench from ``root`` (see the module docstring).

    ``editing_types``: a list of type ids ``"0"``-``"9"`` to keep (None = all);
    ``mask_border``: mark the image border as edit region like the official evaluation.
    The sample task is the type's name (``change_object``, ...); ``meta`` holds
    ``editing_type_id``, ``editing_type``, ``blended_word`` and the raw bracketed prompts.
    """

    name = "pie_bench"

    def __init__(self, root: str, editing_types: list[str] | None = None, mask_border: bool = True,
                 mapping_file: str = "mapping_file.json", images_dir: str = "annotation_images",
                 limit: int | None = None, shard: int = 0, num_shards: int = 1, name: str | None = None):
        super().__init__(limit=limit, shard=shard, num_shards=num_shards, name=name)
        self.root = Path(root).expanduser()
        self.mapping_path = self.root / mapping_file
        self.images_dir = self.root / images_dir
        self.mask_border = bool(mask_border)
        if not self.mapping_path.exists():
            raise FileNotFoundError(f"{self.mapping_path}: PIE-Bench mapping file not found (root={self.root})")
        try:
            mapping = json.loads(self.mapping_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{self.mapping_path}: invalid JSON ({e})") from None
        if not isinstance(mapping, dict):
            raise ValueError(f"{self.mapping_path}: expected an object keyed by sample id")
        types = as_str_list(editing_types, "editing_types")
        if types is not None:
            bad = [t for t in types if t not in EDITING_TYPES]
            if bad:
                raise ValueError(f"unknown PIE-Bench editing types {bad}; use ids {list(EDITING_TYPES)}")
        self.editing_types = types
        self._items = []
        for key in sorted(mapping):
            ann = mapping[key]
            if not isinstance(ann, dict):
                raise ValueError(f"{self.mapping_path}: entry {key!r} must be an object")
            t = str(ann.get("editing_type_id", ""))
            if types is not None and t not in types:
                continue
            self._items.append((key, ann))

    def _list(self) -> list[tuple[str, Any]]:
        return list(self._items)

    def _describe(self, ann) -> dict[str, Any]:
        t = str(ann.get("editing_type_id", ""))
        return {
            "source_prompt": strip_brackets(ann.get("original_prompt", "")),
            "target_prompt": strip_brackets(ann.get("editing_prompt", "")),
            "instruction": ann.get("editing_instruction") or None,
            "task": EDITING_TYPES.get(t, f"type_{t}"),
            "meta": {
                "editing_type_id": t,
                "editing_type": EDITING_TYPES.get(t),
                "blended_word": ann.get("blended_word", ""),
                "original_prompt_raw": ann.get("original_prompt", ""),
                "editing_prompt_raw": ann.get("editing_prompt", ""),
                "image_path": ann.get("image_path"),
            },
        }

    def _load(self, sid: str, ann) -> Sample:
        d = self._describe(ann)
        rel = ann.get("image_path")
        if not rel:
            raise SampleError(f"{self.mapping_path}: entry {sid} has no image_path")
        f = self.images_dir / rel
        img = load_image(f)
        if not d["source_prompt"] or not d["target_prompt"]:
            raise SampleError(f"{self.mapping_path}: entry {sid} lacks original_prompt or editing_prompt")
        mask = None
        if ann.get("mask") is not None:
            try:
                mask = decode_rle(ann["mask"], 512, 512, border=self.mask_border)
            except (ValueError, TypeError) as e:
                raise SampleError(f"{self.mapping_path}: entry {sid}: bad mask ({e})") from None
            mask = fit_mask(mask, img.size, str(f))
        return Sample(id=sid, image=img, mask=mask, **d)
