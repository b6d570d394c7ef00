"""The data types every editor, dataset and metric share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image


@dataclass
class Sample:
    """One editing sample as a dataset yields it.

    ``image`` is an RGB PIL image (any size; editors preprocess it). ``mask`` is a boolean
    HxW array at the image's size, True where the edit is meant to happen (None when the
    dataset has no mask). ``target_image`` is the exact answer where one exists (toy world).
    ``init_noise`` is the starting latent of a synthetic image, so editors may use it
    instead of an inversion. ``error`` marks a sample that could not be read: the runner
    writes an error row for it and goes on.
    """

    id: str
    image: Image.Image | None
    source_prompt: str
    target_prompt: str
    instruction: str | None = None
    mask: np.ndarray | None = None
    task: str = ""
    target_image: Image.Image | None = None
    init_noise: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def edit_words(meta: dict[str, Any] | None) -> tuple[str, str] | None:
    """The sample's edited words ``(source_word, target_word)`` from its ``meta``, or None.

    The one place that reads them: ``source_word`` / ``target_word`` (LAION and synthetic
    word-swap tasks, the toy world; either may be a phrase such as ``"cat wearing glasses"``
    or empty, e.g. the toy ``appearance_change`` adds ``"striped"`` to nothing), else
    PIE-Bench's ``blended_word`` (``"cat dog"``: the source word, then the target word, split on
    the space as PIE-Bench's ``run_editing_p2p.py`` does).
    """
    meta = meta or {}
    s, t = meta.get("source_word"), meta.get("target_word")
    if s is not None or t is not None:
        return (s or "").strip(), (t or "").strip()
    bw = (meta.get("blended_word") or "").strip()
    if bw:
        parts = bw.split(" ")
        if len(parts) != 2:
            raise ValueError(f"blended_word {bw!r} must be two space-separated words (source target)")
        return parts[0], parts[1]
    return None


@dataclass
class EditRequest:
    """What an editor receives.

    ``meta`` is the sample's metadata (a shallow copy): PIE-Bench's ``blended_word`` and
    ``editing_type``, the swapped words of a word-swap task (``source_word``, ``target_word``),
    toy scenes. :meth:`edit_words` reads the edited words from it for per-sample method
    arguments (P2P LocalBlend / re-weighting, Pix2Pix-Zero concept directions).
    """

    image: Image.Image
    source_prompt: str
    target_prompt: str
    instruction: str | None = None
    mask: np.ndarray | None = None
    seed: int = 0
    init_noise: torch.Tensor | None = None
    id: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_sample(cls, s: Sample, seed: int) -> EditRequest:
        return cls(s.image, s.source_prompt, s.target_prompt, s.instruction, s.mask, seed, s.init_noise, s.id,
                   dict(s.meta or {}))

    def edit_words(self) -> tuple[str, str] | None:
        """``(source_word, target_word)`` of this sample (see :func:`edit_words`), or None."""
        return edit_words(self.meta)


@dataclass
class EditResult:
    """What an editor returns.

    ``image`` is the edit and ``source`` the preprocessed source it was made from (same size),
    so metrics compare like with like. ``timings`` maps phase name to seconds; ``extras``
    holds optional artefacts (masks, latents, feature memory); ``info`` holds scalars that go
    into the result row (cache hits, guidance statistics).
    """

    image: Image.Image
    source: Image.Image
    reconstruction: Image.Image | None = None
    timings: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
