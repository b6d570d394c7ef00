"""A word-level ``CLIPTokenizer`` for the toy world.

CLIP's tokenizer is byte-pair encoding. To make every toy word one token with a tiny
vocabulary we build merges right to left: every merge joins a character to a word
*suffix* (a symbol ending in ``</w>``). Such merges can only fire at the end of a word,
so no two words' merges interfere, and an unknown word still splits into valid tokens
(its longest known suffix plus single characters).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from .world import BACKGROUNDS, COLORS, SHAPES

WORDS = sorted(
    set(SHAPES)
    | set(COLORS)
    | set(BACKGROUNDS)
    | {"a", "an", "on", "background", "striped", "plain", "the", "turn", "into", "make", "change", "to"}
    | {"photo", "of", "with", "and", "in", "object", "shape", "color", "colour", "picture", "image"}
)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def build_vocab(words=WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    chars = string.ascii_lowercase + string.digits + ".,!?'-:;()"
    vocab: dict[str, int] = {}

    def add(tok: str):
        if tok not in vocab:
            vocab[tok] = len(vocab)

    for c in chars:
        add(c)
    for c in chars:
        add(c + "</w>")
    merges: list[tuple[str, str]] = []
    seen = set()
    for w in words:
        suffix = w[-1] + "</w>"
        for i in range(len(w) - 2, -1, -1):
            pair = (w[i], suffix)
            suffix = w[i] + suffix
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
            add(suffix)
    add(BOS)
    add(EOS)
    return vocab, merges


def save_tokenizer(folder: str | Path, model_max_length: int = 77):
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    tok = CLIPTokenizer(
        str(folder / "vocab.json"),
        str(folder / "merges.txt"),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=EOS,
        model_max_length=model_max_length,
    )
    tok.save_pretrained(folder)
    return tok
