"""Installing attention processors cleanly (``unet.set_attn_processor``), restoring the originals."""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def attn_processors(unet: torch.nn.Module, processors):
    """Install ``processors`` (one object, or a dict name -> processor) for the duration of the block."""
    original = dict(unet.attn_processors)
    try:
        unet.set_attn_processor(processors)
        yield
    finally:
        unet.set_attn_processor(original)
