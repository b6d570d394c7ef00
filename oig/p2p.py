"""Prompt-to-Prompt (Hertz et al., ICLR'23) as an :class:`~oig.attn_control.AttentionController`.

Token alignment (the ``seq_aligner`` logic of google/prompt-to-prompt, re-implemented):

* :func:`word_token_spans` — the token positions of every space-separated word of a prompt
  (position 0 is the start token). Each word is tokenised on its own; CLIP's BPE works per
  word, so the spans tile the prompt's tokens (checked).
* :func:`replacement_mapper` (word swap, same number of words): a ``[L, L]`` matrix ``M`` with
  ``target_map = source_map @ M``. Unchanged words map token to token; a swapped word with as
  many tokens as its replacement maps token to token; otherwise every source token of the
  word spreads ``1 / n_target`` onto each of the ``n_target`` target tokens. The tokens after
  the last word (end token, padding) map one to one *with the offset the swap introduced*.
  (The reference's last loop writes ``mapper[j, j]`` instead of ``mapper[i, j]``, which
  misaligns every later token when a swapped word changes the token count; we follow the
  alignment it intends.)
* :func:`refinement_mapper` (added/removed words): a global alignment of the two token
  sequences (Needleman-Wunsch, gap 0, match 1, mismatch -1, ties broken like the reference:
  insertion, then deletion, then diagonal) gives, for each target token, its source token or
  none; ``alphas`` is 1 where a source token exists. Positions past the target's end token
  map to the same source position.

Controller (:class:`PromptToPrompt`), on the batch ``[neg·src, neg·tgt, cond·src, cond·tgt]``;
like the reference only the conditional half is edited:

* cross-attention, for steps ``i`` with ``int(a·(N+1)) <= i < int(b·(N+1))`` where
  ``cross_replace = b`` or ``[a, b]``: the target's maps become ``source @ M`` (replace),
  ``source[..., mapper]·alphas + target·(1 - alphas)`` (refine), then, with ``reweight_words``,
  are multiplied by an equalizer over target tokens (re-weighting on top of the base edit, as
  the reference's ``AttentionReweight`` wrapping the replace/refine controller);
* self-attention, for ``int(a·N) <= i < int(b·N)`` (``self_replace``), in layers whose side is
  at most ``self_replace_res`` times the latent side (null-text notebook: 32x32 of 64x64,
  i.e. 0.5; the stable-diffusion P2P notebook: 16x16, i.e. 0.25): target maps := source maps;
* LocalBlend (optional, ``blend_words``; PIE-Bench: the sample's ``blended_word``): after each step ``k > int(blend_start·N)`` (1-based),
  the cross-attention maps of the blend words, summed over the steps so far and averaged over
  heads and the coarsest down/up cross-attention layers (SD: the five 16x16 ones), are
  max-pooled (3x3), resized to the latent (nearest), divided by their maximum and thresholded
  at ``blend_threshold``; the target latent keeps its own values inside
  ``mask_source ∪ mask_target`` and takes the source latent's outside.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .attn_control import AttentionController, AttnLayer, blend_level

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ tokens
def word_token_spans(tokenizer, prompt: str) -> list[tuple[str, list[int]]]:
    """``[(word, [token positions]), ...]`` for the space-separated words of ``prompt``."""
    out, pos = [], 1
    for w in prompt.split(" "):
        n = len(tokenizer(w, add_special_tokens=False).input_ids) if w else 0
        out.append((w, list(range(pos, pos + n))))
        pos += n
    full = len(tokenizer(prompt).input_ids) - 2
    if pos - 1 != full:
        raise ValueError(f"word-by-word tokenisation of {prompt!r} gives {pos - 1} tokens, the prompt {full}; "
                         "cannot align words to tokens")
    return out


def word_positions(tokenizer, prompt: str, words, max_len: int = 77, missing: str = "error") -> list[int]:
    """Token positions of every occurrence of each word in ``words`` (a string or a list).

    A word that is not one of the prompt's space-separated words raises (``missing="error"``)
    or is left out (``missing="ignore"``: the reference's ``get_word_inds`` gives no position,
    so its map is all zero).
    """
    if isinstance(words, str):
        words = [words]
    spans = word_token_spans(tokenizer, prompt)
    out = []
    for w in words:
        hits = [p for word, ps in spans if word == w for p in ps]
        if not hits:
            if missing == "ignore":
                log.warning("word %r is not in the prompt %r; it gets no attention map (as the reference)", w, prompt)
                continue
            raise ValueError(f"word {w!r} is not in the prompt {prompt!r}")
        out += hits
    return [p for p in out if p < max_len - 1]


def replacement_mapper(tokenizer, source: str, target: str, max_len: int = 77, mode: str = "aligned") -> torch.Tensor:
    """``[max_len, max_len]`` matrix ``M``: target cross-attention map = source map @ ``M``.

    ``mode="aligned"`` keeps every token after a swapped word aligned with its own source token;
    ``mode="reference"`` reproduces ``seq_aligner.get_replacement_mapper_`` exactly: after the last
    swapped word it writes ``M[j, j]`` (target position on both axes), which misaligns the later
    tokens whenever a swap changed the token count (identical otherwise).
    """
    if mode not in ("aligned", "reference"):
        raise ValueError(f"unknown replacement mapper mode {mode!r}; use aligned or reference")
    ws, wt = word_token_spans(tokenizer, source), word_token_spans(tokenizer, target)
    if len(ws) != len(wt):
        raise ValueError(f"attention replacement needs prompts with the same number of words; got {len(ws)} "
                         f"({source!r}) and {len(wt)} ({target!r})")
    m = torch.zeros(max_len, max_len)

    def put(i, j, v):
        if i < max_len and j < max_len:
            m[i, j] = v

    last_swap = max((k for k, ((a, _), (b, _)) in enumerate(zip(ws, wt)) if a != b), default=-1)
    put(0, 0, 1.0)
    i = j = 1
    for k, ((_, ps), (_, pt)) in enumerate(zip(ws, wt)):
        if mode == "reference" and k > last_swap:
            for b in pt:
                put(b, b, 1.0)
        elif len(ps) == len(pt):
            for a, b in zip(ps, pt):
                put(a, b, 1.0)
        else:
            for a in ps:
                for b in pt:
                    put(a, b, 1.0 / len(pt))
        i += len(ps)
        j += len(pt)
    while i < max_len and j < max_len:
        m[j if mode == "reference" else i, j] = 1.0
        i += 1
        j += 1
    return m


def _align(x: list[int], y: list[int]) -> list[int]:
    """Global alignment; for each element of ``y`` the index of its partner in ``x`` or -1."""
    n, k = len(x), len(y)
    score = [[0] * (k + 1) for _ in range(n + 1)]
    move = [[0] * (k + 1) for _ in range(n + 1)]  # 1 left (y inserted), 2 up (x deleted), 3 diagonal
    for j in range(1, k + 1):
        move[0][j] = 1
    for i in range(1, n + 1):
        move[i][0] = 2
    for i in range(1, n + 1):
        for j in range(1, k + 1):
            left, up = score[i][j - 1], score[i - 1][j]  # gap costs 0
            diag = score[i - 1][j - 1] + (1 if x[i - 1] == y[j - 1] else -1)
            best = max(left, up, diag)
            score[i][j] = best
            move[i][j] = 1 if best == left else 2 if best == up else 3
    out = [-1] * k
    i, j = n, k
    while i > 0 or j > 0:
        mv = move[i][j]
        if mv == 3:
            i, j = i - 1, j - 1
            out[j] = i
        elif mv == 1:
            j -= 1
        else:
            i -= 1
    return out


def refinement_mapper(tokenizer, source: str, target: str, max_len: int = 77) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mapper, alphas)``, both ``[max_len]``: target token ``j`` takes the source map at
    ``mapper[j]`` where ``alphas[j] == 1`` and keeps its own where ``alphas[j] == 0``."""
    enc = dict(truncation=True, max_length=max_len)
    x, y = tokenizer(source, **enc).input_ids, tokenizer(target, **enc).input_ids
    base = _align(x, y)
    mapper = torch.arange(max_len)
    alphas = torch.ones(max_len)
    for j, i in enumerate(base):
        mapper[j] = max(i, 0)
        alphas[j] = float(i >= 0)
    return mapper, alphas


def equalizer(tokenizer, prompt: str, words, values, max_len: int = 77, missing: str = "error") -> torch.Tensor:
    """``[max_len]`` ones, with ``values`` at the tokens of ``words`` (P2P attention re-weighting)."""
    words = [words] if isinstance(words, str) else list(words)
    values = [values] * len(words) if isinstance(values, (int, float)) else list(values)
    if len(values) != len(words):
        raise ValueError(f"reweight: {len(words)} words but {len(values)} values")
    eq = torch.ones(max_len)
    for w, v in zip(words, values):
        eq[word_positions(tokenizer, prompt, w, max_len, missing)] = float(v)
    return eq


def changed_words(source: str, target: str) -> tuple[list[str], list[str]]:
    """Words only in the source, words only in the target (for ``blend_words: auto``)."""
    s, t = source.split(), target.split()
    return [w for w in s if w not in t], [w for w in t if w not in s]


def _window(spec, n: int) -> tuple[int, int]:
    a, b = (0.0, float(spec)) if isinstance(spec, (int, float)) else (float(spec[0]), float(spec[1]))
    return int(a * n), int(b * n)


# ------------------------------------------------------------------------------ controller
def _words(phrase) -> list[str]:
    """A phrase or a list of words -> the list of its space-separated words ('' -> [])."""
    if phrase is None:
        return []
    if isinstance(phrase, str):
        return [w for w in phrase.split(" ") if w]
    return [w for p in phrase for w in _words(p)]


class PromptToPrompt(AttentionController):
    """Cross/self-attention replacement or refinement, re-weighting and local blending.

    ``edit_type`` is the base edit: ``replace`` | ``refine`` | ``auto`` (replace when the
    prompts have the same number of words, else refine). PIE-Bench runs ``refine`` always
    (its ``is_replace_controller=False``).

    ``reweight_words`` adds attention re-weighting by ``reweight_value`` *on top of* the base
    edit (the reference's ``AttentionReweight(controller=base)``): ``None`` (off), ``"auto"``
    (the words only the target prompt has), ``"dataset"`` (the sample's target edit word(s),
    ``edit_words[1]``; PIE-Bench: ``blended_word[1]`` ×2; off when the sample has none) or
    explicit target words.

    ``blend_words`` turns on LocalBlend: ``None``, ``"auto"`` (the words only in the source /
    only in the target), ``"dataset"`` (the sample's ``edit_words``; PIE-Bench's
    ``blended_word``; off when the sample has none) or ``[source_words, target_words]``.

    ``missing_words``: a blend / re-weight word that is not in its prompt raises (``error``) or
    gets no attention map (``ignore``, what the reference's ``get_word_inds`` does).

    ``mapper`` (replace only): ``aligned`` or ``reference`` (see :func:`replacement_mapper`).
    """

    def __init__(self, tokenizer, source: str, target: str, steps: int, edit_type: str = "auto",
                 cross_replace=0.4, self_replace=0.6, self_replace_res: float = 0.5, reweight_words=None,
                 reweight_value: float = 2.0, blend_words=None, blend_threshold: float = 0.3,
                 blend_start: float = 0.2, edit_words: tuple[str, str] | None = None, missing_words: str = "error",
                 mapper: str = "aligned"):
        super().__init__()
        if edit_type == "reweight":
            raise ValueError("edit_type=reweight is no longer a base edit: choose the base with edit_type "
                             "(auto | replace | refine) and re-weight on top of it with reweight_words "
                             "(auto = the old behaviour, dataset = the sample's target word, or a list)")
        if edit_type not in ("auto", "replace", "refine"):
            raise ValueError(f"unknown P2P edit_type {edit_type!r}; use auto, replace or refine")
        if missing_words not in ("error", "ignore"):
            raise ValueError(f"unknown missing_words {missing_words!r}; use error or ignore")
        L = tokenizer.model_max_length
        same_len = len(source.split(" ")) == len(target.split(" "))
        base = edit_type if edit_type in ("replace", "refine") else ("replace" if same_len else "refine")
        self.edit_type, self.base_type = edit_type, base
        self.mapper = self.alphas = self.equalizer = None
        if base == "replace":
            self.mapper = replacement_mapper(tokenizer, source, target, L, mapper)
        else:
            self.mapper, self.alphas = refinement_mapper(tokenizer, source, target, L)
        self.reweight_words = self._reweight_words(reweight_words, source, target, edit_words)
        if self.reweight_words:
            self.equalizer = equalizer(tokenizer, target, self.reweight_words, reweight_value, L, missing_words)
        self.cross_window = _window(cross_replace, steps + 1)
        self.self_window = _window(self_replace, steps)
        self.self_replace_res = float(self_replace_res)
        self.total_steps = steps
        self.blend_alpha = None
        self.blend_words = self._blend_words(blend_words, source, target, edit_words)
        if self.blend_words is not None:
            ws, wt = self.blend_words
            alpha = torch.zeros(2, L)
            for row, (prompt, words) in enumerate(((source, ws), (target, wt))):
                for w in words:
                    alpha[row, word_positions(tokenizer, prompt, w, L, missing_words)] = 1.0
            self.blend_alpha = alpha
        self.blend_threshold = blend_threshold
        self.blend_start = int(blend_start * steps)
        self.self_layers: set[int] = set()

    @staticmethod
    def _reweight_words(spec, source: str, target: str, edit_words) -> list[str]:
        if spec is None:
            return []
        if spec == "auto":
            words = changed_words(source, target)[1]
            if not words:
                raise ValueError("reweight_words=auto: the target prompt adds no word")
            return words
        if spec == "dataset":
            return _words(edit_words[1]) if edit_words else []
        return _words(spec)

    @staticmethod
    def _blend_words(spec, source: str, target: str, edit_words) -> tuple[list[str], list[str]] | None:
        if spec is None:
            return None
        if spec == "auto":
            ws, wt = changed_words(source, target)
        elif spec == "dataset":
            if not edit_words:
                return None
            ws, wt = _words(edit_words[0]), _words(edit_words[1])
        elif isinstance(spec, (list, tuple)) and len(spec) == 2:
            ws, wt = _words(spec[0]), _words(spec[1])
        else:
            raise ValueError("blend_words must be null, 'auto', 'dataset' or [source_words, target_words]; "
                             f"got {spec!r}")
        return (ws, wt) if ws or wt else None

    def setup(self, layers: list[AttnLayer]):
        self.self_layers = {l.index for l in layers if not l.is_cross and 2.0**-l.level <= self.self_replace_res}
        self.store_layers = set()
        if self.blend_alpha is not None:
            lv = blend_level(layers)
            self.store_layers = {l.index for l in layers if l.is_cross and l.place != "mid" and l.level == lv}

    # ------------------------------------------------------------------ hooks
    def _cross_on(self) -> bool:
        return self.cross_window[0] <= self.step < self.cross_window[1]

    def _self_on(self) -> bool:
        return self.self_window[0] <= self.step < self.self_window[1]

    def active(self, layer):
        if layer.index in self.store_layers:
            return True
        return self._cross_on() if layer.is_cross else (layer.index in self.self_layers and self._self_on())

    needs_probs = active

    def _like(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """Attribute ``name`` moved (once) to ``like``'s device, and dtype if floating point."""
        t = getattr(self, name)
        dtype = like.dtype if t.is_floating_point() else t.dtype
        if t.device != like.device or t.dtype != dtype:
            t = t.to(like.device, dtype)
            setattr(self, name, t)
        return t

    def replace_cross(self, base: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """``base``/``tgt``: ``[heads, queries, tokens]`` maps of the source / target."""
        if self.base_type == "replace":
            new = torch.einsum("hpw,wn->hpn", base, self._like("mapper", base))
        else:
            a = self._like("alphas", base)
            new = base[..., self._like("mapper", base)] * a + tgt * (1 - a)
        if self.equalizer is not None:
            new = new * self._like("equalizer", new)
        return new

    def edit_probs(self, layer, probs):
        b = probs.shape[0]
        src, tgt = b // 2, b // 2 + 1  # conditional half: [cond·source, cond·target]
        if layer.is_cross:
            if self._cross_on():
                probs[tgt] = self.replace_cross(probs[src], probs[tgt])
        elif layer.index in self.self_layers and self._self_on():
            probs[tgt] = probs[src]
        return probs

    # ------------------------------------------------------------------ local blend
    def blend_mask(self, latent_shape) -> torch.Tensor | None:
        """The ``[2, 1, H, W]`` boolean LocalBlend mask from the stored maps (None before any)."""
        if self.blend_alpha is None or not self.map_sums:
            return None
        hw = tuple(latent_shape[-2:])
        per_layer = []
        for idx in sorted(self.store_layers):
            m = self.map_sums.get(idx)
            if m is None:
                continue
            layer = self.layers[idx]
            h, w = layer.hw(hw)
            cond = m[m.shape[0] // 2:][:2]  # [2, queries, tokens]
            per_layer.append((cond * self.blend_alpha.to(cond)[:, None, :]).sum(-1).reshape(2, 1, h, w))
        maps = torch.stack(per_layer).mean(0)
        maps = F.max_pool2d(maps, (3, 3), (1, 1), padding=(1, 1))
        mask = F.interpolate(maps, size=hw)
        peak = mask.amax(dim=(2, 3), keepdim=True)
        mask = torch.where(peak > 0, mask / peak.clamp_min(torch.finfo(mask.dtype).tiny), torch.zeros_like(mask))
        mask = mask > self.blend_threshold
        return mask[:1] | mask

    def step_callback(self, i: int, x: torch.Tensor) -> torch.Tensor | None:
        """After step ``i`` (0-based): the LocalBlend of ``x = [source, target]`` or None."""
        if self.blend_alpha is None or i + 1 <= self.blend_start:
            return None
        mask = self.blend_mask(x.shape)
        if mask is None:
            return None
        return x[:1] + mask.to(x.dtype) * (x - x[:1])
