"""The toy world as a dataset: held-out scenes with exact target renders and edit masks."""

from __future__ import annotations

from typing import Any

from PIL import Image

from oig.toy import world
from oig.types import Sample

from .base import EditDataset, as_str_list


def edited_words(e: world.ToyEdit) -> dict[str, str]:
    """The words the edit changes, as word-swap datasets give them (``source_word``, ``target_word``):
    shape, colour or background name; ``appearance_change`` adds ``"striped"`` to nothing."""
    attr = {"shape_swap": "shape", "color_change": "color", "background_change": "background"}.get(e.task)
    if attr is not None:
        return {"source_word": getattr(e.source, attr), "target_word": getattr(e.target, attr)}
    if e.task == "appearance_change":
        return {"source_word": "", "target_word": "striped"}
    return {}


class ToyWorld(EditDataset):
    """:func:`oig.toy.world.benchmark` samples (64x64).

    ``n_per_task`` samples per task, interleaved by task (any prefix covers every task);
    ``tasks`` a subset of ``shape_swap``, ``color_change``, ``background_change``,
    ``appearance_change`` (default all four); ``seed`` the benchmark seed (the default
    1,000,000 gives scenes the toy models never saw in training).

    Each sample has the source render, the source/target captions, the instruction, the
    edit mask (True where the edit may change pixels), ``target_image`` (the exact target
    render) and ``meta = {"source_scene": Scene, "target_scene": Scene, "source_word": ..., "target_word": ...}``
    (the edited words, see :func:`edited_words`).
    """

    name = "toyworld"

    def __init__(self, n_per_task: int = 4, tasks: list[str] | None = None, seed: int = 1_000_000,
                 limit: int | None = None, shard: int = 0, num_shards: int = 1, name: str | None = None):
        super().__init__(limit=limit, shard=shard, num_shards=num_shards, name=name)
        self.n_per_task = int(n_per_task)
        if self.n_per_task < 0:
            raise ValueError(f"n_per_task must be >= 0, got {n_per_task}")
        self.tasks = tuple(as_str_list(tasks, "tasks") or world.TASKS)
        bad = [t for t in self.tasks if t not in world.TASKS]
        if bad:
            raise ValueError(f"unknown toy tasks {bad}; expected a subset of {list(world.TASKS)}")
        self.seed = int(seed)
        self._edits = world.benchmark(self.n_per_task, self.seed, self.tasks)

    def _list(self) -> list[tuple[str, Any]]:
        return [(e.id, e) for e in self._edits]

    def _describe(self, e: world.ToyEdit) -> dict[str, Any]:
        return {"source_prompt": e.source_prompt, "target_prompt": e.target_prompt, "instruction": e.instruction,
                "task": e.task}

    def _load(self, sid: str, e: world.ToyEdit) -> Sample:
        return Sample(
            id=sid,
            image=Image.fromarray(e.source_image),
            mask=e.edit_mask.copy(),
            target_image=Image.fromarray(e.target_image),
            meta={"source_scene": e.source, "target_scene": e.target, **edited_words(e)},
            **self._describe(e),
        )
