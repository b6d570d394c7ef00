"""Name -> class registries for editors and metrics.

Hydra configs reach the same classes with ``_target_``; the registry lets code and the
command line find them by short name (``oig.registry.get_editor("oig")``).
"""

from __future__ import annotations

import importlib

EDITORS: dict[str, type] = {}
METRICS: dict[str, type] = {}

# modules that register built-in editors / metrics when imported
_BUILTIN_EDITOR_MODULES = (
    "baselines.ddim",
    "baselines.sdedit",
    "oig.oig_editor",
    "baselines.diffedit",
    "baselines.pix2pix_zero",
    "baselines.instruct_pix2pix",
    "baselines.pnp",
    "baselines.masactrl",
    "baselines.null_text_p2p",
)
_BUILTIN_METRIC_MODULES = ("eval.clip", "eval.structure", "eval.background", "eval.toy")


def register_editor(name: str):
    def deco(cls):
        if name in EDITORS and EDITORS[name] is not cls:
            raise ValueError(f"editor name {name!r} is already registered to {EDITORS[name].__qualname__}")
        EDITORS[name] = cls
        cls.name = name
        return cls

    return deco


def register_metric(name: str):
    def deco(cls):
        METRICS[name] = cls
        cls.name = name
        return cls

    return deco


def _load(mods):
    for m in mods:
        try:
            importlib.import_module(m)
        except ModuleNotFoundError as e:  # a module of this list that does not exist yet
            if e.name != m:
                raise


def get_editor(name: str) -> type:
    if name not in EDITORS:
        _load(_BUILTIN_EDITOR_MODULES)
    if name not in EDITORS:
        raise KeyError(f"unknown editor {name!r}; registered: {sorted(EDITORS)}")
    return EDITORS[name]


def get_metric(name: str) -> type:
    if name not in METRICS:
        _load(_BUILTIN_METRIC_MODULES)
    if name not in METRICS:
        raise KeyError(f"unknown metric {name!r}; registered: {sorted(METRICS)}")
    return METRICS[name]


def list_editors() -> list[str]:
    _load(_BUILTIN_EDITOR_MODULES)
    return sorted(EDITORS)
