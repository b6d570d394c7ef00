"""Evaluation metrics for text-driven image editing.

Every metric is a :class:`eval.base.Metric` (registered in :mod:`oig.registry` and reachable
by Hydra ``_target_``) that maps a list of :class:`eval.base.MetricInput` to per-sample
``{key: float}`` dicts: :mod:`eval.clip` (CLIP score / accuracy / direction / edited region),
:mod:`eval.structure` (DINO key self-similarity distance), :mod:`eval.background` (LPIPS,
PSNR, SSIM, MSE outside the edit mask), :mod:`eval.toy` (exact toy-world oracle metrics).
:mod:`eval.aggregate` turns result rows into mean / std / n / 95% CI tables.
"""
