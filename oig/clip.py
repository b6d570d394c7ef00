"""One door to CLIP models: open_clip's ``create_model_and_transforms``.

``load_clip("toy")`` is the toy world's CLIP (an open_clip ``local-dir:`` folder inside the
package); ``load_clip("ViT-B-32", "openai")`` the OpenAI ViT-B/32 used by OIG's guidance and
the pix2pix-zero metrics; ``load_clip("local-dir:/path")`` any saved open_clip folder.
The returned :class:`CLIP` carries the model's own preprocessing constants so callers can
preprocess differentiably (OIG) or from PIL (metrics) the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

TOY_CLIP_DIR = Path(__file__).parent / "toy" / "models" / "clip"
_CACHE: dict[tuple, "CLIP"] = {}


@dataclass
class CLIP:
    model: torch.nn.Module
    tokenizer: object
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    name: str

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype

    def preprocess_tensor(self, x: torch.Tensor, interpolation: str = "bicubic") -> torch.Tensor:
        """Images in [0, 1], (B, 3, H, W) -> CLIP input: resize the short side to ``image_size``
        (bicubic, as OpenAI CLIP), centre-crop, normalise. Differentiable."""
        h, w = x.shape[-2:]
        s = self.image_size / min(h, w)
        nh, nw = max(self.image_size, round(h * s)), max(self.image_size, round(w * s))
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode=interpolation, align_corners=False)
        top, left = (nh - self.image_size) // 2, (nw - self.image_size) // 2
        x = x[..., top : top + self.image_size, left : left + self.image_size]
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    def encode_image(self, x01: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        f = self.model.encode_image(self.preprocess_tensor(x01).to(self.dtype))
        return F.normalize(f, dim=-1) if normalize else f

    def encode_text(self, texts: list[str], normalize: bool = True) -> torch.Tensor:
        ids = self.tokenizer(texts).to(self.device)
        f = self.model.encode_text(ids)
        return F.normalize(f, dim=-1) if normalize else f


def wants_quick_gelu(name: str, pretrained: str | None) -> bool:
    """True when the weights are OpenAI's and the architecture name does not already say QuickGELU."""
    return pretrained is not None and "openai" in str(pretrained).lower() and "quickgelu" not in name.lower()


def load_clip(name: str = "toy", pretrained: str | None = None, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32, quick_gelu: bool | None = None) -> CLIP:
    """Load an open_clip model by architecture name + pretrained tag/path, or a ``local-dir:`` folder.

    ``quick_gelu``: OpenAI's CLIP weights were trained with QuickGELU, but open_clip's plain
    ``ViT-B-32`` config builds GELU (and only warns). ``None`` (auto) forces QuickGELU when the
    weights are OpenAI's: ``pretrained="openai"`` or a weights path containing "openai".
    """
    import open_clip

    if quick_gelu is None:
        quick_gelu = wants_quick_gelu(name, pretrained)

    if name == "toy":
        name = f"local-dir:{TOY_CLIP_DIR}"
    key = (name, pretrained, str(device), str(dtype), quick_gelu)
    if key in _CACHE:
        return _CACHE[key]
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device,
                                                                     force_quick_gelu=bool(quick_gelu))
    except Exception as e:
        raise RuntimeError(
            f"could not load CLIP {name!r} (pretrained={pretrained!r}): {e}. Offline, pass a local weights file as "
            f"pretrained=/path/to/open_clip_pytorch_model.bin or a saved folder as local-dir:/path"
        ) from e
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(name)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = tuple(getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
    std = tuple(getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)
    clip = CLIP(model, tokenizer, int(size), mean, std, name)
    _CACHE[key] = clip
    log.info("loaded CLIP %s (image size %d)", name, clip.image_size)
    return clip
