"""MasaCtrl: mutual self-attention control (Cao et al., ICCV'23), after TencentARC/MasaCtrl.

Real-image editing as the reference's ``playground_real.ipynb`` and PIE-Bench's
``run_editing_masactrl.py`` do it:

1. DDIM-invert the source with ``inversion_prompt`` (reference: ``""``) at
   ``inversion_guidance`` 7.5 with ``""`` as the unconditional prompt (``MasaCtrlPipeline.invert``
   hard-codes it), 50 steps, standard index convention. With the default empty prompt the CFG
   pair is ``eps("")`` twice, so the guidance changes nothing but the cost; ``1.0`` gives the
   same inversion with one U-Net call per step.
2. Denoise ``[source, target]`` from the same inverted noise with prompts
   ``[inversion_prompt, target_prompt]``, CFG ``guidance`` 7.5 with ``negative`` (reference:
   ``""``) for both rows. The batch is ``[neg·src, neg·tgt, cond·src, cond·tgt]``.
3. From step ``start_step`` (4) on, in the self-attention of transformer layers
   ``>= start_layer`` (10 of SD's 16: the last six decoder layers), the target rows' queries
   attend to the source row's keys and values of the same CFG half (both halves).
   Cross-attention is untouched. ``source_from_inversion: true`` feeds the source row the
   inverted latent of each step instead (the reference's ``ref_intermediate_latents`` option;
   the reconstruction is then the last step's output from the inverted latent of the last timestep).

Layer rule for other U-Nets: ``start_layer`` counts SD's ``ref_layers = 16`` transformer
layers (down, mid, up in call order); a U-Net with ``T`` transformer layers controls layers
``>= floor(start_layer · T / ref_layers + 1/2)`` (the toy U-Net: 7 layers -> from 4; the tiny
test U-Net: 4 -> from 3). ``start_step`` is an absolute step index, as in the reference.

``mask_guided: true`` is ``MutualSelfAttentionControlMaskAuto``: during the controlled layers
the cross-attention maps of the current step stored so far at the coarsest down/up
cross-attention level (SD: 16x16), averaged over heads and layers, give a source mask (token
positions ``mask_ref_tokens`` of the conditional source row) and a target mask
(``mask_cur_tokens`` of the conditional target row), each min-max normalised and thresholded
at ``mask_threshold``; target queries inside the target mask attend only to source keys inside
the source mask, the others only to source keys outside it.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from oig.attn_control import AttentionController, blend_level, sdpa_rows
from oig.diffusion import Timer
from oig.editor import Editor
from oig.registry import register_editor
from oig.types import EditRequest, EditResult

from .pnp import prompt_text

log = logging.getLogger(__name__)


def first_controlled_layer(start_layer: int, n_layers: int, ref_layers: int = 16) -> int:
    if n_layers == ref_layers:
        return start_layer
    return math.floor(start_layer * n_layers / ref_layers + 0.5)


class MutualSelfAttention(AttentionController):
    """Target self-attention queries use the source's keys/values (batch ``[u_s, u_t, c_s, c_t]``)."""

    halves = 2

    def __init__(self, start_step: int = 4, start_layer: int = 10, ref_layers: int = 16, mask_guided: bool = False,
                 mask_threshold: float = 0.1, mask_ref_tokens=(1,), mask_cur_tokens=(1,)):
        super().__init__()
        self.start_step, self.start_layer, self.ref_layers = start_step, start_layer, ref_layers
        self.mask_guided, self.mask_threshold = mask_guided, mask_threshold
        self.mask_ref_tokens, self.mask_cur_tokens = list(mask_ref_tokens), list(mask_cur_tokens)
        self.mutual_layers: set[int] = set()
        self.first_layer = None

    def setup(self, layers):
        n = max(layer.transformer for layer in layers) + 1
        self.first_layer = first_controlled_layer(self.start_layer, n, self.ref_layers)
        self.mutual_layers = {l.index for l in layers if not l.is_cross and l.transformer >= self.first_layer}
        if self.mask_guided:
            lv = blend_level(layers)
            self.store_layers = {l.index for l in layers if l.is_cross and l.place != "mid" and l.level == lv}

    def mutual(self, layer) -> bool:
        return layer.index in self.mutual_layers and self.step >= self.start_step

    def active(self, layer):
        return self.mutual(layer) or layer.index in self.store_layers

    def needs_probs(self, layer):
        return layer.index in self.store_layers

    def edit_qkv(self, layer, q, k, v):
        if not self.mutual(layer):
            return q, k, v
        idx = self.source_rows(q.shape[0]).to(q.device)
        return q, k[idx], v[idx]

    # ------------------------------------------------------------------ mask-guided variant
    def _masks(self, layer):
        """Binary ``[tokens]`` source (keys) and target (queries) masks at ``layer``'s resolution."""
        stored = [self.maps[i] for i in sorted(self.maps) if i < layer.index]
        if not stored or self.latent_hw is None:
            return None
        agg = torch.stack(stored).mean(0)  # [batch, n, tokens]
        h, w = self.layers[min(self.maps)].hw(self.latent_hw)
        agg = agg.reshape(agg.shape[0], h, w, agg.shape[-1])

        def norm(img):
            lo = img.amin(dim=(1, 2), keepdim=True)
            hi = img.amax(dim=(1, 2), keepdim=True)
            return (img - lo) / (hi - lo).clamp_min(torch.finfo(img.dtype).tiny)

        size = layer.hw(self.latent_hw)
        out = []
        for tokens, row in ((self.mask_ref_tokens, -2), (self.mask_cur_tokens, -1)):
            img = norm(agg[..., tokens].sum(-1))[row]
            m = F.interpolate(img[None, None], size=size).flatten()
            out.append((m >= self.mask_threshold).to(img.dtype))
        return out

    def attend(self, layer, attn, q, k, v):
        if not (self.mask_guided and self.mutual(layer)):
            return None
        masks = self._masks(layer)
        if masks is None:
            return None
        mask_s, mask_t = masks
        out = sdpa_rows(attn, q, k, v)  # source rows: own K/V; target rows: source K/V, no mask
        rows = self.target_rows(q.shape[0])
        hd = q.shape[-1] // attn.heads
        qh, kh, vh = (x[rows].view(len(rows), -1, attn.heads, hd).transpose(1, 2) for x in (q, k, v))
        sim = (qh @ kh.transpose(-1, -2)).float() * attn.scale
        lo = torch.finfo(sim.dtype).min
        fg = sim.masked_fill(mask_s.to(sim.device)[None, None, None, :] == 0, lo).softmax(-1).to(vh.dtype) @ vh
        bg = sim.masked_fill(mask_s.to(sim.device)[None, None, None, :] == 1, lo).softmax(-1).to(vh.dtype) @ vh
        m = mask_t.to(fg)[None, None, :, None]
        o = fg * m + bg * (1 - m)
        out[rows] = o.transpose(1, 2).reshape(len(rows), -1, attn.heads * hd).to(out.dtype)
        return out


@register_editor("masactrl")
class MasaCtrl(Editor):
    """MasaCtrl real-image editing; the source row of the batch is the reconstruction."""

    has_reconstruction = True

    def __init__(self, steps: int = 50, guidance: float = 7.5, negative: str = "empty",
                 inversion_prompt: str = "empty", inversion_guidance: float = 7.5, inversion: str = "standard",
                 start_step: int = 4, start_layer: int = 10, ref_layers: int = 16, mask_guided: bool = False,
                 mask_threshold: float = 0.1, mask_ref_tokens=(1,), mask_cur_tokens=(1,),
                 source_from_inversion: bool = False, resize_mode: str = "keep_aspect", encode: str = "mean"):
        super().__init__(steps, guidance, negative, resize_mode, encode)
        if source_from_inversion and inversion != "standard":
            raise ValueError("masactrl: source_from_inversion needs inversion: standard")
        self.inversion_prompt = inversion_prompt
        self.inversion_guidance = inversion_guidance
        self.inversion = inversion
        self.start_step = start_step
        self.start_layer = start_layer
        self.ref_layers = ref_layers
        self.mask_guided = mask_guided
        self.mask_threshold = mask_threshold
        self.mask_ref_tokens = [int(t) for t in mask_ref_tokens]
        self.mask_cur_tokens = [int(t) for t in mask_cur_tokens]
        self.source_from_inversion = source_from_inversion

    def edit(self, req: EditRequest, src, timer: Timer) -> EditResult:
        c = self.core
        src_prompt = prompt_text(self.inversion_prompt, req)
        with timer("inversion"):
            inv = c.invert_image(src, src_prompt, self.steps, guidance=self.inversion_guidance, negative="",
                                 convention=self.inversion, keep=self.source_from_inversion, seed=req.seed)
        ctrl = MutualSelfAttention(self.start_step, self.start_layer, self.ref_layers, self.mask_guided,
                                   self.mask_threshold, self.mask_ref_tokens, self.mask_cur_tokens)
        ctrl.latent_hw = tuple(inv.xT.shape[-2:])
        ctrl.total_steps = self.steps
        callback = None
        if self.source_from_inversion:
            def callback(i, t, x_new, x0):
                # the reference swaps the source row for ref_intermediate_latents[-1 - i] before
                # every U-Net call (diffuser_utils.py:169-174): after the last step it keeps its output
                if i + 1 < self.steps:
                    return torch.cat([inv.trajectory[i + 1], x_new[1:]])
                return None
        with timer("sampling"):
            cond = c.encode_text([src_prompt, req.target_prompt])
            neg = c.encode_text([self.negative_text(req)] * 2)
            with ctrl.install(c.m.unet):
                z = c.sample(torch.cat([inv.xT, inv.xT]), cond, neg, self.guidance, self.steps, callback=callback,
                             unet_kwargs=ctrl.unet_kwargs, desc="masactrl")
            self.check_finite(z, "sampling")
            out, rec = c.decode_pil(z[1:]), c.decode_pil(z[:1])
        return EditResult(image=out, source=src, reconstruction=rec, extras={"latent": z[1:], "source_latent": z[:1]},
                          info={"inversion_cached": inv.from_cache})
