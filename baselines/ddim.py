"""Plain DDIM editors: reconstruction and "DDIM + word swap" (pix2pix-zero's Table 1 baseline).

Both invert the source with the source prompt (guidance 1), then sample from the inverted
noise with CFG: ``ddim_recon`` with the source prompt, ``ddim_word_swap`` with the target
prompt. The negative prompt follows the pix2pix-zero / OIG convention (the source caption)
unless ``negative`` says otherwise.
"""

from __future__ import annotations

from oig.diffusion import Timer
from oig.editor import Editor
from oig.registry import register_editor
from oig.types import EditRequest, EditResult


class _DDIM(Editor):
    def __init__(self, steps: int = 50, guidance: float = 5.0, negative: str = "source",
                 inversion: str = "p2pzero", resize_mode: str = "keep_aspect", encode: str = "mean"):
        super().__init__(steps, guidance, negative, resize_mode, encode)
        self.inversion = inversion

    def _prompt(self, req: EditRequest) -> str:
        raise NotImplementedError

    def edit(self, req: EditRequest, src, timer: Timer) -> EditResult:
        c = self.core
        with timer("inversion"):
            inv = c.invert_image(src, req.source_prompt, self.steps, convention=self.inversion, seed=req.seed)
        with timer("sampling"):
            cond = c.encode_text([self._prompt(req)])
            neg = c.encode_text([self.negative_text(req)])
            z = c.sample(inv.xT, cond, neg, self.guidance, self.steps)
            self.check_finite(z, "sampling")
            out = c.decode_pil(z)
        return EditResult(image=out, source=src, reconstruction=out if self.has_reconstruction else None,
                          info={"inversion_cached": inv.from_cache})


@register_editor("ddim_recon")
class DDIMReconstruction(_DDIM):
    """Invert, then sample again with the *source* prompt: the inversion's reconstruction."""

    has_reconstruction = True

    def _prompt(self, req):
        return req.source_prompt


@register_editor("ddim_word_swap")
class DDIMWordSwap(_DDIM):
    """Invert with the source prompt, sample with the target prompt."""

    def _prompt(self, req):
        return req.target_prompt
