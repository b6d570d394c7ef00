"""Structure distance (Tumanyan et al., Splice; used by PnP, pix2pix-zero and PIE-Bench).

``structure_dist`` = MSE between the self-similarity matrices of the last-layer attention
*keys* of a ViT for the source and the edit::

    K      = keys of the last block, all tokens (CLS included), heads concatenated  (T x D)
    S_ij   = <K_i, K_j> / max(|K_i| |K_j|, 1e-8)                                     (T x T)
    dist   = mean_ij (S_src_ij - S_edit_ij)^2

The keys are read with a forward hook, never by re-implementing the network:

* ``backbone="timm"`` (real images): a timm ViT, by default ``vit_base_patch8_224.dino``
  (DINO ViT-B/8, the reference's network), loaded from the Hugging Face hub or from a local
  weights file (``weights=/path/to/file.safetensors|.pth``). The hook sits on the last
  block's ``attn.qkv`` projection; its output is ``[q | k | v]`` along the channel axis with
  heads contiguous, so the middle third is the keys with heads concatenated.
  Input convention: images in [0, 1], resized (bilinear) so the short side is ``resize`` = 224
  with the long side at most ``max_size`` = 480, then ImageNet-normalised (Splice/PnP). The
  reference code resized tensors with torchvision < 0.17, whose tensor resize did *not*
  antialias; ``antialias=False`` (default) reproduces that, ``antialias=True`` gives the
  cleaner (PIL-like) downsampling of current torchvision. Rows/columns beyond a multiple of
  the patch size are cropped (bottom/right), which the original DINO's stride-8 patch
  convolution does implicitly. The model is built with ``dynamic_img_size=True``, so inputs
  other than 224x224 get timm's bicubic position-embedding interpolation; the original DINO
  code interpolates slightly differently, so non-square inputs may differ a little from the
  reference (not measured here). Square inputs become 224x224 and need no interpolation.
  ``pie_bench_compat=True`` reproduces PIE-Bench's evaluation code, which feeds pixel values
  in 0..255 (never divided by 255) into the same resize + ImageNet normalisation; its
  numbers are therefore not comparable with the [0, 1] definition.
  ``pie_bench_env`` (:data:`eval.base.PIE_BENCH_ENVS`; needs ``pie_bench_compat=True``) sets
  ``antialias`` and the edit's JPEG round trip together: ``"published"`` = no antialiasing and
  the edit read back from PIE-Bench's JPEG panel (its Table 1), ``"current"`` = antialiased
  resize (torchvision >= 0.17's default) on the lossless edit.
* ``backbone="clip"`` (toy world): the image tower of an open_clip model
  (``oig.clip.load_clip(clip_model).model.visual``, e.g. the toy CLIP). The hook sits on the
  last residual block's ``attn`` (an ``nn.MultiheadAttention``); the keys are recomputed from
  the hooked key input with the module's own ``in_proj`` weights. Input convention: open_clip's
  evaluation transform of that model (short side to the model's image size, centre crop, the
  model's own mean/std).

Source and edit are preprocessed identically; samples are batched when their preprocessed
sizes agree.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from oig.registry import register_metric

from .base import Metric, MetricInput, groups_by, resolve_pie_bench_env, same_size, to_tensor01

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def self_similarity(keys: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(B, T, D) keys -> (B, T, T) cosine self-similarity (norm product clamped at ``eps``)."""
    keys = keys.float()
    norms = keys.norm(dim=-1, keepdim=True)
    return (keys @ keys.transpose(1, 2)) / torch.clamp(norms @ norms.transpose(1, 2), min=eps)


def structure_distance(keys_a: torch.Tensor, keys_b: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE between the key self-similarity matrices of two (B, T, D) key tensors."""
    if keys_a.shape != keys_b.shape:
        raise ValueError(f"key tensors differ in shape: {tuple(keys_a.shape)} vs {tuple(keys_b.shape)}")
    return ((self_similarity(keys_a) - self_similarity(keys_b)) ** 2).mean(dim=(1, 2))


# --------------------------------------------------------------------------------------
# key extractors


class TimmViTKeys:
    """Last-layer attention keys of a timm VisionTransformer via a hook on ``blocks[-1].attn.qkv``."""

    def __init__(self, model: torch.nn.Module, resize: int = 224, max_size: int | None = 480,
                 pie_bench_compat: bool = False, antialias: bool = False):
        try:
            self.qkv = model.blocks[-1].attn.qkv
        except AttributeError as e:
            raise TypeError(f"structure distance: {type(model).__name__} is not a timm ViT with blocks[-1].attn.qkv") from e
        self.model = model
        ps = getattr(getattr(model, "patch_embed", None), "patch_size", 1)
        self.patch = int(ps[0] if isinstance(ps, (tuple, list)) else ps)
        self.resize, self.max_size = int(resize), max_size
        self.pie_bench_compat, self.antialias = pie_bench_compat, bool(antialias)

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        from torchvision.transforms.functional import resize

        x = to_tensor01([img])[0]
        if self.pie_bench_compat:
            x = x * 255.0  # PIE-Bench feeds 0..255 values into the ImageNet normalisation
        x = resize(x, [self.resize], max_size=self.max_size, antialias=self.antialias)
        h, w = x.shape[-2:]  # the original DINO's stride-p patch conv ignores a remainder; timm refuses it
        x = x[:, : h // self.patch * self.patch, : w // self.patch * self.patch]
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        return (x - mean) / std

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        got = []
        h = self.qkv.register_forward_hook(lambda mod, inp, out: got.append(out))
        try:
            self.model.forward_features(x)
        finally:
            h.remove()
        qkv = got[-1]
        d = qkv.shape[-1] // 3
        return qkv[..., d : 2 * d]


class OpenCLIPTowerKeys:
    """Last-layer attention keys of an open_clip VisionTransformer, from a forward pre-hook on the
    last residual block's ``nn.MultiheadAttention`` and its ``in_proj`` key weights."""

    def __init__(self, clip):
        from open_clip.transform import PreprocessCfg, image_transform, image_transform_v2

        visual = clip.model.visual
        try:
            attn = visual.transformer.resblocks[-1].attn
        except AttributeError as e:
            raise TypeError(f"structure distance: {type(visual).__name__} has no transformer.resblocks[-1].attn") from e
        if not isinstance(attn, torch.nn.MultiheadAttention):
            raise TypeError(f"structure distance: the last block's attention is {type(attn).__name__}, "
                            f"expected torch.nn.MultiheadAttention")
        self.visual, self.attn = visual, attn
        cfg = getattr(visual, "preprocess_cfg", None)
        self.transform = (image_transform_v2(PreprocessCfg(**cfg), is_train=False) if cfg else
                          image_transform(clip.image_size, is_train=False, mean=clip.mean, std=clip.std))

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        return self.transform(img.convert("RGB"))

    def _key_weights(self):
        a, d = self.attn, self.attn.embed_dim
        w = a.in_proj_weight[d : 2 * d] if a.in_proj_weight is not None else a.k_proj_weight
        b = a.in_proj_bias[d : 2 * d] if a.in_proj_bias is not None else None
        return w, b

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        got = []

        def hook(mod, args, kwargs):
            k_in = args[1] if len(args) > 1 else kwargs.get("key", args[0] if args else kwargs.get("query"))
            got.append(k_in)

        h = self.attn.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.visual(x.to(next(self.visual.parameters()).dtype))
        finally:
            h.remove()
        k_in = got[-1]
        if not self.attn.batch_first:
            k_in = k_in.transpose(0, 1)
        w, b = self._key_weights()
        return F.linear(k_in, w, b)


def load_timm_vit(arch: str = "vit_base_patch8_224.dino", weights: str | None = None,
                  model_kwargs: dict | None = None, device="cpu") -> torch.nn.Module:
    """A timm ViT with pretrained weights from the hub (``weights=None``) or a local file."""
    import timm

    kw = {"dynamic_img_size": True, **dict(model_kwargs or {})}
    if weights is not None:
        p = Path(str(weights)).expanduser()
        if not p.is_file():
            raise FileNotFoundError(
                f"structure distance: ViT weights file {p} not found. Save the {arch!r} state dict there "
                f"(.safetensors or .pth, e.g. from timm.create_model({arch!r}, pretrained=True) on a machine with "
                f"network) or set weights=null to load it from the Hugging Face hub")
        try:
            model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": str(p)}, **kw)
        except Exception as e:
            raise RuntimeError(f"structure distance: could not load {arch!r} from {p}: {e}") from e
    else:
        try:
            model = timm.create_model(arch, pretrained=True, **kw)
        except Exception as e:
            raise RuntimeError(
                f"structure distance: could not load pretrained {arch!r} from the Hugging Face hub ({type(e).__name__}: "
                f"{e}). Offline, download it once (`huggingface-cli download timm/{arch}`, into the HF cache), or save "
                f"its weights to a file and set weights=/path/to/model.safetensors in the metrics config "
                f"(structure.weights=...)") from e
    return model.to(device).eval().requires_grad_(False)


@register_metric("structure")
class StructureDistance(Metric):
    """Returns ``structure_dist`` (>= 0; 0 for identical images). See the module docstring for the
    definition, the two backbones and their input conventions.

    Args:
        backbone: ``"timm"`` (``arch`` + ``weights`` + ``model_kwargs``) or ``"clip"``
            (``clip_model`` + ``clip_pretrained`` through ``oig.clip.load_clip``).
        resize, max_size: timm backbone: short side and long-side cap after resizing.
        antialias: timm backbone: antialiased resize (``None``: False, as the reference code ran,
            or what ``pie_bench_env`` says).
        pie_bench_compat: timm backbone: PIE-Bench's 0..255 input quirk.
        pie_bench_env: ``"published"`` / ``"current"`` / ``None`` (see the module docstring).
    """

    def __init__(self, backbone: str = "timm", arch: str = "vit_base_patch8_224.dino", weights: str | None = None,
                 model_kwargs: dict | None = None, clip_model: str = "toy", clip_pretrained: str | None = None,
                 resize: int = 224, max_size: int | None = 480, pie_bench_compat: bool = False,
                 antialias: bool | None = None, pie_bench_env: str | None = None, batch_size: int = 8):
        super().__init__(batch_size)
        if backbone not in ("timm", "clip"):
            raise ValueError(f"StructureDistance: backbone must be 'timm' or 'clip', got {backbone!r}")
        if backbone == "clip" and pie_bench_compat:
            raise ValueError("StructureDistance: pie_bench_compat applies to the timm DINO backbone only")
        env = resolve_pie_bench_env(pie_bench_env, "StructureDistance")
        if env is not None:
            if not pie_bench_compat:
                raise ValueError(f"StructureDistance: pie_bench_env={env.name!r} applies to PIE-Bench's structure "
                                 f"distance only (backbone='timm', pie_bench_compat=true)")
            if antialias is not None and bool(antialias) != env.antialias:
                raise ValueError(f"StructureDistance: antialias={antialias} contradicts pie_bench_env={env.name!r} "
                                 f"(antialias={env.antialias}); drop one of them")
            antialias = env.antialias
        self.pie_bench_env = None if env is None else env.name
        self.edit_jpeg = env is not None and env.edit_jpeg
        self.backbone, self.arch, self.weights = backbone, arch, weights
        self.model_kwargs = dict(model_kwargs or {})
        self.clip_model, self.clip_pretrained = clip_model, clip_pretrained
        self.resize, self.max_size, self.pie_bench_compat = resize, max_size, pie_bench_compat
        self.antialias = bool(antialias) if antialias is not None else False
        self.extractor = None

    @property
    def output_keys(self):
        return ["structure_dist"]

    def _load(self):
        if self.backbone == "timm":
            model = load_timm_vit(self.arch, self.weights, self.model_kwargs, self.device)
            self.extractor = TimmViTKeys(model, self.resize, self.max_size, self.pie_bench_compat, self.antialias)
        else:
            from oig.clip import load_clip

            self.extractor = OpenCLIPTowerKeys(load_clip(self.clip_model, self.clip_pretrained, device=self.device))

    def compute(self, batch: list[MetricInput]) -> list[dict[str, float]]:
        for s in batch:
            same_size(s.source, s.edit, "StructureDistance", task=s.task)
        src = [self.extractor.preprocess(s.source) for s in batch]
        edt = [self.extractor.preprocess(s.edit) for s in batch]
        dist = [float("nan")] * len(batch)
        for idx in groups_by([tuple(x.shape) for x in src]):
            x = torch.stack([src[i] for i in idx] + [edt[i] for i in idx]).to(self.device)
            k = self.extractor.keys(x)
            d = structure_distance(k[: len(idx)], k[len(idx) :]).cpu().tolist()
            for i, v in zip(idx, d):
                dist[i] = float(v)
        return [{"structure_dist": v} for v in dist]
