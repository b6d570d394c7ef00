"""Datasets: the toy world, your own folders, PIE-Bench, LAION task subsets and synthetic
images, all yielding :class:`oig.types.Sample` through the :class:`EditDataset` interface.

Config: ``conf/dataset/<name>.yaml`` (``_target_`` = one of the classes below). Names are
imported lazily, so ``python -m oig.data.laion`` and ``import oig.data`` stay light.
"""

from importlib import import_module

_EXPORTS = {
    "EditDataset": "base", "SampleError": "base", "sanitize_id": "base",
    "ToyWorld": "toyworld",
    "FolderDataset": "folder",
    "PIEBench": "pie_bench", "decode_rle": "pie_bench",
    "LaionTasks": "laion", "build_manifest": "laion", "download": "laion",
    "SyntheticDataset": "synthetic",
    "Captioner": "prompts", "word_swap": "prompts",
    "Task": "tasks", "PIX2PIX_ZERO_TASKS": "tasks", "get_task": "tasks", "get_tasks": "tasks",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
