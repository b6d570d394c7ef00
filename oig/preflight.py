"""``oig-check``: is a configuration ready to run? Checked before a long sweep, in minutes.

``oig-check [CONFIG.yaml] [OVERRIDES...]`` (or ``python -m oig.preflight ...``) composes the same
configuration ``oig-run`` would (or reads a run folder's resolved ``config.yaml``), then does what
the run does up to its first edit, catching every failure instead of stopping at the first:

* **model folder** -- a local Stable Diffusion folder has ``unet/ vae/ text_encoder/ tokenizer/
  scheduler/`` with their configs and weights (a hub id is looked up in the HF cache);
* **scheduler** -- the ``prediction_type`` it declares (``epsilon``; ``v_prediction`` is converted
  to ε at load; anything else is refused), ``clip_sample`` / ``set_alpha_to_one`` (forced to False
  as Stable Diffusion ships them), ``steps_offset`` and that the ``timestep_spacing`` gives an evenly
  spaced DDIM grid at every checked editor's step count;
* **device / dtype** -- the dtype exists on the device (a convolution and a softmax run in it);
* **model** -- :func:`oig.models.load_sd` loads it; **tokenizer** -- its length fits the text encoder;
* **dataset** -- every sample opens (unreadable ones would become error rows), how many carry masks,
  prompts longer than the tokenizer;
* per editor: **guidance CLIP** (editors that use one: its activation, QuickGELU for OpenAI weights,
  by declaration, see :func:`oig.clip.clip_activation`) and **editor** -- bound to the model and
  run on the first readable sample at ``--steps`` steps (default 3; the configured count when the
  editor refuses so few), finite output of the source's size, seconds and peak memory;
* per metric: its networks load, then it scores that edit; the CLIPSeg segmenter of
  ``mask_from_text`` is needed only when some sample has no mask of its own (and says so).

Models a run does not need are not required: the guidance CLIP of an editor that does not use it,
CLIPSeg when every sample carries a mask, LPIPS when no metric asks for it. The result is a table,
``check | status | detail | fix``, status ``ready``, ``missing`` (weights or files not there) or
``wrong`` (there but unusable); ``fix`` is the override (or the one edit) that repairs the row.
The exit status is 0 when every row is ready.

Several editors: ``method=a,b`` or an experiment whose sweep lists methods (``experiment=table1``)
checks each of them with its protocol settings; the model, dataset and metrics are checked once per
distinct configuration. Nothing is written to the inversion cache.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

READY, MISSING, WRONG = "ready", "missing", "wrong"
#: weights files diffusers / transformers read, by extension
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt")
#: what each subfolder of a Stable Diffusion folder must hold: (config file, needs weights)
SD_LAYOUT = {
    "unet": ("config.json", True),
    "vae": ("config.json", True),
    "text_encoder": ("config.json", True),
    "tokenizer": ("vocab.json", False),
    "scheduler": ("scheduler_config.json", False),
}


@dataclass
class Check:
    """One row of the table: what was checked, ``ready`` / ``missing`` / ``wrong``, what was found, and
    the override (or edit) that fixes it."""

    name: str
    status: str
    detail: str
    fix: str = ""

    @property
    def ok(self) -> bool:
        return self.status == READY


def _line(e: BaseException) -> str:
    from oig.data.base import one_line

    return f"{type(e).__name__}: {one_line(str(e))}"[:600]


# ---------------------------------------------------------------------------------- model
def check_sd_folder(pretrained: str) -> Check:
    """The Stable Diffusion layout of a local folder (a hub id is only named: the load checks it)."""
    from oig.models import resolve_path

    path = resolve_path(pretrained)
    p = Path(path)
    if not p.is_dir():
        if p.is_absolute() or path.startswith("."):
            return Check("model folder", MISSING, f"{path} does not exist",
                         "model.pretrained=<a save_pretrained folder: unet/ vae/ text_encoder/ tokenizer/ scheduler/>")
        return Check("model folder", READY, f"hub id {path}: read from the Hugging Face cache (checked by the load)")
    problems = []
    for sub, (config, weights) in SD_LAYOUT.items():
        d = p / sub
        if not d.is_dir():
            problems.append(f"no {sub}/")
        elif not (d / config).is_file():
            problems.append(f"{sub}/ has no {config}")
        elif weights and not any(f.suffix in _WEIGHT_SUFFIXES for f in d.iterdir()):
            problems.append(f"{sub}/ has no weights ({', '.join('*' + s for s in _WEIGHT_SUFFIXES[:2])})")
    if problems:
        return Check("model folder", MISSING, f"{path}: {'; '.join(problems)}",
                     f"copy the missing parts from the model's repository into {path} (`huggingface-cli download "
                     f"<hub id> --local-dir {path}`), or model.pretrained=<a complete save_pretrained folder>")
    return Check("model folder", READY, f"{path}: {', '.join(s + '/' for s in SD_LAYOUT)}")


def _scheduler_config(path: str) -> dict:
    """The raw scheduler config, read as :func:`oig.models.load_sd` reads it (no download when offline)."""
    import os

    from diffusers import DDIMScheduler

    offline = Path(path).is_dir() or os.environ.get("HF_HUB_OFFLINE") == "1"
    return dict(DDIMScheduler.load_config(path, subfolder="scheduler", local_files_only=offline))


def check_scheduler(pretrained: str, steps_offset: int | None, steps: Sequence[int]) -> Check:
    """What the scheduler config declares, what the loader makes of it, and the DDIM grid at ``steps``."""
    from diffusers import DDIMScheduler

    from oig.diffusion import PREDICTION_TYPES
    from oig.models import SD_SCHEDULER_SETTINGS, resolve_path

    path = resolve_path(pretrained)
    try:
        cfg = _scheduler_config(path)
    except Exception as e:  # noqa: BLE001 - reported, not raised
        return Check("scheduler", MISSING, f"no scheduler config for {path}: {_line(e)}",
                     "model.pretrained=<a folder with scheduler/scheduler_config.json>")
    notes = []
    pred = cfg.get("prediction_type", "epsilon")
    where = f"{path}/scheduler/scheduler_config.json" if Path(path).is_dir() else f"{path} scheduler config"
    if pred not in PREDICTION_TYPES:
        return Check("scheduler", WRONG,
                     f"prediction_type={pred!r}; the editors support {' and '.join(PREDICTION_TYPES)}",
                     "model.pretrained=<a checkpoint trained for epsilon or v_prediction>")
    notes.append(f"prediction_type={pred}" + (" (U-Net output converted to ε at load)" if pred != "epsilon" else ""))
    forced = {k: cfg.get(k) for k, v in SD_SCHEDULER_SETTINGS.items() if cfg.get(k) != v}
    if forced:
        notes.append("file has " + ", ".join(f"{k}={v}" for k, v in forced.items()) + "; load_sd uses "
                     + ", ".join(f"{k}=False" for k in forced) + " as Stable Diffusion ships")
    else:
        notes.append("clip_sample=False, set_alpha_to_one=False")
    effective = {**cfg, **SD_SCHEDULER_SETTINGS}
    if steps_offset is not None:
        effective["steps_offset"] = int(steps_offset)
    spacing = effective.get("timestep_spacing", "leading")
    notes.append(f"timestep_spacing={spacing}, steps_offset={effective.get('steps_offset', 0)}")
    sched = DDIMScheduler.from_config({k: v for k, v in effective.items() if k != "_use_default_values"})
    T = int(effective.get("num_train_timesteps", 1000))
    for n in sorted(set(int(s) for s in steps)):
        try:
            sched.set_timesteps(n)
        except ValueError as e:
            return Check("scheduler", WRONG, f"{'; '.join(notes)}; {n} steps: {_line(e)}",
                         f'set "timestep_spacing": "leading" in {where}')
        ts = [int(t) for t in sched.timesteps]
        if any(a - b != T // n for a, b in zip(ts, ts[1:])):
            return Check("scheduler", WRONG,
                         f"{'; '.join(notes)}; the {n}-step grid {ts[:3]}... is not evenly spaced by {T // n}, which "
                         f"the DDIM update t -> t - {T // n} needs",
                         f'set "timestep_spacing": "leading" in {where} (what Stable Diffusion ships)')
        shown = ts if len(ts) <= 3 else [*ts[:2], "...", ts[-1]]
        notes.append(f"{n} steps: {', '.join(map(str, shown))}")
    return Check("scheduler", READY, "; ".join(notes))


def check_dtype(device: str, dtype: str) -> Check:
    """The dtype is usable on the device: the resolution rules, then a convolution and a softmax in it."""
    from oig.models import resolve_device, resolve_dtype

    try:
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
    except (ValueError, RuntimeError) as e:
        return Check("device / dtype", WRONG, _line(e), "dtype=fp32")
    try:
        if dev.type == "cuda" and dt == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            return Check("device / dtype", WRONG, f"{torch.cuda.get_device_name(dev)} has no bf16", "dtype=fp16")
        x = torch.randn(1, 4, 8, 8, device=dev, dtype=dt)
        y = torch.nn.functional.conv2d(x, torch.randn(4, 4, 3, 3, device=dev, dtype=dt), padding=1).flatten(1)
        y = torch.softmax(y @ y.T, -1)
        if not torch.isfinite(y.float()).all():
            raise RuntimeError("non-finite result of a tiny convolution")
    except Exception as e:  # noqa: BLE001 - the device itself may be unavailable
        return Check("device / dtype", WRONG, f"{dev} {dt}: {_line(e)}",
                     "device=cpu dtype=fp32" if dev.type != "cpu" else "dtype=fp32")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    return Check("device / dtype", READY, f"{dev} ({name}), {str(dt).replace('torch.', '')}")


def _model_key(cfg: DictConfig) -> tuple:
    """What :func:`oig.models.load_sd` memoises a model by (device and dtype resolved: ``auto`` is fp32 on a CPU)."""
    from oig.models import resolve_device, resolve_dtype

    try:
        dev = resolve_device(str(cfg.device))
        where = (str(dev), str(resolve_dtype(str(cfg.dtype), dev)))
    except (ValueError, RuntimeError):
        where = (str(cfg.device), str(cfg.dtype))
    return (str(cfg.model.pretrained), *where, cfg.model.get("revision"), cfg.model.get("steps_offset"))


def load_models(cfg: DictConfig):
    from oig.models import load_sd

    return load_sd(cfg.model.pretrained, device=cfg.device, dtype=cfg.dtype, revision=cfg.model.get("revision"),
                   steps_offset=cfg.model.get("steps_offset"))


def check_load(cfg: DictConfig) -> tuple[Check, Any]:
    try:
        t0 = time.perf_counter()
        m = load_models(cfg)
    except Exception as e:  # noqa: BLE001
        status = WRONG if isinstance(e, ValueError) and "prediction_type" in str(e) else MISSING
        return Check("model", status, _line(e), "model.pretrained=DIR (a save_pretrained folder)"), None
    unet, dt = m.unet.config, str(m.dtype).replace("torch.", "")
    return Check("model", READY,
                 f"{m.model_id}: resolution {m.resolution}, U-Net {list(unet.block_out_channels)} x "
                 f"{unet.layers_per_block}, {unet.in_channels} input channels, {dt} on {m.device} "
                 f"({time.perf_counter() - t0:.1f} s)"), m


def check_tokenizer(models) -> Check:
    tok, te = models.tokenizer, models.text_encoder.config
    n, pos = int(tok.model_max_length), int(te.max_position_embeddings)
    where = f"{models.model_id}/tokenizer/tokenizer_config.json"
    if n > pos:
        return Check("tokenizer", WRONG, f"model_max_length {n} > the text encoder's {pos} positions",
                     f'set "model_max_length": {pos} in {where}')
    if len(tok) > int(te.vocab_size):
        return Check("tokenizer", WRONG, f"{len(tok)} tokens > the text encoder's vocabulary of {te.vocab_size}",
                     "model.pretrained=<a folder whose tokenizer/ and text_encoder/ belong together>")
    return Check("tokenizer", READY, f"{n} tokens (text encoder: {pos} positions, vocabulary {te.vocab_size})")


# ---------------------------------------------------------------------------------- CLIPs
def _override_key(cfg_node: DictConfig, key: str, prefix: str) -> str:
    """The override that sets ``prefix.key``: the ``model.*`` key it interpolates, if it does."""
    raw = OmegaConf.to_container(cfg_node, resolve=False).get(key)
    if isinstance(raw, str) and raw.startswith("${") and raw.endswith("}") and ":" not in raw:
        return raw[2:-1]
    return f"{prefix}.{key}"


def _activation_fix(name: str, name_key: str) -> str:
    from oig.clip import quick_gelu_name, split_schema

    twin = quick_gelu_name(name)
    if twin:
        return f"{name_key}={twin}"
    schema, folder = split_schema(name)
    if schema == "local-dir":
        return f'set "quick_gelu": true in model_cfg of {folder}/open_clip_config.json'
    return "declare QuickGELU for this CLIP (see oig.clip.clip_activation)"


def _weights_fix(name: str, pretrained, name_key: str, weights_key: str) -> str:
    """The override pointing a CLIP at a local weights file; when only the pretrained tag declared QuickGELU
    (``ViT-B-32`` + ``openai``), the QuickGELU architecture name too, so the file keeps it."""
    from oig.clip import CLIPActivationError, clip_activation, quick_gelu_name

    fix = f"{weights_key}=/path/to/open_clip_pytorch_model.bin"
    try:
        act = clip_activation(name, pretrained)
    except CLIPActivationError:
        return fix
    twin = quick_gelu_name(name)
    return f"{name_key}={twin} {fix}" if act.quick_gelu and twin else fix


def check_guidance_clip(cfg: DictConfig, label: str, device, dtype) -> Check | None:
    """The editor's guidance CLIP (``clip_model`` / ``clip_pretrained``), when the editor would load it."""
    from oig.clip import CLIPActivationError, clip_activation, load_clip

    m = cfg.method
    if "clip_model" not in m:
        return None
    name = f"guidance CLIP ({label})"
    name_key = _override_key(m, "clip_model", "method")
    weights_key = _override_key(m, "clip_pretrained", "method") if "clip_pretrained" in m else "method.clip_pretrained"
    if float(m.get("lambda1", 1.0)) == 0.0 or m.get("clip_term", "triplet") == "off":
        return Check(name, READY, "not needed (lambda1 = 0 or clip_term = off)")
    clip_name, pretrained = str(m.clip_model), m.get("clip_pretrained")
    try:
        act = clip_activation(clip_name, pretrained)
    except CLIPActivationError as e:
        return Check(name, WRONG, str(e), _activation_fix(clip_name, name_key))
    try:
        load_clip(clip_name, pretrained, device, dtype)
    except Exception as e:  # noqa: BLE001
        return Check(name, MISSING, _line(e), _weights_fix(clip_name, pretrained, name_key, weights_key))
    detail = f"{clip_name} ({pretrained}): {act.name}, {act.reason}"
    if not act.quick_gelu and pretrained and Path(str(pretrained)).is_file():
        twin = _activation_fix(clip_name, name_key)
        detail += f"; if these are OpenAI's weights, declare QuickGELU: {twin}"
    return Check(name, READY, detail)


# ---------------------------------------------------------------------------------- dataset
@dataclass
class DatasetScan:
    check: Check
    first: Any = None      # the first readable sample
    n: int = 0
    without_mask: int = 0


def scan_dataset(cfg: DictConfig, tokenizer=None, limit: int | None = None) -> DatasetScan:
    """Instantiate the dataset and open every sample (the first ``limit``)."""
    from hydra.utils import instantiate

    try:
        ds = instantiate(cfg.dataset)
    except Exception as e:  # noqa: BLE001
        d = cfg.dataset
        key = next((k for k in ("path", "root", "manifest", "file")
                    if k in d.keys() and (OmegaConf.is_missing(d, k) or d.get(k) is not None)), None)
        fix = "see the dataset's config (conf/dataset/)" if key is None else f"dataset.{key}=<the {key}>"
        return DatasetScan(Check("dataset", MISSING, _line(e.__cause__ or e), fix))
    n = bad = masks = long_prompts = 0
    errors, first = [], None
    maxlen = int(tokenizer.model_max_length) if tokenizer is not None else None
    try:
        for s in ds:
            n += 1
            if s.error or s.image is None:
                bad += 1
                if len(errors) < 3:
                    errors.append(f"{s.id}: {s.error}")
            else:
                first = first or s
                masks += s.mask is not None
                if maxlen is not None:
                    prompts = [p for p in (s.source_prompt, s.target_prompt) if isinstance(p, str)]
                    long_prompts += sum(len(tokenizer(p).input_ids) > maxlen for p in prompts)
            if limit is not None and n >= limit:
                break
    except Exception as e:  # noqa: BLE001 - a configuration error (missing captioner, ...)
        return DatasetScan(Check("dataset", MISSING, f"after {n} samples: {_line(e)}", "see the dataset's config"))
    name = getattr(ds, "name", type(ds).__name__)
    scope = f"the first {n}" if limit is not None and n >= limit else f"all {n}"
    detail = (f"{name}: {scope} samples checked, {n - bad} open, {masks} with a mask"
              + (f"; {long_prompts} prompts longer than {maxlen} tokens are truncated" if long_prompts else ""))
    if n == 0:
        return DatasetScan(Check("dataset", WRONG, f"{name}: no samples", "check dataset.limit / shard / tasks"))
    if bad:
        return DatasetScan(Check("dataset", WRONG, f"{detail}; {bad} cannot be read: {'; '.join(errors)}",
                                 "fix or remove those files (otherwise each becomes an error row)"), first, n,
                           n - bad - masks)
    return DatasetScan(Check("dataset", READY, detail), first, n, n - masks)


# ---------------------------------------------------------------------------------- editor
def _peak_mb(device: torch.device) -> float:
    """CUDA: peak allocated since the reset before the edit; CPU: the process's peak RSS (as the runner's rows)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def check_editor(cfg: DictConfig, label: str, models, sample, steps: int):
    """Bind the editor and run it on ``sample`` at ``steps`` steps. Returns ``(Check, EditResult | None)``."""
    from hydra.utils import instantiate

    from oig.models import WeightsNotFoundError
    from oig.types import EditRequest

    name = f"editor {label}"
    if models is None:
        return Check(name, MISSING, "needs the model (see the model row)", ""), None
    if sample is None:
        return Check(name, MISSING, "needs a readable sample (see the dataset row)", ""), None
    from oig import sweep

    mcfg = OmegaConf.to_container(cfg.method, resolve=True)
    configured = mcfg.get("steps")
    note = ""
    try:
        points = sweep.points(mcfg)  # a sweep (vector values) is checked as it runs: every point, one call

        def build(m):
            return [instantiate(sweep.apply(m, p)) for p in points]

        try:
            k = min(int(steps), int(configured)) if configured is not None else None
            editors = build({**mcfg, "steps": k} if k is not None else mcfg)
        except Exception as e:  # noqa: BLE001 - too few steps for this editor's settings: run it as configured
            k = configured
            note = f" (fewer refused: {_line(e.__cause__ or e)[:160]})"
            editors = build(mcfg)
        for editor in editors:
            editor.bind(models, cache=None, progress=False)
        if models.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(models.device)
        t0 = time.perf_counter()
        req = EditRequest.from_sample(sample, seed=int(cfg.get("seed", 0)))
        res = editors[0].edit_points(req, editors)[0] if len(points) > 1 else editors[0](req)
        secs = time.perf_counter() - t0
        if len(points) > 1:
            note += f", {len(points)} sweep points in one call"
    except WeightsNotFoundError as e:
        fix = ("model.ip2p.unet=DIR model.ip2p.pretrained=DIR (an InstructPix2Pix folder)" if "unet" in mcfg
               else "model.pretrained=DIR")
        return Check(name, MISSING, _line(e), fix), None
    except Exception as e:  # noqa: BLE001
        return Check(name, WRONG, _line(e), ""), None
    a = np.asarray(res.image, dtype=np.float32)
    if not np.isfinite(a).all():
        return Check(name, WRONG, "non-finite edit", ""), None
    if res.image.size != res.source.size:
        return Check(name, WRONG, f"edit of size {res.image.size} for a source of {res.source.size}", ""), None
    detail = (f"{type(editor).__name__} on {sample.id}: {k} steps (configured {configured}){note}, "
              f"{res.image.size[0]}x{res.image.size[1]}, {secs:.1f} s, peak {_peak_mb(models.device):.0f} MB")
    return Check(name, READY, detail), res


# ---------------------------------------------------------------------------------- metrics
def _metric_fix(name: str, mcfg: DictConfig, err: BaseException) -> tuple[str, str]:
    from oig.clip import CLIPActivationError

    if isinstance(err, CLIPActivationError):
        key = "clip_model" if "clip_model" in mcfg else "model"
        model = str(mcfg.get(key))
        return WRONG, _activation_fix(model, f"metrics.{name}.{key}")
    msg = str(err)
    if "LPIPS" in msg:
        from eval.background import lpips_backbone_file

        path, url = lpips_backbone_file(str(mcfg.get("lpips_net", "alex")))
        return MISSING, f"copy {url} to {path}"
    if mcfg.get("backend") == "hf":
        return MISSING, f"metrics.{name}.model=/path/to/clip-vit-large-patch14 (a save_pretrained folder)"
    if mcfg.get("backbone") == "timm":
        return MISSING, f"metrics.{name}.weights=/path/to/{mcfg.get('arch', 'weights')}.pth"
    if "pretrained" in mcfg or "clip_pretrained" in mcfg:
        key, model_key = ("clip_pretrained", "clip_model") if "clip_pretrained" in mcfg else ("pretrained", "model")
        return MISSING, _weights_fix(str(mcfg.get(model_key)), mcfg.get(key), f"metrics.{name}.{model_key}",
                                     f"metrics.{name}.{key}")
    return MISSING, ""


def _activation_note(metric) -> str:
    for part in (getattr(metric, "encoder", None), getattr(metric, "extractor", None)):
        clip = getattr(part, "clip", None)
        if getattr(clip, "activation", None) is not None:
            return f"; CLIP {clip.activation.name} ({clip.activation.reason})"
        cfg = getattr(getattr(part, "model", None), "config", None)
        act = getattr(getattr(cfg, "text_config", None), "hidden_act", None)
        if act:
            return f"; CLIP activation {act} (the checkpoint's config)"
    return ""


def check_metrics(cfg: DictConfig, device, scan: DatasetScan) -> tuple[list[Check], dict]:
    """Instantiate and set up every metric (loads its networks); the CLIPSeg row when one masks from text."""
    from hydra.utils import instantiate

    rows, metrics = [], {}
    for name, mcfg in (cfg.get("metrics") or {}).items():
        label = f"metric {name}"
        try:
            m = instantiate(mcfg)
            m.setup(device)
        except Exception as e:  # noqa: BLE001
            status, fix = _metric_fix(name, mcfg, e)
            rows.append(Check(label, status, _line(e), fix))
        else:
            metrics[name] = m
            rows.append(Check(label, READY, f"{type(m).__name__}: {', '.join(m.output_keys)}{_activation_note(m)}"))
        mft = mcfg.get("mask_from_text")
        if mft:
            rows.append(check_segmenter(name, OmegaConf.to_container(mft, resolve=True), device, scan))
    return rows, metrics


def check_segmenter(metric: str, mask_from_text: dict, device, scan: DatasetScan) -> Check:
    """CLIPSeg is needed only for samples without a mask of their own."""
    from eval.masks import TextMasker

    label = f"CLIPSeg segmenter ({metric})"
    if scan.n and scan.without_mask == 0:
        return Check(label, READY, f"not needed: every checked sample ({scan.n}) carries its own mask")
    try:
        TextMasker(**{**mask_from_text, "device": device}).load()
    except Exception as e:  # noqa: BLE001
        return Check(label, MISSING, f"needed for {scan.without_mask} samples without a mask: {_line(e)}",
                     f"metrics.{metric}.mask_from_text.model=/path/to/clipseg-rd64-refined")
    return Check(label, READY,
                 f"{mask_from_text.get('model')}: loaded, used for {scan.without_mask} samples without a mask")


def score_edit(metrics: dict, res, sample) -> list[Check]:
    """Run every loaded metric on one edit, as the runner does."""
    from eval.base import MetricInput
    from oig.image import resize_mask

    rows = []
    target = sample.target_image.resize(res.image.size) if sample.target_image is not None else None
    mi = MetricInput(source=res.source, edit=res.image, source_prompt=sample.source_prompt,
                     target_prompt=sample.target_prompt, mask=resize_mask(sample.mask, res.image.size),
                     target_image=target, task=sample.task, meta=sample.meta)
    for name, m in metrics.items():
        try:
            vals = m([mi])[0]
        except Exception as e:  # noqa: BLE001
            rows.append(Check(f"metric {name} on an edit", WRONG, _line(e), ""))
            continue
        shown = ", ".join(f"{k}={v:.4g}" for k, v in vals.items() if isinstance(v, float) and not math.isnan(v))
        rows.append(Check(f"metric {name} on an edit", READY, shown or "every value NaN (not defined for this sample)"))
    return rows


# ---------------------------------------------------------------------------------- the whole check
def _methods(cfg: DictConfig, requested: Sequence[str] | None) -> list[str | None]:
    if requested:
        return list(requested)
    try:
        swept = cfg.hydra.sweeper.params.get("method")
    except Exception:  # noqa: BLE001 - no hydra node (a resolved config.yaml)
        swept = None
    return [m.strip() for m in str(swept).split(",")] if swept else [None]


def preflight(cfgs: Sequence[tuple[str, DictConfig]], samples: int | None = None, steps: int = 3) -> list[Check]:
    """Check each ``(label, config)`` (one per editor; see the module docstring) and return the rows: the
    model's, the dataset's, one or two per editor (in the given order), then the metrics'."""
    from oig.models import clear_loaded

    model_rows = [check_sd_folder(str(cfgs[0][1].model.pretrained))]
    steps_by_model: dict[tuple, list[int]] = {}
    groups: dict[tuple, list[int]] = {}
    for i, (_, cfg) in enumerate(cfgs):
        steps_by_model.setdefault((str(cfg.model.pretrained), cfg.model.get("steps_offset")), []).append(
            int(cfg.method.get("steps") or 50))
        groups.setdefault(_model_key(cfg), []).append(i)
    for (pretrained, offset), counts in steps_by_model.items():
        model_rows.append(check_scheduler(pretrained, offset, counts))
    data_rows, editor_rows, metric_rows = [], {}, []
    scans: dict[str, DatasetScan] = {}
    metrics, metric_keys, scored = {}, set(), False
    for n_group, (key, members) in enumerate(groups.items()):
        if n_group:  # one Stable Diffusion in memory at a time
            clear_loaded()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        cfg0 = cfgs[members[0]][1]
        suffix = f" ({', '.join(cfgs[i][0] for i in members)})" if len(groups) > 1 else ""
        rows = [check_dtype(str(cfg0.device), str(cfg0.dtype))]
        load_row, models = check_load(cfg0)
        rows.append(load_row)
        if models is not None:
            rows.append(check_tokenizer(models))
        for r in rows:
            r.name += suffix
        model_rows.extend(rows)
        device = models.device if models is not None else torch.device("cpu")
        for i in members:
            label, cfg = cfgs[i]
            ds_key = str(OmegaConf.to_container(cfg.dataset, resolve=True))
            if ds_key not in scans:
                scans[ds_key] = scan_dataset(cfg, models.tokenizer if models is not None else None, samples)
                data_rows.append(scans[ds_key].check)
            scan = scans[ds_key]
            here = []
            clip_row = check_guidance_clip(cfg, label, device, models.dtype if models is not None else torch.float32)
            if clip_row is not None:
                here.append(clip_row)
            if clip_row is not None and not clip_row.ok:
                editor_row, res = Check(f"editor {label}", MISSING, "needs its guidance CLIP (see that row)"), None
            else:
                editor_row, res = check_editor(cfg, label, models, scan.first, steps)
            here.append(editor_row)
            editor_rows[i] = here
            m_key = str(OmegaConf.to_container(cfg.metrics, resolve=True)) if cfg.get("metrics") else "{}"
            if m_key not in metric_keys:
                metric_keys.add(m_key)
                rows, loaded = check_metrics(cfg, device, scan)
                metric_rows.extend(rows)
                metrics.update(loaded)
            if res is not None and not scored and metrics:
                metric_rows.extend(score_edit(metrics, res, scan.first))
                scored = True
        del models
    metrics.clear()
    return _dedupe(model_rows + data_rows + [r for i in sorted(editor_rows) for r in editor_rows[i]] + metric_rows)


def _dedupe(rows: list[Check]) -> list[Check]:
    out, seen = [], set()
    for r in rows:
        k = (r.name, r.status, r.detail, r.fix)
        if k not in seen:
            seen.add(k)
            out.append(r)
    return out


def format_table(rows: Sequence[Check]) -> str:
    """The rows as a Markdown table, then one line: ready or how many rows need a fix."""
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| check | status | detail | fix |", "|---|---|---|---|"]
    lines += [f"| {esc(r.name)} | {r.status} | {esc(r.detail)} | {esc(r.fix)} |" for r in rows]
    bad = [r for r in rows if not r.ok]
    lines.append("\nall ready" if not bad else f"\n{len(bad)} of {len(rows)} checks need a fix: "
                 + ", ".join(r.name for r in bad))
    return "\n".join(lines)


def compose(overrides: Sequence[str] = (), config: str | Path | None = None) -> list[tuple[str, DictConfig]]:
    """The configurations to check: ``config`` (a resolved ``config.yaml``) with ``overrides`` as dotlist, or
    the Hydra composition of ``overrides``; one per method of ``method=a,b`` or of the experiment's sweep."""
    overrides = list(overrides)
    if config is not None:
        cfg = OmegaConf.merge(OmegaConf.load(config), OmegaConf.from_dotlist([o for o in overrides if "=" in o]))
        return [(str(cfg.method.get("_target_", "method")).rsplit(".", 1)[-1], cfg)]
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from oig.run import CONF_DIR

    requested = None
    for o in list(overrides):
        if o.startswith("method=") and "," in o:
            requested = [m.strip() for m in o.split("=", 1)[1].split(",") if m.strip()]
            overrides.remove(o)
    out = []
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        base = hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)
        for m in _methods(base, requested):
            cfg = base if m is None else hydra_compose(config_name="config", overrides=[*overrides, f"method={m}"],
                                                       return_hydra_config=True)
            label = m or str(cfg.hydra.runtime.choices.get("method") or "method")
            with_hydra = OmegaConf.to_container(cfg, resolve=False)
            with_hydra.pop("hydra", None)
            out.append((label, OmegaConf.create(with_hydra)))
    GlobalHydra.instance().clear()
    return out


def check_and_print(cfg: DictConfig, samples: int | None = None, steps: int = 3) -> int:
    """``oig-run ... preflight=true``: check the run's own configuration, print the table, return the exit status."""
    try:  # inside the Hydra app: the method's config name
        from hydra.core.hydra_config import HydraConfig

        label = str(HydraConfig.get().runtime.choices.method)
    except Exception:  # noqa: BLE001 - outside it: the editor's class
        label = str(cfg.method.get("_target_", "method")).rsplit(".", 1)[-1]
    rows = preflight([(label, cfg)], samples, steps)
    sys.stdout.write(format_table(rows) + "\n")  # the CLI's result table
    return 0 if all(r.ok for r in rows) else 1


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="oig-check", description="Check that a configuration is ready to run: models, scheduler, dtype, "
        "tokenizer, guidance CLIP, dataset, one edit per editor, metrics. Prints ready / missing / wrong with the fix.")
    ap.add_argument("args", nargs="*",
                    help="[CONFIG.yaml] then Hydra overrides, as for oig-run (method=a,b checks each)")
    ap.add_argument("--samples", type=int, default=None, help="open only the first N samples (default: all)")
    ap.add_argument("--steps", type=int, default=3, help="steps of the trial edit (default 3; the configured count "
                    "when the editor refuses so few)")
    a = ap.parse_args(argv)
    args = list(a.args)
    config = None
    if args and args[0].endswith((".yaml", ".yml")) and "=" not in args[0]:
        config = args.pop(0)
        if not Path(config).is_file():
            ap.error(f"{config}: no such file")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    rows = preflight(compose(args, config), a.samples, a.steps)
    sys.stdout.write(format_table(rows) + "\n")  # the CLI's result table
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
