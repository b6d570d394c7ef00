"""DiffEdit (Couairon et al., ICLR'23) through diffusers' ``StableDiffusionDiffEditPipeline``.

The pipeline is built from the components of the bound :class:`~oig.models.SDModels` (no
second load of weights) with its own DDIM and DDIM-inverse schedulers made from the model's
scheduler config, as the diffusers documentation does. Per sample the wrapper calls the
pipeline's three methods, in the documented order:

1. ``generate_mask``: noise the source latent to ``mask_encode_strength`` ``num_maps_per_mask``
   times, average ``|eps(target) - eps(source)|`` (both with CFG ``mask_guidance``) over the
   maps and channels, clamp at ``mask_thresholding_ratio`` x its mean, binarise at 0.5;
2. ``invert``: DDIM inversion with the source prompt up to ``inpaint_strength`` (partial
   inversion, CFG ``invert_guidance`` against the empty prompt, the pipeline's default),
   keeping every intermediate latent;
3. ``__call__``: denoise with the target prompt (CFG ``guidance``, negative prompt = the
   source prompt as the docs recommend, see ``negative``), replacing the latent outside the
   mask with the inverted latent of the same step.

Differences from calling the pipeline on a PIL image: the source is the shared preprocessing's
``src`` and its latent comes from the shared encoder (:meth:`oig.diffusion.Diffusion.encode_image`,
``encode: mean`` by default; the pipelines accept latents in place of an image and then skip
their own, sampled, VAE encoding), so every editor starts from the same latent. Every random
draw comes from a CPU ``torch.Generator`` seeded with ``req.seed``, a fresh one per phase.

The mask (latent resolution) is returned upsampled to the image size in
``EditResult.extras["mask"]`` (bool HxW, True = repainted).
"""

from __future__ import annotations

import importlib
import logging

import numpy as np
import torch

from oig.diffusion import Timer
from oig.editor import Editor
from oig.registry import register_editor
from oig.types import EditRequest, EditResult

log = logging.getLogger(__name__)

TESTED_DIFFUSERS = "0.42.1"
DIFFEDIT_AVAILABILITY = (
    "StableDiffusionDiffEditPipeline is deprecated: frozen at diffusers 0.33.1 (no fixes after it), moved to "
    "diffusers/pipelines/deprecated in v0.38.0, and still importable from `diffusers` up to at least "
    f"{TESTED_DIFFUSERS}, the version this wrapper is tested with"
)


def diffusers_pipeline(class_name: str, editor: str, availability: str) -> type:
    """Return ``diffusers.<class_name>`` or raise an ImportError naming the versions that have it."""
    diffusers = importlib.import_module("diffusers")
    try:
        return getattr(diffusers, class_name)
    except (AttributeError, ImportError, RuntimeError) as e:
        version = getattr(diffusers, "__version__", "unknown")
        raise ImportError(
            f"editor {editor!r} needs diffusers.{class_name}, which the installed diffusers {version} does not "
            f"provide ({type(e).__name__}: {e}). {availability}. Install a diffusers that has it, e.g. "
            f"`pip install diffusers=={TESTED_DIFFUSERS}`."
        ) from e


def seeded(seed: int) -> torch.Generator:
    """A fresh CPU generator (the pipelines move CPU draws to the model's device)."""
    return torch.Generator(device="cpu").manual_seed(int(seed))


def upsample_mask(mask: np.ndarray, factor: int, size: tuple[int, int]) -> np.ndarray:
    """Latent-resolution 0/1 mask -> bool mask at image ``size`` (width, height), nearest neighbour."""
    m = np.asarray(mask).astype(bool)
    m = np.repeat(np.repeat(m, factor, axis=0), factor, axis=1)
    if m.shape != (size[1], size[0]):
        raise RuntimeError(f"mask of shape {m.shape} does not match the image size {size[0]}x{size[1]}")
    return m


@register_editor("diffedit")
class DiffEdit(Editor):
    """DiffEdit with the diffusers reference defaults (mask from 10 maps at strength 0.5, threshold
    ratio 3, inpaint strength 0.8, CFG 7.5, 50 steps)."""

    def __init__(
        self,
        steps: int = 50,
        guidance: float = 7.5,
        negative: str = "source",
        num_maps_per_mask: int = 10,
        mask_encode_strength: float = 0.5,
        mask_thresholding_ratio: float = 3.0,
        mask_guidance: float = 7.5,
        inpaint_strength: float = 0.8,
        invert_guidance: float = 7.5,
        resize_mode: str = "keep_aspect",
        encode: str = "mean",
    ):
        super().__init__(steps, guidance, negative, resize_mode, encode)
        if not isinstance(num_maps_per_mask, int) or num_maps_per_mask < 1:
            raise ValueError(f"diffedit num_maps_per_mask must be a positive integer, got {num_maps_per_mask!r}")
        for name, v in (("mask_encode_strength", mask_encode_strength), ("inpaint_strength", inpaint_strength)):
            if not 0 < v <= 1:
                raise ValueError(f"diffedit {name} must be in (0, 1], got {v}")
        if mask_thresholding_ratio <= 0:
            raise ValueError(f"diffedit mask_thresholding_ratio must be positive, got {mask_thresholding_ratio}")
        if int(steps * inpaint_strength) < 1:
            raise ValueError(f"diffedit: int(steps * inpaint_strength) = 0 denoising steps ({steps} x {inpaint_strength})")
        if int(steps * mask_encode_strength) < 1:
            raise ValueError(f"diffedit: int(steps * mask_encode_strength) = 0 ({steps} x {mask_encode_strength}); "
                             "the mask would be computed on the clean latent")
        self.num_maps_per_mask = num_maps_per_mask
        self.mask_encode_strength = mask_encode_strength
        self.mask_thresholding_ratio = mask_thresholding_ratio
        self.mask_guidance = mask_guidance
        self.inpaint_strength = inpaint_strength
        self.invert_guidance = invert_guidance
        self._pipeline_cls = diffusers_pipeline("StableDiffusionDiffEditPipeline", "diffedit", DIFFEDIT_AVAILABILITY)
        self.pipe = None

    def bind(self, models, cache=None, progress: bool = False) -> DiffEdit:
        from diffusers import DDIMInverseScheduler, DDIMScheduler

        super().bind(models, cache, progress)
        self.pipe = self._pipeline_cls(
            vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer, unet=models.unet,
            scheduler=DDIMScheduler.from_config(models.scheduler.config),
            inverse_scheduler=DDIMInverseScheduler.from_config(models.scheduler.config),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        self.pipe.set_progress_bar_config(disable=not progress, leave=False)
        return self

    def edit(self, req: EditRequest, src, timer: Timer) -> EditResult:
        pipe = self.pipe
        with timer("encode"):
            z0 = self.core.encode_image(src, req.seed)
        with timer("mask"):
            mask = pipe.generate_mask(
                image=z0, source_prompt=req.source_prompt, target_prompt=req.target_prompt,
                num_maps_per_mask=self.num_maps_per_mask, mask_encode_strength=self.mask_encode_strength,
                mask_thresholding_ratio=self.mask_thresholding_ratio, num_inference_steps=self.steps,
                guidance_scale=self.mask_guidance, generator=seeded(req.seed), output_type="np",
            )
        with timer("inversion"):
            inv = pipe.invert(
                prompt=req.source_prompt, image=z0, num_inference_steps=self.steps,
                inpaint_strength=self.inpaint_strength, guidance_scale=self.invert_guidance,
                generator=seeded(req.seed),
            ).latents
            self.check_finite(inv, "inversion")
        with timer("sampling"):
            out = pipe(
                prompt=req.target_prompt, mask_image=mask, image_latents=inv, inpaint_strength=self.inpaint_strength,
                num_inference_steps=self.steps, guidance_scale=self.guidance, negative_prompt=self.negative_text(req),
                generator=seeded(req.seed),
            ).images[0]
        m = upsample_mask(mask[0], self.models.vae_scale_factor, src.size)
        if out.size != src.size:
            raise RuntimeError(f"diffedit returned {out.size}, expected the source size {src.size}")
        return EditResult(image=out, source=src, extras={"mask": m}, info={"mask_fraction": float(m.mean())})
