"""The one editor interface.

An editor is built from its hyperparameters (a Hydra ``method`` config with ``_target_``),
bound to loaded models (:meth:`Editor.bind`), then called on :class:`~oig.types.EditRequest`
objects. Subclasses implement :meth:`Editor.edit`, which receives the request and the
source image already prepared for the model (resized by the shared preprocessing), and a
:class:`~oig.diffusion.Timer` to record phases.

Every ``__init__`` argument of an editor is stored as an attribute of the same name; that
is how :meth:`hparams` reports the resolved hyperparameters that go into each result row.
"""

from __future__ import annotations

import inspect
import logging
from abc import ABC, abstractmethod

import torch

from .diffusion import Diffusion, Timer
from .image import check_size, resize_mask, to_rgb
from .models import SDModels
from .types import EditRequest, EditResult

log = logging.getLogger(__name__)


class EditError(RuntimeError):
    """An edit that failed for a reason worth one line in the result row (NaN latents, bad prompt)."""


class Editor(ABC):
    name = "editor"
    #: True when the editor produces a reconstruction of the source as a by-product
    has_reconstruction = False
    #: numeric parameters that also accept a list as one value (e.g. a [start, end] window): in a
    #: sweep (:mod:`oig.sweep`) only a list of lists is a vector for them
    list_params: tuple[str, ...] = ()

    def __init__(self, steps: int = 50, guidance: float = 5.0, negative: str = "source",
                 resize_mode: str = "keep_aspect", encode: str = "mean"):
        self.steps = steps
        self.guidance = guidance
        self.negative = negative
        self.resize_mode = resize_mode
        self.encode = encode
        self.core: Diffusion | None = None

    # -------------------------------------------------------------- setup
    def bind(self, models: SDModels, cache=None, progress: bool = False) -> Editor:
        self.models = models
        self.core = Diffusion(models, self.resize_mode, self.encode, cache, progress)
        return self

    def hparams(self) -> dict:
        out = {}
        for cls in type(self).__mro__:
            if cls is object or "__init__" not in cls.__dict__:
                continue
            for p in inspect.signature(cls.__init__).parameters.values():
                if p.name in ("self",) or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or p.name in out:
                    continue
                if hasattr(self, p.name):
                    v = getattr(self, p.name)
                    out[p.name] = v if isinstance(v, (int, float, str, bool, type(None))) else str(v)
        return out

    def negative_text(self, req: EditRequest) -> str:
        """``source``: the source prompt (pix2pix-zero / OIG convention for real images);
        ``empty``: ""; anything else is used verbatim."""
        if self.negative == "source":
            return req.source_prompt
        if self.negative == "empty":
            return ""
        return self.negative

    # -------------------------------------------------------------- call
    def __call__(self, req: EditRequest) -> EditResult:
        return self.call_with(req, self.edit)

    def call_with(self, req: EditRequest, edit):
        """Check and prepare ``req``, seed, and time ``edit(req, src, timer)`` (an :class:`EditResult`
        or a list of them); each result's ``timings`` gets the timer's phases and ``total``."""
        if self.core is None:
            raise RuntimeError(f"{type(self).__name__} is not bound to models; call .bind(models) first")
        img = to_rgb(req.image)
        check_size(img, req.id or "<image>")
        for field in ("source_prompt", "target_prompt"):
            if not isinstance(getattr(req, field), str):
                raise EditError(f"{field} is not a string")
        src = self.core.prepare(img)
        if req.mask is not None:
            req.mask = resize_mask(req.mask, src.size)
        timer = Timer()
        torch.manual_seed(req.seed)
        with timer("total"):
            res = edit(req, src, timer)
        for r in res if isinstance(res, list) else [res]:
            r.timings = {**timer.t, **r.timings}
        return res

    def edit_points(self, req: EditRequest, points: list[Editor]) -> list[EditResult]:
        """Edit ``req`` once per point of a sweep: ``points`` are editors of one method, bound to the
        same models, that differ in hyperparameters (:mod:`oig.sweep`). Here one edit after the
        other (the model loaded once, inversions shared through the cache); editors that can
        batch the points override this (OIG, OIG+)."""
        return [p(req) for p in points]

    @abstractmethod
    def edit(self, req: EditRequest, src, timer: Timer) -> EditResult:
        """Edit the prepared source image ``src`` (PIL, model-ready size) as ``req`` asks."""

    # -------------------------------------------------------------- helpers for subclasses
    @staticmethod
    def check_finite(x: torch.Tensor, where: str):
        if not torch.isfinite(x).all():
            raise EditError(f"non-finite values (NaN/inf) in the latent after {where}")
