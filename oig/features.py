"""Capture (and optionally replace) U-Net ResNet features through forward hooks.

The feature of a diffusers ``ResnetBlock2D`` used by OIG and Plug-and-Play is the output
of its residual branch: the output of ``conv2``, before the skip connection is added and
before ``output_scale_factor``. A forward hook on ``<block>.conv2`` sees exactly that
tensor, so no diffusers code is copied or patched.
"""

from __future__ import annotations

from typing import Callable

import torch
from diffusers.models.resnet import ResnetBlock2D


def resnet_layers(unet: torch.nn.Module, which="all") -> list[str]:
    """Names of the ``ResnetBlock2D`` modules inside ``down_blocks`` and/or ``up_blocks``.

    ``which``: ``all`` (down + up, the OIG reference; the mid block is excluded), ``down``,
    ``up``, or an explicit list of names (validated).
    """
    names = [n for n, m in unet.named_modules() if isinstance(m, ResnetBlock2D)]
    down = [n for n in names if n.startswith("down_blocks.")]
    up = [n for n in names if n.startswith("up_blocks.")]
    if isinstance(which, str):
        table = {"all": down + up, "down": down, "up": up}
        if which not in table:
            raise ValueError(f"unknown layer set {which!r}; use all, down, up or a list of module names")
        return table[which]
    which = list(which)
    bad = [n for n in which if n not in names]
    if bad:
        raise ValueError(f"not ResnetBlock2D modules of this U-Net: {bad}; available: {names}")
    return which


class FeatureHooks:
    """Context manager: hooks ``<layer>.conv2`` of each named ResNet block.

    ``store=True`` keeps the latest output per layer in ``self.features`` (with its autograd
    graph when grad is enabled). ``replace(name, output)`` may return a tensor that replaces
    the output (Plug-and-Play's feature injection). Hooks are removed on exit.
    """

    def __init__(self, unet: torch.nn.Module, layers: list[str], store: bool = True,
                 replace: Callable[[str, torch.Tensor], torch.Tensor | None] | None = None):
        self.unet, self.layers, self.store, self.replace = unet, layers, store, replace
        self.features: dict[str, torch.Tensor] = {}
        self._handles = []

    def _hook(self, name):
        def fn(module, inputs, output):
            if self.replace is not None:
                r = self.replace(name, output)
                if r is not None:
                    output = r
            if self.store:
                self.features[name] = output
            return output

        return fn

    def __enter__(self):
        mods = dict(self.unet.named_modules())
        for n in self.layers:
            self._handles.append(mods[f"{n}.conv2"].register_forward_hook(self._hook(n)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def pop(self) -> dict[str, torch.Tensor]:
        f, self.features = self.features, {}
        return f
