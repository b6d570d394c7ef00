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


@dataclass
class EditRequest:
    """What an editor receives."""

    image: Image.Image
    source_prompt: str
    target_prompt: str
    instruction: str | None = None
    mask: np.ndarray | None = None
    seed: int = 0
    init_noise: torch.Tensor | None = None
    id: str = ""

    @classmethod
    def from_sample(cls, s: Sample, seed: int) -> EditRequest:
        return cls(s.image, s.source_prompt, s.target_prompt, s.instruction, s.mask, seed, s.init_noise, s.id)


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
