"""SDEdit (Meng et al., ICLR'22) with word swap: noise the source to ``strength``, denoise with the target prompt."""

from __future__ import annotations

from oig.diffusion import Timer
from oig.editor import Editor
from oig.registry import register_editor
from oig.types import EditRequest, EditResult


@register_editor("sdedit")
class SDEdit(Editor):
    """``strength`` in (0, 1]: the fraction of the ``steps`` schedule that is re-run (diffusers'
    img2img convention: start at index ``steps - int(steps * strength)``). The noise is drawn
    from the request's seed."""

    def __init__(self, steps: int = 50, guidance: float = 7.5, negative: str = "empty", strength: float = 0.8,
                 resize_mode: str = "keep_aspect", encode: str = "mean"):
        super().__init__(steps, guidance, negative, resize_mode, encode)
        if not 0 < strength <= 1:
            raise ValueError(f"sdedit strength must be in (0, 1], got {strength}")
        self.strength = strength

    def edit(self, req: EditRequest, src, timer: Timer) -> EditResult:
        c = self.core
        with timer("encode"):
            z0 = c.encode_image(src, req.seed)
        ts = c.timesteps(self.steps)
        start = self.steps - int(self.steps * self.strength)
        a = c.abar(ts[start])
        xt = a**0.5 * z0 + (1 - a) ** 0.5 * c.noise(z0.shape, req.seed)
        with timer("sampling"):
            z = c.sample(xt, c.encode_text([req.target_prompt]), c.encode_text([self.negative_text(req)]),
                         self.guidance, self.steps, start=start)
            self.check_finite(z, "sampling")
            out = c.decode_pil(z)
        return EditResult(image=out, source=src)
