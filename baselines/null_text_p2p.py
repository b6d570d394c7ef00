"""Null-text inversion (Mokady et al., CVPR'23) and Prompt-to-Prompt editing on top of it.

Null-text inversion, after google/prompt-to-prompt's ``null_text_w_ptp.ipynb`` (as ported in
diffusers' community ``pipeline_null_text_inversion.py`` and cure-lab/PnPInversion's
``NullInversion``):

1. Pivot: DDIM inversion of the source with the source prompt, guidance 1, standard index
   convention, every latent kept: ``z*_T, ..., z*_0``.
2. For sampling step ``i`` (timestep ``t``) in order, starting from ``x = z*_T`` and the
   previous step's embedding (initially the embedding of ``negative``, ``""``): optimise the
   unconditional embedding ``∅_t`` with Adam (lr ``lr · (1 − i/100)``) for up to
   ``inner_steps`` iterations of ``MSE(DDIM(x, ε_∅ + w (ε_cond − ε_∅)), z*_{t−1})``, stopping
   once a loss is below ``early_stop + i · 2e-5``; then advance ``x`` by one guided DDIM step
   with the optimised ``∅_t``. The embedding and the loss are kept in fp32 (the U-Net runs in
   the model dtype; use fp32 models, as the reference insists) and the loop is deterministic.
   Results are cached per image through the core's :class:`~oig.cache.InversionCache` with
   ``kind="null_text"`` and the optimisation parameters in the key.
3. Edit: denoise ``[source, target]`` from ``z*_T`` with ``∅_t`` as the negative of both rows
   at each step and :class:`~oig.p2p.PromptToPrompt` installed (``cross_replace`` 0.4,
   ``self_replace`` 0.6 as in PnPInversion's PIE-Bench runs).

Registered editors: ``null_text_p2p``; ``null_text`` (inversion + reconstruction with the
source prompt only); ``ddim_p2p`` (P2P over the plain DDIM pivot with ``∅ = negative``, i.e.
PnPInversion's ``ddim+p2p``: null-text with zero inner steps). All three return the source
row as ``reconstruction``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from oig.diffusion import Diffusion, Timer
from oig.editor import EditError, Editor
from oig.p2p import PromptToPrompt
from oig.registry import register_editor
from oig.types import EditRequest, EditResult

log = logging.getLogger(__name__)


def check_fp32(models, allow_half: bool, editor: str):
    """Null-text inversion optimises the unconditional embedding through the U-Net; the reference
    (and PIE-Bench's runner) does it in fp32. A half-precision model is refused unless forced."""
    if models.dtype == torch.float32:
        return
    if not allow_half:
        raise ValueError(f"{editor}: null-text inversion needs an fp32 model (got {models.dtype}); the reference "
                         "optimises the null-text embedding in fp32 and half precision degrades the reconstruction. "
                         "Run with dtype=fp32, or set method.allow_half=true to force it.")
    log.warning("%s: null-text optimisation with a %s U-Net (allow_half=true); the reference uses fp32",
                editor, models.dtype)


@dataclass
class NullTextInversion:
    """``xT`` the pivot's noise, ``uncond[i]`` the optimised ``[1, L, D]`` embedding of step ``i``."""

    z0: torch.Tensor
    xT: torch.Tensor
    uncond: list[torch.Tensor]
    from_cache: bool = False


def optimise_null_text(core: Diffusion, pivot: list[torch.Tensor], cond: torch.Tensor, uncond: torch.Tensor,
                       steps: int, guidance: float = 7.5, inner_steps: int = 10, lr: float = 1e-2,
                       early_stop: float = 1e-5) -> list[torch.Tensor]:
    """Per-step unconditional embeddings (fp32) reproducing the ``pivot`` trajectory
    (``pivot[k]`` = latent at sampling timestep ``k``, ``pivot[steps]`` = the clean latent)."""
    ts, d = core.timesteps(steps), core.step_size(steps)
    dt = core.m.dtype
    u = uncond.detach().float()
    x = pivot[0]
    out = []
    for i, t in enumerate(tqdm(ts, desc="null-text", disable=not core.progress, leave=False)):
        u = u.detach().clone()
        if inner_steps > 0:
            u.requires_grad_(True)
            opt = torch.optim.Adam([u], lr=lr * (1.0 - i / 100.0))
            target = pivot[i + 1].float()
            with torch.no_grad():
                e_cond = core.eps(x, t, cond)
            with torch.enable_grad():
                for _ in range(inner_steps):
                    e_u = core.eps(x, t, u.to(dt))
                    e = e_u + guidance * (e_cond - e_u)
                    x_prev, _ = core.ddim_step(x, e, t, t - d)
                    loss = F.mse_loss(x_prev.float(), target)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    if loss.item() < early_stop + i * 2e-5:
                        break
            u = u.detach()
        out.append(u)
        with torch.no_grad():
            x, _ = core.ddim_step(x, core.eps(x, t, cond, u.to(dt), guidance), t, t - d)
    return out


def null_text_invert(core: Diffusion, img, prompt: str, steps: int = 50, guidance: float = 7.5,
                     inner_steps: int = 10, lr: float = 1e-2, early_stop: float = 1e-5, negative: str = "",
                     seed: int = 0) -> NullTextInversion:
    """Null-text inversion of a *prepared* image, through the core's cache when it has one."""
    key = None
    if core.cache is not None:
        key = core.cache.key(
            model=core.m.fingerprint(), dtype=str(core.m.dtype), image=core.image_key(img), size=img.size,
            resize=core.resize_mode, encode=core.encode_mode, seed=seed if core.encode_mode == "sample" else None,
            prompt=prompt, negative=negative, guidance=guidance, steps=steps, convention="standard",
            kind="null_text", inner_steps=inner_steps, lr=lr, early_stop=early_stop,
        )
        hit = core.cache.get(key, core.m.device)
        if hit is not None:
            return NullTextInversion(hit["z0"].to(core.m.dtype), hit["xT"].to(core.m.dtype),
                                     list(hit["uncond"].float().unbind(0)), from_cache=True)
    z0 = core.encode_image(img, seed)
    cond = core.encode_text([prompt])
    pivot = core.invert(z0, cond, steps, guidance=1.0, convention="standard", keep=True)
    uncond = optimise_null_text(core, pivot.trajectory, cond, core.encode_text([negative]), steps, guidance,
                                inner_steps, lr, early_stop)
    res = NullTextInversion(pivot.z0, pivot.xT, uncond)
    if core.cache is not None:
        core.cache.put(key, {"z0": res.z0, "xT": res.xT, "uncond": torch.stack(uncond)})
    return res


def denoise(core: Diffusion, x: torch.Tensor, cond: torch.Tensor, negs, guidance: float, steps: int,
            controller=None) -> torch.Tensor:
    """DDIM from ``x`` with a negative embedding per step (``negs[i]``, ``[1, L, D]``, expanded to
    the batch) or one for all steps; ``controller`` gets ``begin_step`` and ``step_callback``."""
    if isinstance(negs, torch.Tensor):
        neg = negs.expand(x.shape[0], -1, -1)
        callback = (lambda i, t, x_new, x0: controller.step_callback(i, x_new)) if controller is not None else None
        return core.sample(x, cond, neg, guidance, steps, callback=callback,
                           unet_kwargs=controller.unet_kwargs if controller is not None else None)
    ts, d = core.timesteps(steps), core.step_size(steps)
    if len(negs) != len(ts):
        raise ValueError(f"{len(negs)} null-text embeddings for {len(ts)} steps")
    with torch.no_grad():
        for i, t in enumerate(tqdm(ts, desc="sample", disable=not core.progress, leave=False)):
            if controller is not None:
                controller.begin_step(i, t)
            neg = negs[i].to(core.m.dtype).expand(x.shape[0], -1, -1)
            x_new, _ = core.ddim_step(x, core.eps(x, t, cond, neg, guidance), t, t - d)
            if controller is not None:
                r = controller.step_callback(i, x_new)
                if r is not None:
                    x_new = r
            x = x_new
    return x


class _P2P(Editor):
    """Prompt-to-Prompt over an inversion chosen by the subclass (see :class:`~oig.p2p.PromptToPrompt`
    for ``edit_type``, ``reweight_words``, ``blend_words`` and ``missing_words``)."""

    #: numbers that also take a list ([start, end] windows): a sweep over them is a list of windows
    list_params = ("cross_replace", "self_replace")

    has_reconstruction = True

    def __init__(self, steps: int = 50, guidance: float = 7.5, negative: str = "empty", edit_type: str = "auto",
                 cross_replace=0.4, self_replace=0.6, self_replace_res: float = 0.5, blend_words=None,
                 blend_threshold: float = 0.3, blend_start: float = 0.2, reweight_words=None,
                 reweight_value: float = 2.0, missing_words: str = "error", mapper: str = "aligned",
                 resize_mode: str = "keep_aspect", encode: str = "mean"):
        super().__init__(steps, guidance, negative, resize_mode, encode)
        if edit_type == "reweight":
            raise ValueError("P2P edit_type=reweight is no longer a base edit: set edit_type to auto, replace or "
                             "refine and reweight_words to auto (the old behaviour), dataset or a list of words")
        if edit_type not in ("auto", "replace", "refine"):
            raise ValueError(f"unknown P2P edit_type {edit_type!r}; use auto, replace or refine")
        if missing_words not in ("error", "ignore"):
            raise ValueError(f"unknown P2P missing_words {missing_words!r}; use error or ignore")
        if mapper not in ("aligned", "reference"):
            raise ValueError(f"unknown P2P mapper {mapper!r}; use aligned or reference")
        self.mapper = mapper
        self.edit_type = edit_type
        self.cross_replace = cross_replace if isinstance(cross_replace, (int, float)) else list(cross_replace)
        self.self_replace = self_replace if isinstance(self_replace, (int, float)) else list(self_replace)
        self.self_replace_res = self_replace_res
        self.blend_words = blend_words if blend_words is None or isinstance(blend_words, str) else \
            [w if isinstance(w, str) else list(w) for w in blend_words]
        self.blend_threshold = blend_threshold
        self.blend_start = blend_start
        self.reweight_words = reweight_words if reweight_words is None or isinstance(reweight_words, str) \
            else list(reweight_words)
        self.reweight_value = reweight_value
        self.missing_words = missing_words

    def controller(self, req: EditRequest) -> PromptToPrompt:
        """The P2P controller of one request (per-sample words from ``req.edit_words()``)."""
        return PromptToPrompt(self.core.m.tokenizer, req.source_prompt, req.target_prompt, self.steps,
                              self.edit_type, self.cross_replace, self.self_replace, self.self_replace_res,
                              self.reweight_words, self.reweight_value, self.blend_words, self.blend_threshold,
                              self.blend_start, edit_words=req.edit_words(), missing_words=self.missing_words,
                              mapper=self.mapper)

    def invert(self, req: EditRequest, src, timer: Timer):
        """Returns ``(xT, negatives, from_cache)``: a tensor or a per-step list of embeddings."""
        raise NotImplementedError

    def edit(self, req: EditRequest, src, timer: Timer) -> EditResult:
        c = self.core
        xT, negs, cached = self.invert(req, src, timer)
        try:
            ctrl = self.controller(req)
        except ValueError as e:
            raise EditError(f"prompt-to-prompt: {e}") from e
        ctrl.latent_hw = tuple(xT.shape[-2:])
        with timer("sampling"):
            cond = c.encode_text([req.source_prompt, req.target_prompt])
            with ctrl.install(c.m.unet):
                z = denoise(c, torch.cat([xT, xT]), cond, negs, self.guidance, self.steps, ctrl)
            self.check_finite(z, "sampling")
            out, rec = c.decode_pil(z[1:]), c.decode_pil(z[:1])
        extras = {"latent": z[1:], "source_latent": z[:1]}
        mask = ctrl.blend_mask(z.shape)
        if mask is not None:
            extras["blend_mask"] = mask[1, 0]  # the last step's LocalBlend mask of the target (latent size)
        return EditResult(image=out, source=src, reconstruction=rec, extras=extras,
                          info={"inversion_cached": cached, "p2p_edit": ctrl.base_type,
                                "p2p_blend_words": " | ".join(" ".join(w) for w in ctrl.blend_words)
                                if ctrl.blend_words else "", "p2p_reweight_words": " ".join(ctrl.reweight_words)})


@register_editor("ddim_p2p")
class DDIMP2P(_P2P):
    """Prompt-to-Prompt over plain DDIM inversion (source prompt, guidance 1), ``∅ = negative``."""

    def invert(self, req, src, timer):
        c = self.core
        with timer("inversion"):
            inv = c.invert_image(src, req.source_prompt, self.steps, convention="standard", seed=req.seed)
        return inv.xT, c.encode_text([self.negative_text(req)]), inv.from_cache


@register_editor("null_text_p2p")
class NullTextP2P(_P2P):
    """Null-text inversion + Prompt-to-Prompt (the reference's ``null_text_w_ptp`` recipe)."""

    def __init__(self, steps: int = 50, guidance: float = 7.5, negative: str = "empty", edit_type: str = "auto",
                 cross_replace=0.4, self_replace=0.6, self_replace_res: float = 0.5, blend_words=None,
                 blend_threshold: float = 0.3, blend_start: float = 0.2, reweight_words=None,
                 reweight_value: float = 2.0, missing_words: str = "error", mapper: str = "aligned",
                 inner_steps: int = 10, lr: float = 1e-2, early_stop: float = 1e-5, allow_half: bool = False,
                 resize_mode: str = "keep_aspect", encode: str = "mean"):
        super().__init__(steps, guidance, negative, edit_type, cross_replace, self_replace, self_replace_res,
                         blend_words, blend_threshold, blend_start, reweight_words, reweight_value, missing_words,
                         mapper, resize_mode, encode)
        self.inner_steps = inner_steps
        self.lr = lr
        self.early_stop = early_stop
        self.allow_half = allow_half

    def bind(self, models, cache=None, progress: bool = False):
        check_fp32(models, self.allow_half, "null_text_p2p")
        return super().bind(models, cache, progress)

    def invert(self, req, src, timer):
        with timer("inversion"):
            nt = null_text_invert(self.core, src, req.source_prompt, self.steps, self.guidance, self.inner_steps,
                                  self.lr, self.early_stop, self.negative_text(req), req.seed)
        return nt.xT, nt.uncond, nt.from_cache


@register_editor("null_text")
class NullText(Editor):
    """Null-text inversion and its reconstruction with the source prompt (the edit *is* the reconstruction)."""

    has_reconstruction = True

    def __init__(self, steps: int = 50, guidance: float = 7.5, negative: str = "empty", inner_steps: int = 10,
                 lr: float = 1e-2, early_stop: float = 1e-5, allow_half: bool = False,
                 resize_mode: str = "keep_aspect", encode: str = "mean"):
        super().__init__(steps, guidance, negative, resize_mode, encode)
        self.inner_steps = inner_steps
        self.lr = lr
        self.early_stop = early_stop
        self.allow_half = allow_half

    def bind(self, models, cache=None, progress: bool = False):
        check_fp32(models, self.allow_half, "null_text")
        return super().bind(models, cache, progress)

    def edit(self, req: EditRequest, src, timer: Timer) -> EditResult:
        c = self.core
        with timer("inversion"):
            nt = null_text_invert(c, src, req.source_prompt, self.steps, self.guidance, self.inner_steps, self.lr,
                                  self.early_stop, self.negative_text(req), req.seed)
        with timer("sampling"):
            z = denoise(c, nt.xT, c.encode_text([req.source_prompt]), nt.uncond, self.guidance, self.steps)
            self.check_finite(z, "sampling")
            rec = c.decode_pil(z)
        return EditResult(image=rec, source=src, reconstruction=rec, extras={"latent": z},
                          info={"inversion_cached": nt.from_cache})
