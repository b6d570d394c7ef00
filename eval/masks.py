"""Text-prompted edit masks for datasets without annotated masks (background metrics).

:class:`TextMasker` segments the *edited word* with CLIPSeg (``transformers``,
``CIDAS/clipseg-rd64-refined`` by default): the words of the source prompt that the target
prompt replaces or drops are segmented in the source image, the words the target prompt
introduces in the edited image, and the edit mask is the union (where the object was or now
is). Masks are CLIPSeg's sigmoid heat map, upsampled (bilinear) to the image size and
thresholded at ``threshold``, optionally dilated by ``dilate`` pixels.

Difference from pix2pix-zero's protocol: pix2pix-zero masks the edited object with Detic, an
open-vocabulary *detector* with instance masks (needs detectron2 and a vocabulary of class
names). CLIPSeg is a light text-conditioned *segmenter* working on any phrase; its masks are
coarser (predicted at 352x352), blobby and threshold-dependent, and it can fire on
semantically related regions. Background numbers computed with it therefore differ from
pix2pix-zero's published ones; every method is scored with the same masker, so comparisons
between methods stay fair.
"""

from __future__ import annotations

import difflib
import logging

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

log = logging.getLogger(__name__)

DEFAULT_CLIPSEG = "CIDAS/clipseg-rd64-refined"


def edited_words(source_prompt: str, target_prompt: str) -> tuple[list[str], list[str]]:
    """Words of the source prompt that the target prompt replaces/drops, and the words it adds.

    >>> edited_words("a cat sitting on a mat", "a dog sitting on a mat")
    (['cat'], ['dog'])
    """
    a = [w.strip(".,;:!?\"'()[]") for w in source_prompt.lower().split()]
    b = [w.strip(".,;:!?\"'()[]") for w in target_prompt.lower().split()]
    src, tgt = [], []
    for op, i0, i1, j0, j1 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op in ("replace", "delete"):
            src.extend(w for w in a[i0:i1] if w)
        if op in ("replace", "insert"):
            tgt.extend(w for w in b[j0:j1] if w)
    return src, tgt


class TextMasker:
    """CLIPSeg edit masks. ``model`` is a hub id or a local folder saved with ``save_pretrained``
    (model + ``CLIPSegProcessor``)."""

    def __init__(self, model: str = DEFAULT_CLIPSEG, threshold: float = 0.4, dilate: int = 0,
                 device: str | torch.device = "cpu"):
        from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"TextMasker: threshold is a probability in [0, 1], got {threshold}")
        self.threshold, self.dilate, self.device = float(threshold), int(dilate), torch.device(device)
        try:
            self.model = CLIPSegForImageSegmentation.from_pretrained(model).to(self.device).eval().requires_grad_(False)
            self.processor = CLIPSegProcessor.from_pretrained(model)
        except Exception as e:
            raise RuntimeError(
                f"could not load the CLIPSeg text segmenter {model!r} for mask_from_text: {e}. Offline, download it "
                f"once (`huggingface-cli download {DEFAULT_CLIPSEG}`) into the HF cache, or save the model and its "
                f"CLIPSegProcessor with save_pretrained to a folder and set mask_from_text.model=/path/to/folder"
            ) from e

    @torch.no_grad()
    def segment(self, images: list[Image.Image], phrases: list[str]) -> list[np.ndarray]:
        """One boolean HxW mask per (image, phrase) at the image's own size."""
        if len(images) != len(phrases):
            raise ValueError(f"TextMasker.segment: {len(images)} images but {len(phrases)} phrases")
        if not images:
            return []
        inp = self.processor(text=list(phrases), images=[im.convert("RGB") for im in images], padding=True,
                             return_tensors="pt")
        logits = self.model(**{k: v.to(self.device) for k, v in inp.items()}).logits
        if logits.ndim == 2:  # older transformers squeeze a batch of one
            logits = logits[None]
        out = []
        for im, lg in zip(images, logits):
            w, h = im.size
            p = torch.sigmoid(F.interpolate(lg[None, None].float(), size=(h, w), mode="bilinear", align_corners=False))
            m = p[0, 0] > self.threshold
            if self.dilate > 0:
                k = 2 * self.dilate + 1
                m = F.max_pool2d(m[None, None].float(), k, stride=1, padding=self.dilate)[0, 0] > 0.5
            out.append(m.cpu().numpy())
        return out

    def edit_mask(self, source: Image.Image, edit: Image.Image, source_prompt: str, target_prompt: str) -> np.ndarray | None:
        """Union of the source-word mask in ``source`` and the target-word mask in ``edit`` (at the
        edit's size); None when the prompts differ in no word (nothing to segment)."""
        src_words, tgt_words = edited_words(source_prompt, target_prompt)
        images, phrases = [], []
        if src_words:
            images.append(source.resize(edit.size) if source.size != edit.size else source)
            phrases.append(" ".join(src_words))
        if tgt_words:
            images.append(edit)
            phrases.append(" ".join(tgt_words))
        if not images:
            log.warning("mask_from_text: %r and %r differ in no word; no mask", source_prompt, target_prompt)
            return None
        masks = self.segment(images, phrases)
        return np.logical_or.reduce(masks)
