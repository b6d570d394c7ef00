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
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

PSNR_CAP_DB = 100.0


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
