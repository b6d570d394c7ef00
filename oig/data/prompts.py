"""Prompts for images without them: a BLIP captioner and target prompts by word swap.

**Word swap** (:func:`word_swap`). The target prompt is the caption with the task's source
word replaced by its target word or phrase:

* matches are whole words, case-insensitive, singular or plural (``cat``/``cats``,
  ``fox``/``foxes``, ``puppy``/``puppies``); *every* occurrence is replaced;
* the replacement copies the match's case (``Cats`` -> ``Dogs``, ``CAT`` -> ``DOG``) and
  number: a plural match pluralises the target — the word of a target phrase that equals
  the source word (``cats`` -> ``cats wearing glasses``) or else its last word
  (``cats`` -> ``dogs``); punctuation and spacing around the match are untouched;
* **fallback** when the source word does not occur as a word (a BLIP caption says
  "kitten" for a cat), as in OIG's ``make_target_prompt``: the caption is split on
  whitespace, every token is encoded with the CLIP text encoder, and the token most
  similar (cosine) to the source word is edited — if the source word is a substring of
  it, only that substring is replaced ("wildcat" -> "wilddog"), otherwise the whole token
  is. Unlike the official code, the token's leading/trailing punctuation is stripped
  before encoding and kept in the output ("a kitten." -> "a dog."), and the substring
  test is case-insensitive. Without a text encoder (or an injected ``similarity``) a
  missing word raises ``ValueError``.

**Captioner** (:class:`Captioner`): BLIP through ``transformers``
(``Salesforce/blip-image-captioning-base`` by default, a hub id or a local
``save_pretrained`` folder), with the LAVIS ``blip_caption``/``base_coco`` settings the
official pix2pix-zero/OIG inversion scripts use: prompt ``"a picture of "`` (removed from
the output), beam search with 3 beams, 10 to 30 tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

log = logging.getLogger(__name__)

_PUNCT = "\"'`.,;:!?()[]{}<>«»“”‘’*_~/\\|-"


# --------------------------------------------------------------------------------------
# word swap


def _plural(word: str) -> str:
    lw = word.lower()
    if re.search(r"(s|x|z|ch|sh)$", lw):
        return word + "es"
    if re.search(r"[^aeiou]y$", lw):
        return word[:-1] + "ies"
    return word + "s"


def _case_like(template: str, text: str) -> str:
    letters = [c for c in template if c.isalpha()]
    if len(letters) > 1 and all(c.isupper() for c in letters):
        return text.upper()
    if template[:1].isupper():
        return text[:1].upper() + text[1:]
    return text


def _phrase_pattern(phrase: str) -> re.Pattern:
    """Whole-word, case-insensitive pattern of a word or phrase whose last word may be plural."""
    words = phrase.split()
    if not words:
        raise ValueError("empty source word")
    last = words[-1]
    forms = sorted({last, _plural(last), last + "s"}, key=len, reverse=True)
    head = r"\s+".join(re.escape(w) for w in words[:-1])
    tail = "(?:" + "|".join(re.escape(f) for f in forms) + ")"
    body = (head + r"\s+" + tail) if head else tail
    return re.compile(rf"(?<![\w]){body}(?![\w])", re.IGNORECASE)


def has_word(caption: str, word: str) -> bool:
    """Whether ``word`` (or its plural) occurs in ``caption`` as a whole word, any case."""
    return _phrase_pattern(word).search(caption) is not None


def _target_for(match: str, src: str, tgt: str) -> str:
    src_last = src.split()[-1].lower()
    m_last = match.split()[-1].lower()
    plural = m_last != src_last and m_last in {_plural(src_last).lower(), src_last + "s"}
    out = tgt
    if plural:
        words = tgt.split(" ")
        idx = next((i for i, w in enumerate(words) if w.lower() == src_last), len(words) - 1)
        words[idx] = _plural(words[idx])
        out = " ".join(words)
    return _case_like(match, out)


@dataclass
class Swap:
    prompt: str
    method: str  # "exact" or "clip"
    word: str | None = None  # the caption token that was edited by the fallback


def _clip_similarity(text_encoder) -> Callable[[list[str], str], Sequence[float]]:
    def sim(words: list[str], src: str) -> list[float]:
        with torch.no_grad():
            f = text_encoder.encode_text(list(words) + [src])
            f = torch.nn.functional.normalize(f.float(), dim=-1)
        return (f[:-1] @ f[-1]).tolist()

    return sim


def swap_details(caption: str, src_word: str, tgt_word: str, text_encoder=None,
                 similarity: Callable[[list[str], str], Sequence[float]] | None = None) -> Swap:
    """:func:`word_swap` that also says how the swap was made."""
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"word swap needs a non-empty caption, got {caption!r}")
    src_word, tgt_word = src_word.strip(), tgt_word.strip()
    if not src_word or not tgt_word:
        raise ValueError(f"word swap needs non-empty words, got {src_word!r} -> {tgt_word!r}")
    pat = _phrase_pattern(src_word)
    if pat.search(caption):
        return Swap(pat.sub(lambda m: _target_for(m.group(0), src_word, tgt_word), caption), "exact")

    tokens = caption.split()
    cores = [t.strip(_PUNCT) for t in tokens]
    cand = [i for i, c in enumerate(cores) if c]
    if not cand:
        raise ValueError(f"word swap: caption {caption!r} has no words")
    if similarity is None:
        if text_encoder is None:
            raise ValueError(
                f"word swap: {src_word!r} does not occur in the caption {caption!r} and no CLIP text encoder "
                f"was given for the most-similar-word fallback"
            )
        similarity = _clip_similarity(text_encoder)
    sims = list(similarity([cores[i] for i in cand], src_word))
    if len(sims) != len(cand):
        raise ValueError(f"similarity returned {len(sims)} scores for {len(cand)} words")
    best = cand[max(range(len(cand)), key=lambda k: (sims[k], -k))]
    token, core = tokens[best], cores[best]
    start = token.find(core)
    lead, trail = token[:start], token[start + len(core):]
    low = core.lower()
    j = low.find(src_word.lower())
    if j >= 0:
        new_core = re.sub(re.escape(src_word), lambda m: _case_like(m.group(0), tgt_word), core, flags=re.IGNORECASE)
    else:
        new_core = _case_like(core, tgt_word)
    tokens[best] = lead + new_core + trail
    log.debug("word swap fallback: %r -> %r in %r", core, new_core, caption)
    return Swap(" ".join(tokens), "clip", core)


def word_swap(caption: str, src_word: str, tgt_word: str, text_encoder=None,
              similarity: Callable[[list[str], str], Sequence[float]] | None = None) -> str:
    """The caption with ``src_word`` replaced by ``tgt_word`` (see the module docstring).

    ``text_encoder`` is any object with ``encode_text(list[str]) -> (N, D)`` (an
    :class:`oig.clip.CLIP`); ``similarity(words, src_word) -> scores`` replaces it (tests,
    other encoders). Either is only used when the word is missing.
    """
    return swap_details(caption, src_word, tgt_word, text_encoder, similarity).prompt


# --------------------------------------------------------------------------------------
# captioner


class CaptionerUnavailable(RuntimeError):
    """The captioning model cannot be loaded (offline, wrong path)."""


class Captioner:
    """BLIP image captioning (``BlipForConditionalGeneration`` + ``BlipProcessor``).

    ``model`` is a hub id or a local folder with both the model and the processor
    (``save_pretrained`` of each). The model loads on the first call. Offline
    (``HF_HUB_OFFLINE=1`` or ``local_files_only=True``) a hub id that is not in the local
    cache raises :class:`CaptionerUnavailable` saying how to fetch it.

    Captions are memoised per image content; ``cache_file`` (JSON) keeps them across runs.
    """

    def __init__(self, model: str = "Salesforce/blip-image-captioning-base", device: str = "auto",
                 dtype: str = "fp32", prompt: str = "a picture of ", num_beams: int = 3, max_length: int = 30,
                 min_length: int = 10, local_files_only: bool | None = None, cache_file: str | None = None):
        self.model_id = str(model)
        self.device_name = device
        self.dtype_name = dtype
        self.prompt = prompt or ""
        self.num_beams = int(num_beams)
        self.max_length = int(max_length)
        self.min_length = int(min_length)
        self.local_files_only = local_files_only
        self.cache_file = Path(cache_file) if cache_file else None
        self._model = None
        self._processor = None
        self._cache: dict[str, str] = {}
        if self.cache_file is not None and self.cache_file.exists():
            try:
                self._cache = dict(json.loads(self.cache_file.read_text()))
            except (json.JSONDecodeError, TypeError, ValueError) as e:
                log.warning("%s: ignoring unreadable caption cache (%s)", self.cache_file, e)

    def __repr__(self) -> str:
        return f"Captioner({self.model_id!r})"

    def load(self):
        if self._model is not None:
            return self
        from transformers import BlipForConditionalGeneration, BlipProcessor

        from oig.models import resolve_device, resolve_dtype

        dev = resolve_device(self.device_name)
        dt = resolve_dtype(self.dtype_name, dev)
        p = Path(self.model_id).expanduser()
        if (p.is_absolute() or self.model_id.startswith((".", "~"))) and not p.is_dir():
            raise CaptionerUnavailable(f"{p}: captioner folder not found (expected a save_pretrained folder with the "
                                       f"BLIP model and processor, or a hub id)")
        lfo = self.local_files_only
        if lfo is None:
            lfo = Path(self.model_id).is_dir() or os.environ.get("HF_HUB_OFFLINE") == "1"
        try:
            self._processor = BlipProcessor.from_pretrained(self.model_id, local_files_only=lfo)
            self._model = BlipForConditionalGeneration.from_pretrained(self.model_id, local_files_only=lfo,
                                                                       torch_dtype=dt)
        except (OSError, ValueError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CaptionerUnavailable(
                f"could not load the captioner {self.model_id!r}: {first}\nOffline, download it elsewhere "
                f"(`huggingface-cli download {self.model_id} --local-dir DIR`) and pass captioner.model=DIR "
                f"(a folder with the BLIP model and processor)."
            ) from e
        self._model.to(dev).eval().requires_grad_(False)
        self._device, self._dtype = dev, dt
        log.info("loaded captioner %s on %s", self.model_id, dev)
        return self

    def _key(self, image: Image.Image) -> str:
        h = hashlib.sha1(image.tobytes())
        h.update(f"{image.size}|{image.mode}|{self.model_id}|{self.prompt}|{self.num_beams}|"
                 f"{self.min_length}|{self.max_length}".encode())
        return h.hexdigest()

    @torch.no_grad()
    def __call__(self, image: Image.Image) -> str:
        image = image.convert("RGB")
        key = self._key(image)
        if key in self._cache:
            return self._cache[key]
        self.load()
        kw = {"images": image, "return_tensors": "pt"}
        if self.prompt:
            kw["text"] = self.prompt
        inputs = self._processor(**kw)
        inputs = {k: (v.to(self._device, self._dtype) if k == "pixel_values" else v.to(self._device))
                  for k, v in inputs.items()}
        out = self._model.generate(**inputs, num_beams=self.num_beams, max_length=self.max_length,
                                   min_length=self.min_length)
        text = self._processor.decode(out[0], skip_special_tokens=True).strip()
        p = " ".join(self.prompt.split()).lower()
        if p and " ".join(text.split()).lower().startswith(p):
            text = " ".join(text.split())[len(p):].strip()
        text = " ".join(text.split())
        self._cache[key] = text
        if self.cache_file is not None:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_file.with_suffix(self.cache_file.suffix + f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(self._cache, indent=0))
            os.replace(tmp, self.cache_file)
        return text


def make_captioner(spec) -> Captioner | None:
    """None, a :class:`Captioner`, a model id/folder string, or a mapping of Captioner args."""
    from .base import plain

    spec = plain(spec)
    if spec is None or isinstance(spec, Captioner):
        return spec
    if isinstance(spec, str):
        return Captioner(model=spec)
    if isinstance(spec, dict):
        spec = {k: v for k, v in spec.items() if k != "_target_"}
        return Captioner(**spec)
    if callable(spec):
        return spec
    raise TypeError(f"captioner must be None, a model id/folder, a mapping or a Captioner; got {type(spec).__name__}")


def make_text_encoder(spec, pretrained: str | None = None, device: str = "cpu"):
    """The CLIP for the word-swap fallback: None, an object with ``encode_text``, or a
    :func:`oig.clip.load_clip` name (``toy``, ``ViT-B-32`` with ``pretrained=openai``,
    ``local-dir:/path``)."""
    from .base import plain

    spec = plain(spec)
    if spec is None or hasattr(spec, "encode_text"):
        return spec
    if isinstance(spec, dict):
        return make_text_encoder(spec.get("name"), spec.get("pretrained"), spec.get("device", device))
    if isinstance(spec, str):
        from oig.clip import load_clip

        return load_clip(spec, pretrained, device=device)
    raise TypeError(f"text encoder must be None, a CLIP name or an object with encode_text; got {type(spec).__name__}")


class LazyTextEncoder:
    """The word-swap fallback's CLIP, built on first use (datasets whose captions all contain the
    source word never load it)."""

    def __init__(self, spec, pretrained: str | None = None):
        self.spec, self.pretrained, self._enc = spec, pretrained, None

    def get(self):
        if self._enc is None and self.spec is not None:
            self._enc = make_text_encoder(self.spec, self.pretrained)
        return self._enc
