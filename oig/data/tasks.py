"""Word-swap editing tasks (``cat -> dog``) as data.

A task names a source word, a target word or phrase and optionally an instruction (for
instruction-driven editors such as InstructPix2Pix). The target prompt of an image is its
caption with the source word swapped (:func:`oig.data.prompts.word_swap`), so
``cat -> "cat wearing glasses"`` turns "two cats on a sofa" into "two cats wearing glasses
on a sofa".

:data:`PIX2PIX_ZERO_TASKS` are the LAION-5B real-image tasks of pix2pix-zero / OIG as far as
the released code shows them (``cat2dog``, ``dog2cat``, ``horse2zebra``, ``zebra2horse``,
``tree2fall``, plus ``cat2cat_glasses``); ``conf/tasks/pix2pix_zero.yaml`` holds the same
table for editing and ``--tasks-file``.

A name that is not in the table but reads ``<src>2<tgt>`` (the official code's
``--task_name`` convention, e.g. ``apple2orange``) is accepted as the task src -> tgt.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .base import plain


@dataclass(frozen=True)
class Task:
    name: str
    source: str  # word (or phrase) that must occur in the caption
    target: str  # what replaces it in the target prompt
    instruction: str | None = None

    def __post_init__(self):
        for k in ("name", "source", "target"):
            v = getattr(self, k)
            if not isinstance(v, str) or not v.strip():
                raise ValueError(f"task {self.name!r}: {k} must be a non-empty string, got {v!r}")
        if not re.fullmatch(r"[A-Za-z0-9._-]+", self.name):
            raise ValueError(f"task name {self.name!r} may only contain letters, digits, '.', '_' and '-'")

    def instruction_text(self) -> str:
        if self.instruction:
            return self.instruction
        art = "an" if self.target[:1].lower() in "aeiou" else "a"
        return f"turn the {self.source} into {art} {self.target}"

    def target_prompt(self, caption: str, text_encoder=None) -> str:
        from .prompts import word_swap

        return word_swap(caption, self.source, self.target, text_encoder=text_encoder)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PIX2PIX_ZERO_TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("cat2dog", "cat", "dog", "turn the cat into a dog"),
        Task("dog2cat", "dog", "cat", "turn the dog into a cat"),
        Task("horse2zebra", "horse", "zebra", "turn the horse into a zebra"),
        Task("zebra2horse", "zebra", "horse", "turn the zebra into a horse"),
        Task("cat2cat_glasses", "cat", "cat wearing glasses", "make the cat wear glasses"),
        Task("tree2fall", "tree", "tree in fall", "make it autumn"),
    )
}


def get_task(spec: Any) -> Task:
    """A :class:`Task` from a Task, a table name, ``"<src>2<tgt>"`` or a mapping with
    ``name``, ``source``, ``target`` (``src``/``tgt`` accepted) and ``instruction``."""
    spec = plain(spec)
    if isinstance(spec, Task):
        return spec
    if isinstance(spec, str):
        if spec in PIX2PIX_ZERO_TASKS:
            return PIX2PIX_ZERO_TASKS[spec]
        parts = spec.split("2")
        if len(parts) == 2 and all(p.strip() for p in parts):
            return Task(spec, parts[0].replace("_", " "), parts[1].replace("_", " "))
        raise ValueError(
            f"unknown task {spec!r}: use one of {sorted(PIX2PIX_ZERO_TASKS)}, '<src>2<tgt>' or a mapping "
            f"with name/source/target"
        )
    if isinstance(spec, Mapping):
        d = dict(spec)
        src = d.get("source", d.get("src"))
        tgt = d.get("target", d.get("tgt"))
        name = d.get("name") or (f"{src}2{tgt}".replace(" ", "_") if src and tgt else None)
        unknown = set(d) - {"name", "source", "src", "target", "tgt", "instruction"}
        if unknown:
            raise ValueError(f"task {name!r}: unknown keys {sorted(unknown)}")
        return Task(str(name), str(src) if src is not None else "", str(tgt) if tgt is not None else "",
                    d.get("instruction"))
    raise TypeError(f"cannot make a task from {type(spec).__name__}: {spec!r}")


def get_tasks(spec: Any = None) -> list[Task]:
    """A list of tasks: None = the whole pix2pix-zero table; a list of specs (see
    :func:`get_task`); a mapping name -> {source, target, instruction}."""
    spec = plain(spec)
    if spec is None:
        return list(PIX2PIX_ZERO_TASKS.values())
    if isinstance(spec, (str, Task)):
        return [get_task(spec)]
    if isinstance(spec, Mapping):
        if {"source", "target"} & set(spec) or {"src", "tgt"} & set(spec):
            return [get_task(spec)]
        return [get_task({"name": k, **(v or {})}) for k, v in spec.items()]
    if isinstance(spec, Sequence):
        tasks = [get_task(s) for s in spec]
        names = [t.name for t in tasks]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate task names {sorted(dup)}")
        return tasks
    raise TypeError(f"cannot make tasks from {type(spec).__name__}")


def load_tasks_file(path: str | Path) -> list[Task]:
    """Tasks from a YAML or JSON file: a list of task mappings, or ``{tasks: [...]}``."""
    import json

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: tasks file not found")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        from omegaconf import OmegaConf

        data = OmegaConf.to_container(OmegaConf.create(text), resolve=True)
    elif path.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        raise ValueError(f"{path}: tasks file must be .yaml, .yml or .json")
    if isinstance(data, Mapping) and "tasks" in data:
        data = data["tasks"]
    try:
        return get_tasks(data)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None
