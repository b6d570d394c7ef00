"""Synthetic sources: images the model itself generates from a prompt and a seed.

The paper's synthetic setting (OIG ``edit_synthetic.py``, pix2pix-zero): the source image is
sampled by DDIM from Gaussian noise with the source prompt, an empty negative prompt and
classifier-free guidance; editors may start from that same noise (``Sample.init_noise``)
instead of inverting the image.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from oig.types import Sample

from .base import EditDataset, cell, plain, read_table

log = logging.getLogger(__name__)


class SyntheticDataset(EditDataset):
    """Source images generated from ``(source_prompt, target_prompt, seed)`` entries.

    Entries come from ``prompts`` (a list of mappings with ``source_prompt``,
    ``target_prompt``, ``seed`` and optional ``instruction``, ``task``, ``id``; or lists
    ``[source_prompt, target_prompt, seed]``) and/or ``file`` (CSV or JSON with the same
    columns/keys). A missing seed is ``default_seed``.

    Generation (lazily, one sample at a time, with the shared core): ``xT =
    Diffusion.noise((1, C, H/8, W/8), seed)`` (a CPU generator, so the same on every
    device, but not the official scripts' CUDA ``torch.randn`` stream), then
    ``Diffusion.sample(xT, cond(source_prompt), neg(negative_prompt), guidance, steps)``
    and ``decode_pil``. ``model``/``device``/``dtype`` go to :func:`oig.models.load_sd`
    (memoised, so using the run's model costs nothing extra); the defaults follow OIG's
    ``edit_synthetic.py``: 50 DDIM steps, guidance 5, empty negative prompt.

    ``Sample.init_noise`` is ``xT`` as a float32 CPU tensor; ``meta`` records the seed,
    model, steps and guidance.
    """

    name = "synthetic"

    def __init__(self, prompts: Any = None, file: str | None = None, model: str = "toy", device: str = "auto",
                 dtype: str = "auto", steps: int = 50, guidance: float = 5.0, negative_prompt: str = "",
                 default_seed: int = 0, limit: int | None = None, shard: int = 0, num_shards: int = 1,
                 name: str | None = None):
        super().__init__(limit=limit, shard=shard, num_shards=num_shards, name=name)
        self.model = str(model)
        self.device = device
        self.dtype = dtype
        self.steps = int(steps)
        self.guidance = float(guidance)
        self.negative_prompt = negative_prompt or ""
        self.default_seed = int(default_seed)
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        entries: list[dict[str, Any]] = []
        prompts = plain(prompts)
        if prompts is not None:
            if isinstance(prompts, (str, Mapping)) or not isinstance(prompts, Sequence):
                raise TypeError("prompts must be a list of {source_prompt, target_prompt, seed} mappings or lists")
            entries += [self._parse(p, f"prompts[{i}]") for i, p in enumerate(prompts)]
        self.file = Path(file).expanduser() if file else None
        if self.file is not None:
            entries += [self._parse(r, f"{self.file}: row {i + 1}") for i, r in enumerate(read_table(self.file, "prompts file"))]
        if not entries:
            raise ValueError("SyntheticDataset needs prompts=[...] or file=<csv/json>")
        self._entries_raw = entries
        self._core = None

    def _parse(self, p: Any, where: str) -> dict[str, Any]:
        if isinstance(p, Mapping):
            d = {k: cell(p, k) for k in ("source_prompt", "target_prompt", "instruction", "task", "id")}
            seed = cell(p, "seed")
        elif isinstance(p, Sequence) and not isinstance(p, str) and len(p) in (2, 3):
            d = {"source_prompt": str(p[0]).strip(), "target_prompt": str(p[1]).strip()}
            seed = p[2] if len(p) == 3 else None
        else:
            raise ValueError(f"{where}: expected a mapping or [source_prompt, target_prompt, seed], got {p!r}")
        if not d.get("source_prompt") or not d.get("target_prompt"):
            raise ValueError(f"{where}: source_prompt and target_prompt must be non-empty")
        try:
            d["seed"] = self.default_seed if seed is None else int(float(seed))
        except (TypeError, ValueError):
            raise ValueError(f"{where}: seed must be an integer, got {seed!r}") from None
        return d

    def _list(self) -> list[tuple[str, Any]]:
        return [(e.get("id") or f"syn{i:04d}_seed{e['seed']}", e) for i, e in enumerate(self._entries_raw)]

    def _describe(self, e) -> dict[str, Any]:
        return {"source_prompt": e["source_prompt"], "target_prompt": e["target_prompt"],
                "instruction": e.get("instruction"), "task": e.get("task") or "synthetic",
                "meta": {"seed": e["seed"], "model": self.model, "steps": self.steps, "guidance": self.guidance,
                         "negative_prompt": self.negative_prompt}}

    def core(self):
        if self._core is None:
            from oig.diffusion import Diffusion
            from oig.models import load_sd

            self._core = Diffusion(load_sd(self.model, device=self.device, dtype=self.dtype))
        return self._core

    def generate(self, prompt: str, seed: int):
        """``(image, xT)`` for one prompt and seed."""
        import torch

        core = self.core()
        m = core.m
        lat = m.resolution // m.vae_scale_factor
        shape = (1, int(m.vae.config.latent_channels), lat, lat)
        xT = core.noise(shape, seed)
        with torch.no_grad():
            cond = core.encode_text([prompt])
            neg = core.encode_text([self.negative_prompt]) if self.guidance != 1.0 else None
            z0 = core.sample(xT, cond, neg, self.guidance, self.steps, desc="synthetic")
            img = core.decode_pil(z0)
        return img, xT.detach().float().cpu()

    def _load(self, sid: str, e) -> Sample:
        img, xT = self.generate(e["source_prompt"], e["seed"])
        return Sample(id=sid, image=img, init_noise=xT, **self._describe(e))
