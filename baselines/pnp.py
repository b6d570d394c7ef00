"""Plug-and-Play diffusion features (Tumanyan et al., CVPR'23), after MichalGeyer/pnp-diffusers.

1. DDIM-invert the source (standard index convention, prompt ``inversion_prompt`` — ``""`` as
   pnp-diffusers' ``inversion_prompt`` default; PIE-Bench's runner inverts with the source
   prompt — guidance 1), keeping the latent at every timestep. ``inversion_steps: null``
   inverts with as many steps as the sampling (50: PIE-Bench's re-run); ``999`` is the
   reference preprocessing, whose latents are then read at the 50 sampling timesteps (any
   count whose timesteps include the sampling ones works).
2. The source branch (``source_branch``) gives the source row's latent at every sampling step:

   * ``inversion`` (pnp-diffusers; PIE-Bench's ``directinversion+pnp`` row): the *inverted*
     latent at that timestep; sampling starts from the inverted latent at the first sampling
     timestep.
   * ``reconstruction`` (PIE-Bench's ``ddim+pnp`` row, ``run_editing_pnp.py:144-156,377-427``):
     an unguided DDIM reconstruction with the inversion prompt runs over the sampling timesteps
     from the inverted latent at the first one (PIE-Bench: 50 inversion steps, so the inverted
     noise), and at step ``i`` (timestep ``t_i``) the source row reads the reconstruction
     latent *after* step ``i``, at ``abar(t_{i+1})``: one step less noisy than ``t_i`` (the
     runner reverses the list of its sampling loop's outputs and indexes it as if it held the
     inputs). The target starts from the first of them (at ``abar(t_1)``, denoised as if it
     were at ``t_0``); the last step's source is the reconstructed clean latent.

   ``EditResult.extras["source_latents"]`` holds the source row's latent of every step.

3. Sample the batch ``[source, neg·target, cond·target]``: the source row with the text
   ``source_text``, unguided (``empty``: ``""``, pnp-diffusers' and PIE-Bench's
   ``pnp_guidance_embeds`` whatever the inversion prompt; ``inversion``: the inversion prompt),
   the two target rows the CFG pair (``guidance`` 7.5, ``negative`` defaulting to
   pnp-diffusers' "ugly, blurry, black, low res, unrealistic"), one U-Net call per step.
4. For the first ``int(steps · pnp_f_t)`` steps the source row's residual-branch output (conv2,
   before the skip connection) of the feature ResNet replaces both target rows'; for the
   first ``int(steps · pnp_attn_t)`` steps the source row's self-attention queries and keys
   replace the targets' (values stay the target's) in the injected decoder layers.

Layer mapping (``auto``), valid for any SD-shaped U-Net:

* feature ResNet: ``up_blocks[1].resnets[1]`` — the reference layer in SD 1.x/2.x, and present
  in the toy U-Net and the tiny test U-Net; if a U-Net lacks it, the last ResNet of
  ``up_blocks[min(1, n_up - 1)]``.
* attention: every decoder (``up_blocks``) self-attention layer except the first one. In SD
  these are ``up_blocks[1].attentions[1:]`` and ``up_blocks[2:].attentions[:]`` — the
  reference's "blocks 4-11 of the decoder", i.e. all but the first attention block of the
  coarsest attention-bearing decoder level.

Both accept explicit module names instead (``feature_layer``: a ResNet block name;
``attn_layers``: a list of ``...attn1`` names).
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from oig.attn_control import AttentionController, AttnLayer
from oig.diffusion import Timer
from oig.editor import Editor
from oig.features import FeatureHooks, resnet_layers
from oig.registry import register_editor
from oig.types import EditRequest, EditResult

log = logging.getLogger(__name__)

PNP_NEGATIVE = "ugly, blurry, black, low res, unrealistic"


def prompt_text(spec: str, req: EditRequest) -> str:
    """``source`` -> the source prompt, ``target`` -> the target prompt, ``empty`` -> "", else verbatim."""
    return {"source": req.source_prompt, "target": req.target_prompt, "empty": ""}.get(spec, spec)


def pnp_feature_layer(unet) -> str:
    """The ResNet block whose feature PnP injects (see the module docstring)."""
    up = unet.up_blocks
    b = 1 if len(up) > 1 else 0
    r = 1 if len(up[b].resnets) > 1 else len(up[b].resnets) - 1
    return f"up_blocks.{b}.resnets.{r}"


def pnp_attn_layers(layers: list[AttnLayer]) -> list[AttnLayer]:
    """Decoder self-attention layers but the first (SD: the reference's decoder blocks 4-11)."""
    dec = [layer for layer in layers if layer.place == "up" and not layer.is_cross]
    return dec[1:]


class PnPControl(AttentionController):
    """Injects the source row's self-attention q/k and one ResNet feature into the target rows
    of the batch ``[source, neg·target, cond·target]``."""

    halves = 1

    def __init__(self, feature_steps: int, attn_steps: int, attn_layers="auto"):
        super().__init__()
        self.feature_steps, self.attn_steps, self.attn_spec = feature_steps, attn_steps, attn_layers
        self.qk_layers: set[int] = set()

    def setup(self, layers):
        if self.attn_spec == "auto":
            chosen = pnp_attn_layers(layers)
        else:
            by_name = {layer.name: layer for layer in layers}
            names = [self.attn_spec] if isinstance(self.attn_spec, str) else list(self.attn_spec)
            bad = [n for n in names if n not in by_name or by_name[n].is_cross]
            if bad:
                raise ValueError(f"pnp attn_layers: not self-attention modules of this U-Net: {bad}; available: "
                                 f"{[layer.name for layer in layers if not layer.is_cross]}")
            chosen = [by_name[n] for n in names]
        self.qk_layers = {layer.index for layer in chosen}

    def active(self, layer):
        return layer.index in self.qk_layers and self.step < self.attn_steps

    def edit_qkv(self, layer, q, k, v):
        idx = self.source_rows(q.shape[0]).to(q.device)
        return q[idx], k[idx], v

    def replace_feature(self, name: str, out: torch.Tensor):
        if self.step < self.feature_steps:
            return out[self.source_rows(out.shape[0]).to(out.device)]
        return None


SOURCE_BRANCHES = ("inversion", "reconstruction")


@register_editor("pnp")
class PnP(Editor):
    """Plug-and-Play real-image editing (see the module docstring)."""

    def __init__(self, steps: int = 50, guidance: float = 7.5, negative: str = PNP_NEGATIVE,
                 inversion_prompt: str = "empty", inversion_steps: int | None = None,
                 source_branch: str = "inversion", source_text: str = "empty", pnp_f_t: float = 0.8,
                 pnp_attn_t: float = 0.5, feature_layer: str = "auto", attn_layers="auto",
                 resize_mode: str = "keep_aspect", encode: str = "mean"):
        super().__init__(steps, guidance, negative, resize_mode, encode)
        for n, v in (("pnp_f_t", pnp_f_t), ("pnp_attn_t", pnp_attn_t)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"pnp: {n} must be in [0, 1], got {v}")
        if source_branch not in SOURCE_BRANCHES:
            raise ValueError(f"pnp: source_branch must be one of {list(SOURCE_BRANCHES)}, got {source_branch!r}")
        self.inversion_prompt = inversion_prompt
        self.inversion_steps = inversion_steps
        self.source_branch = source_branch
        self.source_text = source_text
        self.pnp_f_t = pnp_f_t
        self.pnp_attn_t = pnp_attn_t
        self.feature_layer = feature_layer
        self.attn_layers = attn_layers if isinstance(attn_layers, str) else list(attn_layers)

    def _inversion_steps(self) -> int:
        return self.steps if self.inversion_steps is None else int(self.inversion_steps)

    def _source_latents(self, inv, ts: list[int]) -> list[torch.Tensor]:
        """The inverted latent at each sampling timestep."""
        n = self._inversion_steps()
        if n == self.steps:
            return inv.trajectory[: len(ts)]
        pos = {t: k for k, t in enumerate(self.core.timesteps(n))}
        missing = [t for t in ts if t not in pos]
        if missing:
            raise ValueError(f"pnp: inversion_steps={n} has no latent at sampling timesteps "
                             f"{missing[:5]} (steps={self.steps}); use inversion_steps: null (= steps) or 999")
        return [inv.trajectory[pos[t]] for t in ts]

    def _reconstruction_latents(self, x: torch.Tensor, cond: torch.Tensor) -> list[torch.Tensor]:
        """PIE-Bench's ``ddim+pnp`` source latents: the outputs of an unguided DDIM reconstruction
        from ``x`` (the inverted latent at the first sampling timestep) with ``cond``, one per
        step; entry ``i`` (after step ``i``) is what the source row reads at step ``i``."""
        out: list[torch.Tensor] = []

        def keep(i, t, x_prev, x0):
            out.append(x_prev)

        self.core.sample(x, cond, steps=self.steps, callback=keep, desc="pnp reconstruction")
        return out

    def source_prompt_text(self, req: EditRequest) -> str:
        """The source row's text: ``inversion`` -> the inversion prompt, else as :func:`prompt_text`."""
        if self.source_text == "inversion":
            return prompt_text(self.inversion_prompt, req)
        return prompt_text(self.source_text, req)

    def edit(self, req: EditRequest, src, timer: Timer) -> EditResult:
        c, unet = self.core, self.core.m.unet
        inv_prompt = prompt_text(self.inversion_prompt, req)
        with timer("inversion"):
            inv = c.invert_image(src, inv_prompt, self._inversion_steps(), convention="standard", keep=True,
                                 seed=req.seed)
        ts, d = c.timesteps(self.steps), c.step_size(self.steps)
        source = self._source_latents(inv, ts)
        if self.source_branch == "reconstruction":
            with timer("reconstruction"):
                source = self._reconstruction_latents(source[0], c.encode_text([inv_prompt]))
        feature = (pnp_feature_layer(unet) if self.feature_layer == "auto"
                   else resnet_layers(unet, [self.feature_layer])[0])
        ctrl = PnPControl(int(self.steps * self.pnp_f_t), int(self.steps * self.pnp_attn_t), self.attn_layers)
        ctrl.total_steps = self.steps
        with timer("sampling"):
            emb = torch.cat([c.encode_text([self.source_prompt_text(req)]), c.encode_text([self.negative_text(req)]),
                             c.encode_text([req.target_prompt])])
            x = source[0]
            hooks = FeatureHooks(unet, [feature], store=False, replace=ctrl.replace_feature)
            with torch.no_grad(), ctrl.install(unet), hooks:
                for i, t in enumerate(tqdm(ts, desc="pnp", disable=not c.progress, leave=False)):
                    ctrl.begin_step(i, t)
                    out = c.eps(torch.cat([source[i], x, x]), t, emb)  # one U-Net call, no CFG mixing
                    _, e_neg, e_cond = out.chunk(3)
                    e = e_neg + self.guidance * (e_cond - e_neg)
                    x, _ = c.ddim_step(x, e, t, t - d)
            self.check_finite(x, "sampling")
            out_img = c.decode_pil(x)
        return EditResult(image=out_img, source=src, extras={"latent": x, "feature_layer": feature,
                                                              "source_latents": source},
                          info={"inversion_cached": inv.from_cache})
