"""CLIP metrics: CLIP score, CLIP accuracy, directional CLIP similarity, image similarity
and edited-region CLIP score.

Definitions (``E_I``/``E_T`` are L2-normalised CLIP image/text embeddings, ``cos`` their dot
product):

* ``clip_score``  = max(100 * cos(E_I(edit), E_T(target_prompt)), 0) -- torchmetrics'
  ``CLIPScore`` convention (per sample, before averaging).
* ``clip_acc``    = 1.0 if cos(E_I(edit), E_T(target)) > cos(E_I(edit), E_T(source)) else 0.0
  -- pix2pix-zero's CLIP accuracy (ties count as failures); its mean is the accuracy.
* ``clip_margin`` = 100 * (cos(E_I(edit), E_T(target)) - cos(E_I(edit), E_T(source))) -- the
  continuous quantity whose sign is ``clip_acc`` and which OIG's CLIP triplet term pushes up
  (its hinge is max(0, β_p - margin/100)); unlike ``clip_acc`` it does not saturate.
* ``clip_dir``    = cos(E_I(edit) - E_I(source), E_T(target) - E_T(source)) -- InstructPix2Pix's
  directional CLIP similarity (differences of normalised embeddings; a zero direction gives 0,
  as ``torch.nn.functional.cosine_similarity`` does in the reference).
* ``clip_img_sim`` = cos(E_I(source), E_I(edit)) -- InstructPix2Pix's CLIP image similarity.
* ``clip_edit_region`` = ``clip_score`` of ``edit * mask`` (pixels outside the edit mask set to
  0, i.e. black) vs the target prompt -- PIE-Bench's "CLIP similarity of the edited part".
  NaN when the sample has no mask or an empty one. With ``region_convention="pie_bench"``
  the mask's 1-pixel image border is forced to "edited" first, as PIE-Bench's mask decoder does.

Input convention: RGB PIL images of any size; each backend applies its own model's
preprocessing to them (resize the short side, centre crop, normalise), exactly as the
reference pipelines do:

* ``backend="open_clip"`` (default): ``oig.clip.load_clip(model, pretrained)`` -- ``"toy"``,
  ``"ViT-B-32"``/``"openai"``, ``"ViT-L-14"``/``"openai"`` or ``"local-dir:/path"`` -- and
  open_clip's own evaluation transform for that model (the one
  ``open_clip.create_model_and_transforms`` returns).
* ``backend="hf"``: a Hugging Face ``transformers.CLIPModel`` + ``CLIPProcessor`` (hub id or
  local folder), i.e. exactly what torchmetrics' ``CLIPScore(model_name_or_path=...)`` and
  hence PIE-Bench use (``openai/clip-vit-large-patch14``).

``pie_bench_env`` (:data:`eval.base.PIE_BENCH_ENVS`): ``"published"`` scores the edit after
PIE-Bench's JPEG round trip (its runners saved every edit inside a ``.jpg`` panel, the
environment of its Table 1); ``"current"`` and ``None`` score the lossless edit.

Both sit behind the same two-method interface (:class:`ImageTextEncoder`), so the score code
is one function (:func:`clip_scores`).
"""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from oig.registry import register_metric

from .base import NAN, Metric, MetricInput, mask_at, resolve_pie_bench_env

log = logging.getLogger(__name__)


class ImageTextEncoder(Protocol):
    """What the CLIP metrics need from a CLIP model: L2-normalised embeddings."""

    def encode_images(self, images: list[Image.Image]) -> torch.Tensor: ...  # (N, D)

    def encode_texts(self, texts: list[str]) -> torch.Tensor: ...  # (N, D)


class OpenCLIPEncoder:
    """An :class:`oig.clip.CLIP` with open_clip's evaluation preprocessing (PIL path)."""

    def __init__(self, clip):
        from open_clip.transform import PreprocessCfg, image_transform, image_transform_v2

        self.clip = clip
        cfg = getattr(clip.model.visual, "preprocess_cfg", None)
        if cfg:
            self.transform = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
        else:
            self.transform = image_transform(clip.image_size, is_train=False, mean=clip.mean, std=clip.std)

    def encode_images(self, images):
        x = torch.stack([self.transform(im.convert("RGB")) for im in images]).to(self.clip.device, self.clip.dtype)
        return F.normalize(self.clip.model.encode_image(x).float(), dim=-1)

    def encode_texts(self, texts):
        return self.clip.encode_text(list(texts), normalize=True).float()


def _features(out) -> torch.Tensor:
    """transformers < 5 returns a tensor from ``get_*_features``; 5.x an output whose
    ``pooler_output`` holds the projected embedding."""
    if isinstance(out, torch.Tensor):
        return out
    return out.pooler_output


class HFCLIPEncoder:
    """A ``transformers`` CLIPModel + CLIPProcessor, used the way torchmetrics' CLIPScore uses them
    (processor on the images; tokens padded to the longest prompt, cut at the model's maximum)."""

    def __init__(self, model, processor, device="cpu"):
        self.model = model.to(device).eval().requires_grad_(False)
        self.processor = processor
        self.device = torch.device(device)

    @classmethod
    def from_pretrained(cls, name_or_path: str, device="cpu") -> HFCLIPEncoder:
        from transformers import CLIPModel, CLIPProcessor

        try:
            model = CLIPModel.from_pretrained(name_or_path)
            processor = CLIPProcessor.from_pretrained(name_or_path)
        except Exception as e:
            raise RuntimeError(
                f"could not load the transformers CLIP model {name_or_path!r}: {e}. Offline, download it once "
                f"(`huggingface-cli download {name_or_path}`) into the HF cache, or save it with "
                f"CLIPModel/CLIPProcessor.save_pretrained to a folder and set model=/path/to/folder"
            ) from e
        return cls(model, processor, device)

    def encode_images(self, images):
        px = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        f = _features(self.model.get_image_features(pixel_values=px.to(self.device)))
        return F.normalize(f.float(), dim=-1)

    def encode_texts(self, texts):
        tok = self.processor(text=list(texts), return_tensors="pt", padding=True)
        ids, att = tok["input_ids"], tok["attention_mask"]
        n = getattr(getattr(self.model.config, "text_config", None), "max_position_embeddings", None)
        if n is not None and ids.shape[-1] > n:
            log.warning("prompt longer than the CLIP text model's %d positions; truncating", n)
            ids, att = ids[..., :n], att[..., :n]
        f = _features(self.model.get_text_features(input_ids=ids.to(self.device), attention_mask=att.to(self.device)))
        return F.normalize(f.float(), dim=-1)


def load_encoder(model: str, pretrained: str | None = None, backend: str = "open_clip", device="cpu") -> ImageTextEncoder:
    if backend == "open_clip":
        from oig.clip import load_clip

        return OpenCLIPEncoder(load_clip(model, pretrained, device=device))
    if backend == "hf":
        if pretrained is not None:
            raise ValueError(f"backend='hf' takes the model as a hub id or folder in `model`; got pretrained={pretrained!r}")
        return HFCLIPEncoder.from_pretrained(model, device=device)
    raise ValueError(f"unknown CLIP backend {backend!r}; use 'open_clip' or 'hf'")


def clip_scores(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Per-pair CLIP score max(100 * cos, 0) of normalised embeddings (torchmetrics' CLIPScore)."""
    return torch.clamp(100.0 * (image_emb * text_emb).sum(-1), min=0.0)


def force_border(mask: np.ndarray) -> np.ndarray:
    """PIE-Bench's mask decoder marks the 1-pixel image border as edited (annotation noise)."""
    m = mask.copy()
    m[0, :] = m[-1, :] = True
    m[:, 0] = m[:, -1] = True
    return m


def masked_region(edit: Image.Image, mask: np.ndarray) -> Image.Image:
    """``edit * mask``: pixels outside the edit mask set to 0 (black), as PIE-Bench does."""
    a = np.asarray(edit.convert("RGB"))
    return Image.fromarray((a * mask[..., None]).astype(np.uint8))


@register_metric("clip")
class CLIPMetrics(Metric):
    """CLIP score / accuracy / margin / direction / image similarity / edited-region score (see module docstring).

    Args:
        model, pretrained: the CLIP (``oig.clip.load_clip`` arguments for ``backend="open_clip"``;
            a hub id or folder in ``model`` for ``backend="hf"``).
        keys: which values to return (default all of :attr:`ALL_KEYS`).
        region_convention: ``"plain"`` (the sample mask as is) or ``"pie_bench"`` (border forced
            to edited) for ``clip_edit_region``.
        pie_bench_env: ``"published"`` (edit JPEG round trip), ``"current"`` or ``None`` (lossless edit).
    """

    ALL_KEYS = ("clip_score", "clip_acc", "clip_margin", "clip_dir", "clip_img_sim", "clip_edit_region")

    def __init__(self, model: str = "toy", pretrained: str | None = None, backend: str = "open_clip",
                 keys: list[str] | None = None, region_convention: str = "plain", pie_bench_env: str | None = None,
                 batch_size: int = 32):
        super().__init__(batch_size)
        env = resolve_pie_bench_env(pie_bench_env, "CLIPMetrics")
        self.pie_bench_env = None if env is None else env.name
        self.edit_jpeg = env is not None and env.edit_jpeg
        self.model, self.pretrained, self.backend = model, pretrained, backend
        keys = list(self.ALL_KEYS if keys is None else keys)
        bad = [k for k in keys if k not in self.ALL_KEYS]
        if bad or not keys:
            raise ValueError(f"CLIPMetrics: unknown keys {bad or keys}; choose from {list(self.ALL_KEYS)}")
        if backend not in ("open_clip", "hf"):
            raise ValueError(f"CLIPMetrics: unknown backend {backend!r}; use 'open_clip' or 'hf'")
        if region_convention not in ("plain", "pie_bench"):
            raise ValueError(f"CLIPMetrics: region_convention must be 'plain' or 'pie_bench', got {region_convention!r}")
        self.keys = keys
        self.region_convention = region_convention
        self.encoder: ImageTextEncoder | None = None

    @property
    def output_keys(self):
        return list(self.keys)

    def _load(self):
        self.encoder = load_encoder(self.model, self.pretrained, self.backend, self.device)

    def _texts(self, texts: list[str]) -> torch.Tensor:
        uniq = list(dict.fromkeys(texts))
        emb = self.encoder.encode_texts(uniq)
        return emb[[uniq.index(t) for t in texts]]

    def compute(self, batch: list[MetricInput]) -> list[dict[str, float]]:
        keys = set(self.keys)
        n = len(batch)
        e_edit = self.encoder.encode_images([s.edit for s in batch])
        t_tgt = self._texts([s.target_prompt for s in batch])
        out: dict[str, torch.Tensor] = {}
        if "clip_score" in keys:
            out["clip_score"] = clip_scores(e_edit, t_tgt)
        if keys & {"clip_acc", "clip_margin", "clip_dir"}:
            t_src = self._texts([s.source_prompt for s in batch])
            cos_t, cos_s = (e_edit * t_tgt).sum(-1), (e_edit * t_src).sum(-1)
            if "clip_acc" in keys:
                out["clip_acc"] = (cos_t > cos_s).float()
            if "clip_margin" in keys:
                out["clip_margin"] = 100.0 * (cos_t - cos_s)
        if keys & {"clip_dir", "clip_img_sim"}:
            e_src = self.encoder.encode_images([s.source for s in batch])
            if "clip_dir" in keys:
                out["clip_dir"] = F.cosine_similarity(e_edit - e_src, t_tgt - t_src, dim=-1)
            if "clip_img_sim" in keys:
                out["clip_img_sim"] = (e_src * e_edit).sum(-1)
        if "clip_edit_region" in keys:
            region = torch.full((n,), NAN)
            idx, crops = [], []
            for i, s in enumerate(batch):
                m = mask_at(s.mask, s.edit.size)
                if m is None:
                    continue
                if self.region_convention == "pie_bench":
                    m = force_border(m)
                if m.any():
                    idx.append(i)
                    crops.append(masked_region(s.edit, m))
            if idx:
                region[idx] = clip_scores(self.encoder.encode_images(crops), t_tgt[idx]).cpu()
            out["clip_edit_region"] = region
        vals = {k: v.detach().float().cpu().tolist() for k, v in out.items()}
        return [{k: float(vals[k][i]) for k in self.keys} for i in range(n)]
