"""One door to CLIP models: open_clip's ``create_model_and_transforms``.

``load_clip("toy")`` is the toy world's CLIP (an open_clip ``local-dir:`` folder inside the
package); ``load_clip("ViT-B-32", "openai")`` the OpenAI ViT-B/32 used by OIG's guidance and
the pix2pix-zero metrics; ``load_clip("local-dir:/path")`` any saved open_clip folder.
The returned :class:`CLIP` carries the model's own preprocessing constants so callers can
preprocess differentiably (OIG) or from PIL (metrics) the same way.
"""

from __future__ import annotations

import json
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
    activation: Activation | None = None  #: the activation built and why (:func:`clip_activation`)

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


class CLIPActivationError(ValueError):
    """A CLIP whose activation contradicts what its configuration declares (GELU for OpenAI weights)."""


@dataclass(frozen=True)
class Activation:
    """The activation :func:`load_clip` builds for a CLIP and why.

    ``quick_gelu``: build QuickGELU (``x * sigmoid(1.702 x)``, what OpenAI trained CLIP with) instead
    of GELU; ``reason``: which declaration decided it; ``weights_quick_gelu``: the weights are declared
    QuickGELU-trained (a pretrained tag open_clip's registry lists so: ``openai``, ``metaclip_*``, ...; or a
    weights path naming "openai").
    """

    quick_gelu: bool
    reason: str
    weights_quick_gelu: bool = False

    @property
    def name(self) -> str:
        return "QuickGELU" if self.quick_gelu else "GELU"


def split_schema(name: str) -> tuple[str | None, str]:
    """``("local-dir", path)`` / ``("hf-hub", id)`` / ``(None, name)`` for an open_clip model name."""
    for s in ("local-dir:", "hf-hub:"):
        if name.startswith(s):
            return s[:-1], name[len(s):]
    return None, name


def _arch_quick_gelu(name: str) -> bool | None:
    """What the architecture itself declares: True for open_clip's ``*-quickgelu`` built-in configs and a
    ``local-dir:`` folder whose ``open_clip_config.json`` has ``model_cfg.quick_gelu: true``; False for such a
    folder with ``quick_gelu: false``; None when nothing is declared (a plain built-in name such as
    ``ViT-B-32``, an unreadable folder: open_clip reports those itself). An ``hf-hub:`` repository's
    ``open_clip_config.json`` is read like a folder's (from the HF cache when offline)."""
    import open_clip

    schema, ident = split_schema(name)
    if schema is not None:
        try:
            if schema == "local-dir":
                text = (Path(ident) / "open_clip_config.json").read_text()
            else:
                from huggingface_hub import hf_hub_download

                text = Path(hf_hub_download(ident, "open_clip_config.json")).read_text()
            v = json.loads(text)["model_cfg"].get("quick_gelu")
        except Exception:  # noqa: BLE001 - unreadable: open_clip's own loader reports it
            return None
        return None if v is None else bool(v)
    cfg = open_clip.get_model_config(ident.replace("/", "-"))
    return True if cfg is not None and cfg.get("quick_gelu") else None


def quick_gelu_name(name: str) -> str | None:
    """open_clip's QuickGELU twin of a built-in architecture name (``ViT-B-32`` -> ``ViT-B-32-quickgelu``), if any."""
    import open_clip

    if split_schema(name)[0] is not None or "quickgelu" in name.lower():
        return None
    twin = f"{name}-quickgelu"
    return twin if open_clip.get_model_config(twin) is not None else None


def _declare_hint(name: str) -> str:
    twin = quick_gelu_name(name)
    if twin:
        return (f"declare it: use the architecture name {twin!r} (open_clip's QuickGELU config of {name}; the "
                f"config keys are model.guidance_clip.name, metrics.clip.model, metrics.structure.clip_model, "
                f"dataset.swap_clip) or pass quick_gelu=true")
    schema, folder = split_schema(name)
    if schema == "local-dir":
        return f'declare it: set "quick_gelu": true in model_cfg of {folder}/open_clip_config.json'
    return "declare it: pass quick_gelu=true"


def clip_activation(name: str, pretrained: str | None = None, quick_gelu: bool | None = None) -> Activation:
    """The activation a CLIP is built with, from what its configuration declares (never guessed).

    Declarations, strongest first:

    * ``quick_gelu=True`` / ``False`` (an explicit argument);
    * the architecture: open_clip's ``*-quickgelu`` configs (``ViT-B-32-quickgelu``) and a ``local-dir:``
      folder whose ``open_clip_config.json`` has ``model_cfg.quick_gelu: true`` build QuickGELU whatever the
      weights file is called, so OpenAI weights given as a local file keep it;
    * the pretrained *tag*: open_clip's registry says which tags were trained with QuickGELU (``openai``,
      ``metaclip_*``, ...); with a plain name (``ViT-B-32`` + ``openai``) QuickGELU is built for them.

    Refused (:class:`CLIPActivationError`): GELU for weights declared OpenAI or QuickGELU-trained (an
    explicit ``quick_gelu=False`` with such a tag, or against a ``*-quickgelu`` architecture), and a
    weights path that names "openai" with nothing declaring the activation (the path alone decides
    nothing: declare QuickGELU, or ``quick_gelu=False`` for weights that really were trained with GELU).
    """
    import open_clip

    schema, ident = split_schema(name)
    arch = _arch_quick_gelu("local-dir:" + str(TOY_CLIP_DIR) if name == "toy" else name)
    tag_cfg = open_clip.get_pretrained_cfg(ident.replace("/", "-"), pretrained) if pretrained and schema is None else {}
    tag = tag_cfg.get("quick_gelu") if tag_cfg else None
    path_openai = bool(pretrained) and not tag_cfg and "openai" in str(pretrained).lower()
    if schema == "local-dir":  # a folder named as OpenAI's whose config says nothing (no config: open_clip's error)
        path_openai = "openai" in ident.lower() and (Path(ident) / "open_clip_config.json").is_file()
    elif schema == "hf-hub":  # the repository's own config decides; open_clip reads it
        path_openai = False
    declared = bool(tag) or path_openai
    where = f"CLIP {name!r} (pretrained={pretrained!r})"
    if quick_gelu is not None:
        if not quick_gelu and arch:
            raise CLIPActivationError(f"{where}: quick_gelu=false contradicts the architecture, which declares "
                                      f"QuickGELU; drop quick_gelu=false or use the plain architecture name")
        if not quick_gelu and tag:
            raise CLIPActivationError(
                f"{where}: quick_gelu=false builds GELU, but the {pretrained!r} weights were trained with QuickGELU "
                f"(open_clip's registry), so every feature would be wrong; drop quick_gelu=false")
        return Activation(bool(quick_gelu), f"quick_gelu={str(bool(quick_gelu)).lower()} (explicit)", declared)
    if arch:
        return Activation(True, f"the architecture {name!r} declares QuickGELU", declared)
    if tag:
        return Activation(True, f"the pretrained tag {pretrained!r} was trained with QuickGELU (open_clip's registry)",
                          declared)
    if arch is False:
        return Activation(False, "its open_clip_config.json declares quick_gelu: false", declared)
    if path_openai:
        what = f"the weights file {pretrained}" if schema is None else f"the folder {ident}"
        raise CLIPActivationError(
            f"{where}: {what} is named as OpenAI's, whose CLIP weights were trained with QuickGELU, but the "
            f"architecture builds GELU and nothing declares the activation; {_declare_hint(name)}. If these weights "
            f"were trained with GELU, pass quick_gelu=false")
    return Activation(False, "nothing declares QuickGELU (open_clip builds GELU)", declared)


def load_clip(name: str = "toy", pretrained: str | None = None, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32, quick_gelu: bool | None = None) -> CLIP:
    """Load an open_clip model by architecture name + pretrained tag/path, or a ``local-dir:`` folder.

    ``quick_gelu``: None (auto) builds the activation the configuration declares, see
    :func:`clip_activation` (OpenAI weights: ``ViT-B-32-quickgelu`` with any weights file, or
    ``ViT-B-32`` with the ``openai`` tag); True / False force it. GELU for weights declared OpenAI's
    is refused with a :class:`CLIPActivationError` naming the fix. The activation built is
    ``CLIP.activation``.
    """
    import open_clip

    act = clip_activation(name, pretrained, quick_gelu)
    if name == "toy":
        name = f"local-dir:{TOY_CLIP_DIR}"
    key = (name, pretrained, str(device), str(dtype), act.quick_gelu)
    if key in _CACHE:
        return _CACHE[key]
    try:
        # force_quick_gelu can only switch QuickGELU on; GELU is the configs' default
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device,
                                                                     force_quick_gelu=act.quick_gelu)
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
    clip = CLIP(model, tokenizer, int(size), mean, std, name, act)
    _CACHE[key] = clip
    log.info("loaded CLIP %s (image size %d, %s: %s)", name, clip.image_size, act.name, act.reason)
    return clip
