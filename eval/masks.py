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
    (model + ``CLIPSegProcessor``).

    The arguments are checked at construction; the network is loaded by :meth:`load`, which the
    first :meth:`segment` calls, so a masker that is never asked for a mask (every sample carries its
    own) never needs the weights. A failed load raises the same RuntimeError on every later call
    without trying again.
    """

    def __init__(self, model: str = DEFAULT_CLIPSEG, threshold: float = 0.4, dilate: int = 0,
                 device: str | torch.device = "cpu"):
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"TextMasker: threshold is a probability in [0, 1], got {threshold}")
        if int(dilate) < 0:
            raise ValueError(f"TextMasker: dilate is a number of pixels >= 0, got {dilate}")
        self.model_id = str(model)
        self.threshold, self.dilate, self.device = float(threshold), int(dilate), torch.device(device)
        self.model = self.processor = None
        self._error: str | None = None

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def load(self) -> TextMasker:
        """Load CLIPSeg and its processor (once); a RuntimeError naming the fix when they cannot be loaded."""
        if self.model is not None:
            return self
        if self._error is None:
            from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

            try:
                model = CLIPSegForImageSegmentation.from_pretrained(self.model_id)
                self.processor = CLIPSegProcessor.from_pretrained(self.model_id)
                self.model = model.to(self.device).eval().requires_grad_(False)
                log.info("loaded the CLIPSeg text segmenter %s", self.model_id)
                return self
            except Exception as e:
                self._error = (
                    f"could not load the CLIPSeg text segmenter {self.model_id!r} for mask_from_text (needed for "
                    f"samples without a mask): {type(e).__name__}: {e}. Offline, download it once (`huggingface-cli "
                    f"download {DEFAULT_CLIPSEG}`) into the HF cache, or save the model and its CLIPSegProcessor "
                    f"with save_pretrained to a folder and set mask_from_text.model=/path/to/folder")
        raise RuntimeError(self._error)

    @torch.no_grad()
    def segment(self, images: list[Image.Image], phrases: list[str]) -> list[np.ndarray]:
        """One boolean HxW mask per (image, phrase) at the image's own size."""
        if len(images) != len(phrases):
            raise ValueError(f"TextMasker.segment: {len(images)} images but {len(phrases)} phrases")
        if not images:
            return []
        self.load()
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
