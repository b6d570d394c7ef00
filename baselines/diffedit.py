"""DiffEdit (Couairon et al., ICLR'23): automatic mask, partial DDIM inversion, masked denoising.

DiffEdit has no official code; the diffusers documentation points to its
``StableDiffusionDiffEditPipeline``. Two implementations, chosen with ``mode``:

* ``paper`` (default): the paper's algorithm on the shared core (:mod:`oig.diffusion`).
* ``diffusers``: the diffusers pipeline, called as documented (bit-identical to calling it
  directly).

Both run the same three phases with the same hyperparameters:

1. **Mask.** Noise the source latent to ``mask_encode_strength`` ``num_maps_per_mask`` times,
   average ``|eps(target) - eps(source)|`` (each with CFG ``mask_guidance`` against the empty
   prompt) over the maps and channels, clamp at ``mask_thresholding_ratio`` x its mean, scale to
   [0, 1] and binarise (> 0.5 is repainted). ``paper`` computes it on the core with the pipeline's
   draws and batch layout, so the mask equals ``generate_mask``'s for the same seed (tested).
2. **Inversion.** DDIM inversion up to ``inpaint_strength`` (the first ``int(steps *
   inpaint_strength)`` inverse steps, 1, 21, ..., 781 for 50 steps at 0.8), keeping every
   latent. ``invert_prompt: source`` inverts with the source prompt at CFG ``invert_guidance``
   against the empty prompt (the pipeline's default); ``invert_prompt: empty`` is the paper's
   DDIM encoding with the unconditional model (then ``invert_guidance`` must be 1).
3. **Masked denoising.** DDIM from the last inverted latent with the target prompt (CFG
   ``guidance`` against ``negative``: ``source`` as the diffusers docs advise, ``empty`` as the
   paper's plain CFG). Outside the mask the latent is replaced by the inverted one:

   * ``paper``: after the step t_i -> t_{i+1} by the inverted latent *at t_{i+1}*, and after the
     last step by the clean latent z0 itself, so the final latent equals z0 outside the mask
     exactly;
   * ``diffusers``: the pipeline pastes the inverted latent at t_i (one step noisier) and, after the
     last step, the latent at abar(t=1) instead of z0 (``pipeline_stable_diffusion_diffedit.py``
     lines 1491 and 1516 in diffusers 0.42.1): the background keeps a little noise.

Differences from calling the pipeline on a PIL image: the source is the shared preprocessing's
``src`` and its latent comes from the shared encoder (:meth:`oig.diffusion.Diffusion.encode_image`,
``encode: mean`` by default; the pipelines accept latents in place of an image and then skip
their own, sampled, VAE encoding), so every editor starts from the same latent. Every random
draw comes from a CPU ``torch.Generator`` seeded with ``req.seed``, a fresh one per phase (only
the mask draws noise). Every DDIM scheduler built here has ``clip_sample=False`` and
``set_alpha_to_one=False`` (:func:`oig.models.sd_scheduler`).

The mask (latent resolution) is returned upsampled to the image size in
``EditResult.extras["mask"]`` (bool HxW, True = repainted).
"""

from __future__ import annotations

import importlib
import logging

import numpy as np
import torch

from oig.diffusion import Inversion, Timer
from oig.editor import Editor
from oig.models import sd_scheduler
from oig.registry import register_editor
from oig.types import EditRequest, EditResult

log = logging.getLogger(__name__)

TESTED_DIFFUSERS = "0.42.1"
DIFFEDIT_AVAILABILITY = (
    "StableDiffusionDiffEditPipeline is deprecated: frozen at diffusers 0.33.1 (no fixes after it), moved to "
    "diffusers/pipelines/deprecated in v0.38.0, and still importable from `diffusers` up to at least "
    f"{TESTED_DIFFUSERS}, the version this wrapper is tested with"
)
MODES = ("paper", "diffusers")
INVERT_PROMPTS = ("source", "empty")


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
    ratio 3, inpaint strength 0.8, CFG 7.5, 50 steps), the paper's background blending by default."""

    def __init__(
        self,
        steps: int = 50,
        guidance: float = 7.5,
        negative: str = "source",
        mode: str = "paper",
        num_maps_per_mask: int = 10,
        mask_encode_strength: float = 0.5,
        mask_thresholding_ratio: float = 3.0,
        mask_guidance: float = 7.5,
        inpaint_strength: float = 0.8,
        invert_prompt: str = "source",
        invert_guidance: float = 7.5,
        resize_mode: str = "keep_aspect",
        encode: str = "mean",
    ):
        super().__init__(steps, guidance, negative, resize_mode, encode)
        if mode not in MODES:
            raise ValueError(f"diffedit mode must be one of {MODES}, got {mode!r}")
        if invert_prompt not in INVERT_PROMPTS:
            raise ValueError(f"diffedit invert_prompt must be one of {INVERT_PROMPTS}, got {invert_prompt!r}")
        if invert_prompt == "empty" and invert_guidance != 1:
            raise ValueError(f"diffedit invert_prompt=empty inverts with the unconditional model, where CFG against "
                             f"the empty prompt does nothing; set invert_guidance: 1 (got {invert_guidance})")
        if mode == "diffusers" and mask_guidance <= 1:
            raise ValueError(f"diffedit mode=diffusers: the pipeline's generate_mask fails for guidance_scale <= 1 "
                             f"(mask_guidance={mask_guidance}); use mode=paper or mask_guidance > 1")
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
        self.mode = mode
        self.num_maps_per_mask = num_maps_per_mask
        self.mask_encode_strength = mask_encode_strength
        self.mask_thresholding_ratio = mask_thresholding_ratio
        self.mask_guidance = mask_guidance
        self.inpaint_strength = inpaint_strength
        self.invert_prompt = invert_prompt
        self.invert_guidance = invert_guidance
        # only the diffusers mode needs the deprecated pipeline
        self._pipeline_cls = (diffusers_pipeline("StableDiffusionDiffEditPipeline", "diffedit", DIFFEDIT_AVAILABILITY)
                              if mode == "diffusers" else None)
        self.pipe = None
        self.ddim_scheduler = None

    def bind(self, models, cache=None, progress: bool = False) -> DiffEdit:
        from diffusers import DDIMInverseScheduler, DDIMScheduler

        super().bind(models, cache, progress)
        self.ddim_scheduler = sd_scheduler(DDIMScheduler.from_config(models.scheduler.config), "diffedit")
        self.pipe = None
        if self.mode == "diffusers":
            self.pipe = self._pipeline_cls(
                vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer, unet=models.unet,
                scheduler=self.ddim_scheduler,
                inverse_scheduler=sd_scheduler(DDIMInverseScheduler.from_config(models.scheduler.config), "diffedit"),
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )
            self.pipe.set_progress_bar_config(disable=not progress, leave=False)
        return self

    # ------------------------------------------------------------------ paper mode on the core
    def n_inpaint(self) -> int:
        """Number of inversion (= masked denoising) steps, as the pipeline counts them."""
        return min(int(self.steps * self.inpaint_strength), self.steps)

    @torch.no_grad()
    def compute_mask(self, z0: torch.Tensor, req: EditRequest) -> torch.Tensor:
        """The DiffEdit mask (latent resolution, int 0/1, shape ``(1, h, w)``) on the core, with the draws of the
        pipeline's ``generate_mask`` (one ``(n, c, h, w)`` normal draw from the seeded generator, ``add_noise`` of
        a DDIM scheduler at ``timesteps[steps - int(steps * mask_encode_strength)]``) and CFG against empty prompts.

        The binary mask equals ``generate_mask``'s (tested). The float maps differ by rounding only: the pipeline
        unpacks ``encode_prompt``'s ``(prompt, negative)`` pair in the opposite order, so its "guided" predictions
        are ``(1 - w) * eps(prompt) + w * eps("")`` and its difference map is ``(w - 1) |eps_t - eps_s|`` where this
        one is ``w |eps_t - eps_s|``; the clamp at a multiple of the mean removes any scale. (The same swap makes
        ``generate_mask`` fail for ``guidance_scale <= 1``; here ``mask_guidance <= 1`` means no CFG.)"""
        from diffusers.utils.torch_utils import randn_tensor

        m, n, w = self.models, self.num_maps_per_mask, self.mask_guidance
        cfg = w > 1.0  # the pipeline's test
        self.ddim_scheduler.set_timesteps(self.steps, device=m.device)
        t_start = max(self.steps - min(int(self.steps * self.mask_encode_strength), self.steps), 0)
        t = self.ddim_scheduler.timesteps[t_start]
        lat = z0.to(m.vae.dtype).repeat_interleave(n, dim=0)
        noise = randn_tensor(lat.shape, generator=seeded(req.seed), device=m.device, dtype=m.vae.dtype)
        lat = self.ddim_scheduler.add_noise(lat, noise, t)

        src, tgt = (self.core.encode_text([p]).repeat(n, 1, 1) for p in (req.source_prompt, req.target_prompt))
        if cfg:
            empty = self.core.encode_text([""]).repeat(n, 1, 1)
            emb = torch.cat([empty, src, empty, tgt])
        else:
            emb = torch.cat([src, tgt])
        out = m.unet(torch.cat([lat] * (4 if cfg else 2)), t, encoder_hidden_states=emb).sample
        if cfg:
            neg_s, e_s, neg_t, e_t = out.chunk(4)
            e_s = neg_s + w * (e_s - neg_s)
            e_t = neg_t + w * (e_t - neg_t)
        else:
            e_s, e_t = out.chunk(2)
        diff = torch.abs(e_t - e_s).reshape(1, n, *e_t.shape[-3:]).mean([1, 2])
        clamp = diff.mean() * self.mask_thresholding_ratio
        mask = diff.clamp(0, clamp) / clamp
        return torch.where(mask <= 0.5, 0, 1)

    def invert_source(self, z0: torch.Tensor, req: EditRequest) -> Inversion:
        """Partial DDIM inversion of ``z0`` to ``inpaint_strength``: ``trajectory[k]`` is the latent at sampling
        timestep ``timesteps[steps - n_inpaint() + k]``, ``trajectory[-1]`` is ``z0``."""
        core = self.core
        if self.invert_prompt == "empty":
            cond, neg, w = core.encode_text([""]), None, 1.0
        else:
            cond, neg, w = core.encode_text([req.source_prompt]), core.encode_text([""]), self.invert_guidance
        return core.invert(z0, cond, self.steps, w, neg if w != 1.0 else None, "standard", stop=self.n_inpaint(),
                           keep=True)

    def denoise(self, inv: Inversion, mask: torch.Tensor, req: EditRequest) -> torch.Tensor:
        """Masked DDIM from ``inv.trajectory[0]``: after the step to t_{i+1} the latent outside ``mask`` is the
        inverted latent at t_{i+1}; after the last step it is ``z0``."""
        core, traj = self.core, inv.trajectory
        start = self.steps - self.n_inpaint()
        keep = mask.to(torch.bool).reshape(1, 1, *mask.shape[-2:])
        if len(traj) != self.n_inpaint() + 1:
            raise RuntimeError(f"diffedit: {len(traj)} inverted latents, expected {self.n_inpaint() + 1}")

        def blend(i, t, x_prev, x0_hat):
            return torch.where(keep, x_prev, traj[i - start + 1])

        cond = core.encode_text([req.target_prompt])
        neg = core.encode_text([self.negative_text(req)]) if self.guidance != 1.0 else None
        return core.sample(traj[0], cond, neg, self.guidance, self.steps, start=start, callback=blend,
                           desc="diffedit")

    # ------------------------------------------------------------------ edit
    def edit(self, req: EditRequest, src, timer: Timer) -> EditResult:
        with timer("encode"):
            z0 = self.core.encode_image(src, req.seed)
        if self.mode == "paper":
            with timer("mask"):
                mask = self.compute_mask(z0, req)
            with timer("inversion"):
                inv = self.invert_source(z0, req)
                self.check_finite(inv.xT, "inversion")
            with timer("sampling"):
                z = self.denoise(inv, mask, req)
                self.check_finite(z, "sampling")
                out = self.core.decode_pil(z)
            mask = mask.cpu().numpy()
        else:
            out, mask = self._edit_diffusers(z0, req, timer)
        m = upsample_mask(mask[0], self.models.vae_scale_factor, src.size)
        if out.size != src.size:
            raise RuntimeError(f"diffedit returned {out.size}, expected the source size {src.size}")
        return EditResult(image=out, source=src, extras={"mask": m}, info={"mask_fraction": float(m.mean())})

    def _edit_diffusers(self, z0: torch.Tensor, req: EditRequest, timer: Timer):
        pipe = self.pipe
        with timer("mask"):
            mask = pipe.generate_mask(
                image=z0, source_prompt=req.source_prompt, target_prompt=req.target_prompt,
                num_maps_per_mask=self.num_maps_per_mask, mask_encode_strength=self.mask_encode_strength,
                mask_thresholding_ratio=self.mask_thresholding_ratio, num_inference_steps=self.steps,
                guidance_scale=self.mask_guidance, generator=seeded(req.seed), output_type="np",
            )
        with timer("inversion"):
            inv = pipe.invert(
                prompt=req.source_prompt if self.invert_prompt == "source" else "", image=z0,
                num_inference_steps=self.steps, inpaint_strength=self.inpaint_strength,
                guidance_scale=self.invert_guidance, generator=seeded(req.seed),
            ).latents
            self.check_finite(inv, "inversion")
        with timer("sampling"):
            out = pipe(
                prompt=req.target_prompt, mask_image=mask, image_latents=inv, inpaint_strength=self.inpaint_strength,
                num_inference_steps=self.steps, guidance_scale=self.guidance, negative_prompt=self.negative_text(req),
                generator=seeded(req.seed),
            ).images[0]
        return out, mask
