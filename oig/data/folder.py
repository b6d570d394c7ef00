"""A folder of your own images with prompts."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from oig.image import load_image
from oig.types import Sample

from .base import EditDataset, SampleError, cell, fit_mask, load_mask, read_table
from .prompts import Captioner, LazyTextEncoder, make_captioner, swap_details
from .tasks import Task, get_task

log = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")


class FolderDataset(EditDataset):
    """Images in ``path`` described by ``prompts.csv`` or ``prompts.json`` in the same folder.

    **Format.** One row per sample. CSV: a header row with these columns; JSON: a list of
    objects with these keys (or an object mapping each file name to such an object):

    * ``file`` (required): image path, relative to the folder (or absolute);
    * ``source_prompt``: caption of the image; empty/missing -> the ``captioner``;
    * ``target_prompt``: the edit's prompt; empty/missing -> word swap of the source prompt
      by the row's or the dataset's ``task`` (error row when there is none);
    * ``instruction``: for instruction-driven editors (default: the task's instruction);
    * ``mask``: mask image, white = region to edit (resized, nearest, to the image's size);
    * ``task``: task label for per-task metrics (a task name such as ``cat2dog`` also
      drives the word swap);
    * ``id``: sample id (default: the file name), sanitised as every id.

    Without a prompts file, every image in the folder (sorted by name) is a sample; then
    ``task`` is required (the pix2pix-zero real-image setting: caption with the captioner,
    target by word swap).

    ``prompts_file`` picks another table; ``captioner`` is None, a BLIP model id/folder or a
    :class:`~oig.data.prompts.Captioner`; ``task`` a task name (``cat2dog``), ``src2tgt`` or
    mapping; ``swap_clip`` the CLIP for the word-swap fallback (a :func:`oig.clip.load_clip`
    name, e.g. ``toy`` or ``ViT-B-32`` with ``swap_clip_pretrained=openai``).

    A row whose image (or mask) is missing, corrupt or too small, or that has no source
    prompt and no captioner, becomes an error sample naming the file.
    """

    name = "folder"

    def __init__(self, path: str, prompts_file: str | None = None, captioner: Any = None, task: Any = None,
                 swap_clip: Any = None, swap_clip_pretrained: str | None = None,
                 limit: int | None = None, shard: int = 0, num_shards: int = 1, name: str | None = None):
        super().__init__(limit=limit, shard=shard, num_shards=num_shards, name=name)
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path}: image folder not found")
        self.captioner: Captioner | None = make_captioner(captioner)
        self.task: Task | None = get_task(task) if task is not None else None
        self._swap_clip = LazyTextEncoder(swap_clip, swap_clip_pretrained)
        if prompts_file is not None:
            pf = Path(prompts_file).expanduser()
            self.prompts_file = pf if pf.is_absolute() else self.path / pf
            if not self.prompts_file.exists():
                raise FileNotFoundError(f"{self.prompts_file}: prompts file not found")
        else:
            found = [self.path / n for n in ("prompts.csv", "prompts.json") if (self.path / n).exists()]
            if len(found) > 1:
                raise ValueError(f"{self.path}: both prompts.csv and prompts.json exist; pass prompts_file")
            self.prompts_file = found[0] if found else None
        if self.prompts_file is None:
            if self.task is None:
                raise ValueError(
                    f"{self.path}: no prompts.csv or prompts.json; add one (columns file, source_prompt, "
                    f"target_prompt, ...) or set task=<src>2<tgt> to caption and word-swap every image"
                )
            self._rows = [{"file": p.name} for p in sorted(self.path.iterdir())
                          if p.is_file() and p.suffix.lower() in IMAGE_EXTS]
            if not self._rows:
                raise ValueError(f"{self.path}: no images ({', '.join(IMAGE_EXTS)})")
        else:
            self._rows = read_table(self.prompts_file, "prompts file")
            for i, r in enumerate(self._rows):
                if not cell(r, "file"):
                    raise ValueError(f"{self.prompts_file}: row {i + 1} has no 'file' (columns: {sorted(r)})")

    def _list(self) -> list[tuple[str, Any]]:
        return [(cell(r, "id") or cell(r, "file"), r) for r in self._rows]

    def _file(self, rel: str) -> Path:
        p = Path(rel).expanduser()
        return p if p.is_absolute() else self.path / p

    def _row_task(self, r) -> Task | None:
        name = cell(r, "task")
        if name is not None:
            try:
                return get_task(name)
            except ValueError:
                return self.task
        return self.task

    def _describe(self, r) -> dict[str, Any]:
        t = self._row_task(r)
        return {"source_prompt": cell(r, "source_prompt") or "", "target_prompt": cell(r, "target_prompt") or "",
                "instruction": cell(r, "instruction") or (t.instruction_text() if t else None),
                "task": cell(r, "task") or (t.name if t else ""), "meta": {"file": cell(r, "file")}}

    def text_encoder(self):
        return self._swap_clip.get()

    def _load(self, sid: str, r) -> Sample:
        d = self._describe(r)
        f = self._file(cell(r, "file"))
        img = load_image(f)
        if not d["source_prompt"]:
            if self.captioner is None:
                raise SampleError(f"{f}: no source_prompt and no captioner configured")
            d["source_prompt"] = self.captioner(img)
            d["meta"]["captioned"] = True
        if not d["target_prompt"]:
            t = self._row_task(r)
            if t is None:
                raise SampleError(f"{f}: no target_prompt and no task to derive it by word swap")
            try:
                sw = swap_details(d["source_prompt"], t.source, t.target, text_encoder=self.text_encoder())
            except ValueError as e:
                raise SampleError(f"{f}: {e}") from None
            d["target_prompt"] = sw.prompt
            d["meta"]["swap"] = sw.method
        mask = None
        if cell(r, "mask"):
            mask = fit_mask(load_mask(self._file(cell(r, "mask"))), img.size, str(f))
        return Sample(id=sid, image=img, mask=mask, **d)
