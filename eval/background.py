"""Background preservation: LPIPS, PSNR, SSIM and MSE outside the edit mask.

Keys: ``bg_lpips``, ``bg_psnr`` (dB), ``bg_ssim``, ``bg_mse`` (the ones listed in ``metrics``).
Input convention: source and edit RGB PIL images of the same size, converted to [0, 1]
(data range 1 for PSNR/SSIM/MSE; LPIPS gets [-1, 1] = 2x - 1, as the ``lpips`` package
expects). ``mask`` is True in the region meant to be edited; the background is its complement.

Two masking conventions:

* ``convention="outside"`` (default): only background pixels count.
  MSE = mean of (source - edit)^2 over background pixels and channels; PSNR = 10 log10(1 / MSE).
  For SSIM and LPIPS, which look at neighbourhoods, the edited region of the edit is first
  filled with the source's pixels, so both images are identical there (``composite = edit``
  outside the mask, ``source`` inside); SSIM is then the mean of the SSIM map (torchmetrics,
  Gaussian window 11, sigma 1.5) over background pixels, LPIPS the ``lpips`` network's value
  for (source, composite) on the full frame. An edit that leaves the background untouched
  scores LPIPS 0, SSIM 1, MSE 0 whatever it does inside the mask. With an all-False mask
  every value equals the plain full-frame metric (torchmetrics' / the ``lpips`` package's).
* ``convention="pie_bench"``: PIE-Bench's evaluation code. The mask's 1-pixel image border is
  forced to "edited", both images are multiplied by the unedited mask (edited region set to 0,
  i.e. black) and the four metrics are computed on the full frame with torchmetrics' defaults
  (so the zeroed region dilutes MSE and lifts PSNR/SSIM). PIE-Bench's tables scale the values
  (LPIPS x 10^3, MSE x 10^4, SSIM x 10^2); we return them unscaled. Use ``lpips_net="squeeze"``
  for parity with PIE-Bench.

  ``pie_bench_env`` (``convention="pie_bench"`` only; :data:`eval.base.PIE_BENCH_ENVS`):
  ``"published"`` scores the edit after PIE-Bench's JPEG round trip and averages the SSIM map
  without its 5-pixel border, as torchmetrics <= 1.4.1 did (the environment of PIE-Bench's
  Table 1); ``"current"`` (and ``None``) scores the lossless edit and averages the full SSIM map,
  as torchmetrics >= 1.4.2 does.

NaN rules: no mask (and no ``mask_from_text``) gives NaN for every key (the background is
unknown); a mask that leaves no background pixel gives NaN (PIE-Bench does the same).
PSNR of an untouched background is capped at 100 dB (:data:`eval.base.PSNR_CAP_DB`) where
torchmetrics would return inf.

LPIPS weights: the ``lpips`` package ships its linear layers; the backbone is torchvision's
ImageNet AlexNet / SqueezeNet 1.1 / VGG16, which torchvision loads from
``$TORCH_HOME/hub/checkpoints/<file>`` (downloading it there when online). Offline, that file
must already be there; :func:`lpips_backbone_file` names it and :func:`load_lpips` raises a
clear error when it is missing.

Masks: the sample's mask; if it has none and ``mask_from_text`` is set (a dict of
:class:`eval.masks.TextMasker` arguments, e.g. ``{model: CIDAS/clipseg-rd64-refined,
threshold: 0.4}``), a CLIPSeg mask of the edited words. CLIPSeg is loaded on the first sample
without a mask, so a dataset whose samples all carry masks never needs its weights; when it cannot
be loaded, each sample without a mask fails with the loader's error (a ``metric_error_background``
in the run's rows) and the others are scored.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from oig.registry import register_metric

from .base import (NAN, Metric, MetricInput, groups_by, mask_at, psnr_from_mse, resolve_pie_bench_env, same_size,
                   to_tensor01)
from .clip import force_border

log = logging.getLogger(__name__)

_BACKBONE_WEIGHTS = {"alex": "AlexNet_Weights", "squeeze": "SqueezeNet1_1_Weights", "vgg": "VGG16_Weights"}


def lpips_backbone_file(net: str) -> tuple[Path, str]:
    """Where torchvision looks for the LPIPS backbone weights, and the URL it downloads them from."""
    import torchvision

    if net not in _BACKBONE_WEIGHTS:
        raise ValueError(f"unknown LPIPS network {net!r}; use one of {sorted(_BACKBONE_WEIGHTS)}")
    url = getattr(torchvision.models, _BACKBONE_WEIGHTS[net]).IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1], url


def load_lpips(net: str = "alex", device="cpu") -> torch.nn.Module:
    """The ``lpips`` package's LPIPS (v0.1, linear layers shipped with the package)."""
    path, url = lpips_backbone_file(net)
    if not path.is_file():
        raise FileNotFoundError(
            f"LPIPS({net}) needs torchvision's ImageNet backbone weights at {path}, which is missing and cannot be "
            f"downloaded offline. Copy the file from {url} there (the folder is $TORCH_HOME/hub/checkpoints, "
            f"TORCH_HOME defaults to ~/.cache/torch), or drop 'lpips' from the background metrics")
    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's 'pretrained=' deprecation inside lpips
        model = lpips.LPIPS(net=net, verbose=False)
    return model.to(device).eval().requires_grad_(False)


def _ssim_map(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torchmetrics' full SSIM map (Gaussian window 11, sigma 1.5, reflect-padded: same size as the input)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    _, full = structural_similarity_index_measure(a, b, data_range=1.0, reduction="none", return_full_image=True)
    return full


def ssim_mean(a: torch.Tensor, b: torch.Tensor, border: int = 0) -> float:
    """Mean of the SSIM map of two (1, C, H, W) images in [0, 1] without ``border`` pixels on each
    side: ``border=0`` is torchmetrics >= 1.4.2's value, ``border=5`` torchmetrics <= 1.4.1's (it
    cropped (kernel - 1) / 2 = 5 pixels of the reflect-padded map before averaging)."""
    full = _ssim_map(a, b)
    if border:
        if min(full.shape[-2:]) <= 2 * border:
            raise ValueError(f"SSIM: a {tuple(full.shape[-2:])} image has nothing left inside a {border}-pixel border")
        full = full[..., border:-border, border:-border]
    return float(full.mean())


@register_metric("background")
class BackgroundMetrics(Metric):
    """Background LPIPS / PSNR / SSIM / MSE (see the module docstring for both conventions)."""

    ALL = ("lpips", "psnr", "ssim", "mse")

    def __init__(self, metrics: list[str] | tuple[str, ...] = ALL, lpips_net: str = "alex",
                 convention: str = "outside", mask_from_text: Mapping | None = None,
                 pie_bench_env: str | None = None, batch_size: int = 16):
        super().__init__(batch_size)
        metrics = list(metrics)
        bad = [m for m in metrics if m not in self.ALL]
        if bad or not metrics:
            raise ValueError(f"BackgroundMetrics: unknown metrics {bad or metrics}; choose from {list(self.ALL)}")
        if convention not in ("outside", "pie_bench"):
            raise ValueError(f"BackgroundMetrics: convention must be 'outside' or 'pie_bench', got {convention!r}")
        if lpips_net not in _BACKBONE_WEIGHTS:
            raise ValueError(f"BackgroundMetrics: lpips_net must be one of {sorted(_BACKBONE_WEIGHTS)}, got {lpips_net!r}")
        env = resolve_pie_bench_env(pie_bench_env, "BackgroundMetrics")
        if env is not None and convention != "pie_bench":
            raise ValueError(f"BackgroundMetrics: pie_bench_env={env.name!r} applies to convention='pie_bench' only, "
                             f"got convention={convention!r}")
        self.metrics, self.lpips_net, self.convention = metrics, lpips_net, convention
        self.pie_bench_env = None if env is None else env.name
        self.ssim_border = 0 if env is None else env.ssim_border
        self.edit_jpeg = env is not None and env.edit_jpeg
        self.mask_from_text = None if mask_from_text is None else dict(mask_from_text)
        self.lpips = None
        self.masker = None

    @property
    def output_keys(self):
        return [f"bg_{m}" for m in self.metrics]

    def _load(self):
        if "lpips" in self.metrics:
            self.lpips = load_lpips(self.lpips_net, self.device)
        if self.mask_from_text is not None:  # arguments checked now, CLIPSeg loaded by the first maskless sample
            from .masks import TextMasker

            self.masker = TextMasker(**{**self.mask_from_text, "device": self.device})

    def _mask(self, s: MetricInput) -> np.ndarray | None:
        m = mask_at(s.mask, s.edit.size)
        if m is None and self.masker is not None:
            m = self.masker.edit_mask(s.source, s.edit, s.source_prompt, s.target_prompt)
        return m

    def compute(self, batch: list[MetricInput]) -> list[dict[str, float]]:
        rows = [{k: NAN for k in self.output_keys} for _ in batch]
        todo = []  # (index, a, b, background mask) with a, b the two (1, 3, H, W) images the metrics compare
        for i, s in enumerate(batch):
            same_size(s.source, s.edit, "BackgroundMetrics", task=s.task)
            m = self._mask(s)
            if m is None:
                continue
            src, edt = to_tensor01([s.source]), to_tensor01([s.edit])
            if self.convention == "pie_bench":
                keep = ~force_border(m)
                if not keep.any():
                    continue
                k = torch.from_numpy(keep).float()[None, None]
                todo.append((i, src * k, edt * k, None))
            else:
                bg = ~m
                if not bg.any():
                    continue
                b = torch.from_numpy(bg)[None, None]
                todo.append((i, src, torch.where(b, edt, src), b))
        if not todo:
            return rows
        for i, a, b, bg in todo:
            if bg is None:  # pie_bench: full frame of the zeroed images
                mse = float(((a - b) ** 2).mean())
                ssim = ssim_mean(b, a, self.ssim_border) if "ssim" in self.metrics else NAN
            else:
                sel = bg.expand_as(a)
                mse = float(((a - b)[sel] ** 2).mean())
                ssim = float(_ssim_map(b, a)[sel].mean()) if "ssim" in self.metrics else NAN
            vals = {"mse": mse, "psnr": psnr_from_mse(mse), "ssim": ssim}
            for m in self.metrics:
                if m != "lpips":
                    rows[i][f"bg_{m}"] = vals[m]
        if "lpips" in self.metrics:
            for grp in groups_by([tuple(t[1].shape) for t in todo]):
                a = torch.cat([todo[j][1] for j in grp]).to(self.device)
                b = torch.cat([todo[j][2] for j in grp]).to(self.device)
                d = self.lpips(a * 2 - 1, b * 2 - 1).flatten().cpu().tolist()
                for j, v in zip(grp, d):
                    rows[todo[j][0]]["bg_lpips"] = float(v)
        return rows
