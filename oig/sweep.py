"""Vector hyperparameters: every point of a sweep in one run.

``oig-run method=oig method.lambda2=[0,0.5,1,1.5]`` gives a *vector* value to a hyperparameter
that the editor takes as a scalar; several vector keys make a grid (their Cartesian product, in
the order the keys appear in the method config). The run loads the model once, builds one
editor per point, and edits each sample for every point through :meth:`Editor.edit_points`:
OIG and OIG+ stack the points into one batch (inversion and reconstruction once, each U-Net /
VAE / CLIP call shared, see :meth:`oig.oig_editor.OIG.edit_points`); every other editor runs
the points one after the other in the same process (the model loaded once, the inversion
shared through the cache).

What counts as a vector: a list where the editor's ``__init__`` default is a number (``int`` or
``float``), or a list of lists where the default is a list or tuple (``guide_range``) or where
the editor declares the parameter in ``list_params`` (a number or a ``[start, end]`` window, as
Prompt-to-Prompt's ``cross_replace``: ``[0.2, 0.8]`` is one window, ``[[0, 0.2], [0, 0.8]]`` a
sweep). Lists given to any other parameter (word lists, layer names) are ordinary values. The per-job path
stays: ``hydra.mode=MULTIRUN method.lambda2=0,0.5,1,1.5`` runs one job per value.

Each point writes its own run folder inside the run's folder, named like a multirun job's
(``<j>_<method>_<key>_<value>``), with the same rows (``hp_*`` columns hold the point's
values), images, ``results.parquet`` and grid as a separate run, so ``oig-report`` and the
sweep plots read it unchanged. Time columns are the batch's divided by its points
(``sweep_batch`` says how many points shared the pass).
"""

from __future__ import annotations

import inspect
import itertools
import re
from numbers import Number


def _defaults(cls) -> dict:
    """``__init__`` defaults over the class's MRO (subclasses that take ``**kw`` pass them on)."""
    out = {}
    for c in cls.__mro__:
        if c is object or "__init__" not in c.__dict__:
            continue
        for p in inspect.signature(c.__init__).parameters.values():
            if p.name != "self" and p.default is not p.empty and p.name not in out:
                out[p.name] = p.default
    return out


def _is_number(v) -> bool:
    return isinstance(v, Number) and not isinstance(v, bool)


def editor_class(method: dict):
    from hydra.utils import get_object

    target = method.get("_target_")
    if not target:
        raise ValueError("method config has no _target_")
    return get_object(target)


def vector_keys(method: dict) -> dict[str, list]:
    """The method keys given vector values (see the module docstring), in config order."""
    cls = editor_class(method)
    defaults = _defaults(cls)
    list_params = set(getattr(cls, "list_params", ()))
    out = {}
    for k, v in method.items():
        if k.startswith("_") or k not in defaults or not isinstance(v, (list, tuple)):
            continue
        d = defaults[k]
        if k in list_params:  # a number or a list is one value: only a list of them is a sweep
            if v and all(isinstance(x, (list, tuple)) for x in v):
                out[k] = [list(x) for x in v]
        elif _is_number(d):
            if not v:
                raise ValueError(f"method.{k}=[]: a sweep needs at least one value")
            bad = [x for x in v if not _is_number(x)]
            if bad:
                raise ValueError(f"method.{k}: a vector of numbers was expected (the editor's default is {d!r}), "
                                 f"got {bad[0]!r} in {list(v)}")
            out[k] = list(v)
        elif isinstance(d, (list, tuple)) and v and all(isinstance(x, (list, tuple)) for x in v):
            out[k] = [list(x) for x in v]
    return out


def points(method: dict) -> list[dict]:
    """The sweep's points: one ``{key: value}`` per combination of the vector keys (``[{}]`` when
    there are none)."""
    keys = vector_keys(method)
    return [dict(zip(keys, combo)) for combo in itertools.product(*keys.values())]


def apply(method: dict, point: dict) -> dict:
    """The method config of one point (every value a scalar)."""
    return {**method, **point}


def _fmt(v) -> str:
    s = "-".join(_fmt(x) for x in v) if isinstance(v, (list, tuple)) else str(v)
    return re.sub(r"[^A-Za-z0-9.+-]", "_", s)


def folder_name(j: int, method_name: str, point: dict) -> str:
    """``<j>_<method>_<key>_<value>[_<key>_<value>...]``, as the multirun presets name their jobs."""
    return "_".join([str(j), method_name] + [f"{k}_{_fmt(v)}" for k, v in point.items()])


def label(point: dict) -> str:
    """A short ASCII caption of a point (grids use PIL's default font), e.g. ``lambda2=100``."""
    return ", ".join(f"{k}={_fmt(v).replace('-', ',') if isinstance(v, (list, tuple)) else v}"
                     for k, v in point.items())
