"""``masked_swap``: DDIM word swap, then the source pixels put back outside the edit mask."""

from __future__ import annotations

import numpy as np
from PIL import Image

from oig.diffusion import Timer
from oig.editor import EditError, Editor
from oig.registry import register_editor
from oig.types import EditRequest, EditResult


@register_editor("masked_swap")  # the name in result rows; the entry point makes it known without an import
class MaskedSwap(Editor):
    """Invert the source with the source prompt, sample with the target prompt, and keep the
    source's pixels wherever the request's mask is False. Needs a mask (the toy world, PIE-Bench and
    folders with a ``mask`` column have one); a sample without one becomes an error row."""

    def __init__(self, steps: int = 50, guidance: float = 5.0, negative: str = "source"):
        super().__init__(steps=steps, guidance=guidance, negative=negative)

    def edit(self, req: EditRequest, src: Image.Image, timer: Timer) -> EditResult:
        if req.mask is None:
            raise EditError("masked_swap needs an edit mask; this sample has none")
        c = self.core
        with timer("inversion"):
            inv = c.invert_image(src, req.source_prompt, self.steps, seed=req.seed)  # cached by content
        with timer("sampling"):
            z = c.sample(inv.xT, c.encode_text([req.target_prompt]), c.encode_text([self.negative_text(req)]),
                         self.guidance, self.steps)
            self.check_finite(z, "sampling")
            swapped = np.asarray(c.decode_pil(z).convert("RGB"))
        inside = np.asarray(req.mask, dtype=bool)[..., None]  # the mask is already at src's size
        out = np.where(inside, swapped, np.asarray(src.convert("RGB")))
        return EditResult(image=Image.fromarray(out), source=src, info={"mask_fraction": float(inside.mean())})
