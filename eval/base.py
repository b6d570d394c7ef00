"""What every metric shares: the input record, the base class and small pixel helpers.

Conventions used by every metric of this package:

* Images arrive as RGB PIL images; a metric converts them to float tensors in [0, 1]
  (:func:`to_tensor01`) unless its docstring says otherwise.
* ``mask`` is a boolean HxW array at the edit's size, True where the edit is *meant* to
  change pixels (the edited region); everything else is background. A mask of another size
  is resized with nearest neighbour.
* Every metric returns one dict per sample, ``{key: float}``, in input order. NaN means
  "not defined for this sample" (e.g. no mask for a background metric); the aggregation
  (:mod:`eval.aggregate`) drops NaN values per metric.
* PSNR of two identical images (MSE = 0) is **capped at** :data:`PSNR_CAP_DB` (100 dB)
  instead of being infinite, everywhere in this package (background and toy metrics), so
  means stay finite. Near-identical images above 100 dB are capped too (one 8-bit level in
  one channel of one pixel of a 512x512 image would be 107 dB); that loses nothing in practice.
* PIE-Bench's evaluation environment (``pie_bench_env`` of the PIE-Bench metrics, see
  :data:`PIE_BENCH_ENVS`): ``"published"`` reproduces the 2023 setup behind its Table 1, in which
  every edit was scored after a round trip through a JPEG file (:func:`jpeg_round_trip`, applied
  by :meth:`Metric.__call__` to the edit, never to the source, before the metric reads it);
  ``"current"`` is the same peer code run on today's libraries, on the lossless edit.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

PSNR_CAP_DB = 100.0


@dataclass(frozen=True)
class PieBenchEnv:
    """One PIE-Bench evaluation environment: what its metrics do differently in it.

    ``edit_jpeg``: score the edit after a JPEG round trip at PIL's default settings
    (:func:`jpeg_round_trip`); ``ssim_border``: pixels cropped from each side of the SSIM map
    before averaging it; ``antialias``: antialiased resize in the structure distance.
    """

    name: str
    edit_jpeg: bool
    ssim_border: int
    antialias: bool


#: PIE-Bench's evaluation environments (``pie_bench_env`` of the PIE-Bench metrics).
#:
#: ``published`` -- the 2023 environment of the paper's Table 1 (PnPInversion, commit 07f97f4):
#: the ``run_editing_*.py`` scripts save ``[prompt text | source | reconstruction | edit]`` as one
#: ``.jpg`` with ``PIL.Image.save`` defaults (quality 75, 4:2:0), e.g. ``run_editing_p2p.py:115,141``
#: and ``models/p2p_editor.py:197``, and ``evaluation/evaluate.py:270-273`` crops the right-most
#: 512x512 back out of the decoded file (the source is the dataset's own JPEG, read as is,
#: ``evaluate.py:260-261``); torchmetrics <= 1.4.1 (every 2023 release) averaged the SSIM map
#: without a 5-pixel border (``functional/image/ssim.py``; the crop was removed by
#: Lightning-AI/torchmetrics#2721, released in 1.4.2); the README's environment
#: (``torchvision==0.13.1``, README.md:71; any torchvision < 0.17) resized tensors without
#: antialiasing (``antialias=None`` meant False for tensors; the default became True in 0.17).
#: ``current`` -- the same evaluation code on today's libraries: lossless edit, full SSIM map,
#: antialiased resize.
#:
#: Measured sizes (7 photos centre-cropped to 512x512, an ellipse mask over 32% of the frame plus
#: PIE-Bench's border, ``convention="pie_bench"``; ``published - current`` unless said):
#: the JPEG round trip alone takes an untouched background from PSNR 100 (cap) to 40.1 dB
#: (37.5-45.2) and SSIM x100 by -2.7; on an edit whose background is at 36.4 dB (Gaussian blur,
#: sigma 1) it costs -1.5 dB (-0.5 to -4.7; MSE x1.50) and -2.0 SSIM x100; at 31.8 dB (4x
#: down/up-sampling) -0.3 dB (-0.1 to -1.0; MSE x1.08) and -0.8 SSIM x100: the closer the
#: background, the larger the effect (PIE-Bench's published rows sit at 17.9-27.2 dB). The
#: 5-pixel SSIM border alone: -0.10 (blur) and -0.26 (down/up) SSIM x100, 0 on an untouched
#: background. Antialiasing changes DINO's 224x224 input by 0.5-6% (relative L2) on photos; its
#: effect on the structure distance, and the JPEG's on LPIPS and CLIP, need the real DINO /
#: SqueezeNet / CLIP weights and were not measured. torchmetrics' variance clamp (1.3.2+, absent
#: in 2023) moves SSIM by <= 3e-5 on these photos and is not reproduced.
PIE_BENCH_ENVS = {
    "published": PieBenchEnv("published", edit_jpeg=True, ssim_border=5, antialias=False),
    "current": PieBenchEnv("current", edit_jpeg=False, ssim_border=0, antialias=True),
}


def resolve_pie_bench_env(name: str | None, who: str) -> PieBenchEnv | None:
    """The :class:`PieBenchEnv` called ``name`` (None stays None), or a ValueError naming ``who``."""
    if name is None:
        return None
    if name not in PIE_BENCH_ENVS:
        raise ValueError(f"{who}: pie_bench_env must be one of {list(PIE_BENCH_ENVS)} (or null), got {name!r}")
    return PIE_BENCH_ENVS[name]


def jpeg_round_trip(img: Image.Image) -> Image.Image:
    """``img`` saved as a JPEG with ``PIL.Image.save``'s defaults (quality 75, 4:2:0 chroma
    subsampling, baseline) in memory and decoded again: what PIE-Bench's runners did to every
    edit by saving it inside a ``.jpg`` panel. The panel's other images touch the edit's pixels
    only through the chroma of its first column (libjpeg's decoder interpolates chroma across
    the 16-pixel-aligned panel boundary); everything else is bit-identical to the crop."""
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG")
    buf.seek(0)
    with Image.open(buf) as im:
        return im.convert("RGB")


@dataclass
class MetricInput:
    """One (source, edit) pair as the runner hands it to the metrics.

    ``source`` is the preprocessed source image (same size as ``edit``), ``edit`` the edited
    image, both RGB PIL. ``mask`` is bool HxW at edit size, True = region meant to be edited.
    ``target_image`` is the exact answer when known (toy world). ``meta`` carries extra
    ground truth; for the toy world ``meta["source_scene"]`` and ``meta["target_scene"]``
    are :class:`oig.toy.world.Scene` objects.
    """

    source: Image.Image
    edit: Image.Image
    source_prompt: str
    target_prompt: str
    mask: np.ndarray | None = None
    target_image: Image.Image | None = None
    task: str = ""
    meta: dict = field(default_factory=dict)


class Metric:
    """Base class of all metrics.

    Hyperparameters are ``__init__`` arguments (so Hydra can instantiate a metric from a
    config); networks are loaded in :meth:`setup`, called once by the runner (or lazily on
    first use, on CPU). ``__call__`` takes a list of :class:`MetricInput` and returns one
    ``{key: float}`` dict per sample; subclasses implement :meth:`compute`.
    """

    name: str = "metric"

    def __init__(self, batch_size: int = 16):
        if int(batch_size) < 1:
            raise ValueError(f"{type(self).__name__}: batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.device = torch.device("cpu")
        self._ready = False
        #: score ``jpeg_round_trip(edit)`` instead of the edit (PIE-Bench's published environment)
        self.edit_jpeg = False

    @property
    def output_keys(self) -> list[str]:
        """The keys every per-sample dict of this metric (as configured) contains."""
        raise NotImplementedError

    def setup(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self._load()
        self._ready = True

    def _load(self) -> None:
        """Load networks onto ``self.device`` (subclasses without networks do nothing)."""

    @torch.no_grad()
    def __call__(self, batch: list[MetricInput]) -> list[dict[str, float]]:
        if not self._ready:
            self.setup(self.device)
        batch = list(batch)
        for i, s in enumerate(batch):
            _check_input(s, i, type(self).__name__)
        if self.edit_jpeg:  # the edit as PIE-Bench's evaluation read it back from its .jpg panel
            batch = [dataclasses.replace(s, edit=jpeg_round_trip(s.edit)) for s in batch]
        out: list[dict[str, float]] = []
        for k in range(0, len(batch), self.batch_size):
            out.extend(self.compute(batch[k : k + self.batch_size]))
        return out

    def compute(self, batch: list[MetricInput]) -> list[dict[str, float]]:
        raise NotImplementedError


def _check_input(s: MetricInput, i: int, who: str):
    for attr in ("source", "edit"):
        im = getattr(s, attr)
        if not isinstance(im, Image.Image):
            raise TypeError(f"{who}: sample {i} (task {s.task!r}): {attr} must be a PIL image, got {type(im).__name__}")
    if s.mask is not None:
        m = np.asarray(s.mask)
        if m.ndim != 2:
            raise ValueError(f"{who}: sample {i} (task {s.task!r}): mask must be a 2-D HxW array, got shape {m.shape}")


# --------------------------------------------------------------------------------------
# pixel helpers


def to_tensor01(images: list[Image.Image]) -> torch.Tensor:
    """Same-size RGB PIL images -> float32 tensor (B, 3, H, W) in [0, 1]."""
    a = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]) / 255.0
    return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()


def mask_at(mask: np.ndarray | None, size: tuple[int, int]) -> np.ndarray | None:
    """Boolean mask resized (nearest) to PIL ``size`` = (W, H); None stays None."""
    if mask is None:
        return None
    m = np.asarray(mask)
    if m.dtype != bool:
        m = m > (127 if m.dtype == np.uint8 and m.max() > 1 else 0.5)
    if m.shape != (size[1], size[0]):
        m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127
    return m


def same_size(a: Image.Image, b: Image.Image, who: str, what: str = "source and edit", task: str = ""):
    if a.size != b.size:
        raise ValueError(f"{who}: {what} must have the same size, got {a.size} and {b.size} (task {task!r})")


def psnr_from_mse(mse: float, data_range: float = 1.0) -> float:
    """PSNR in dB from an MSE, capped at :data:`PSNR_CAP_DB` (so MSE = 0 gives 100 dB). NaN stays NaN."""
    if mse is None or (isinstance(mse, float) and math.isnan(mse)):
        return float("nan")
    mse = float(mse)
    if mse <= 0.0:
        return PSNR_CAP_DB
    return min(PSNR_CAP_DB, 10.0 * math.log10(data_range**2 / mse))


def groups_by(keys: list) -> list[list[int]]:
    """Indices grouped by equal key, groups in order of first appearance (to batch same-size images)."""
    out: dict = {}
    for i, k in enumerate(keys):
        out.setdefault(k, []).append(i)
    return list(out.values())


NAN = float("nan")
