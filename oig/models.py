"""Loading Stable-Diffusion-shaped models: one code path for the toy model, a local
``save_pretrained`` folder and a hub id.

``load_sd("toy")`` resolves to the folder shipped inside the package; any other string
is either a local folder (used as is) or a hub id (``CompVis/stable-diffusion-v1-4``),
loaded by diffusers/transformers ``from_pretrained`` exactly as the toy folder is.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

TOY_DIR = Path(__file__).parent / "toy" / "models"
ALIASES = {
    "toy": str(TOY_DIR / "sd"),
    "toy_ip2p": str(TOY_DIR / "ip2p"),
    "sd14": "CompVis/stable-diffusion-v1-4",
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd21": "stabilityai/stable-diffusion-2-1-base",
    "ip2p": "timbrooks/instruct-pix2pix",
}


class WeightsNotFoundError(RuntimeError):
    pass


def resolve_device(device: str = "auto") -> torch.device:
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is fp16 on CUDA/MPS and fp32 on CPU; ``fp32``/``fp16``/``bf16`` force one."""
    table = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, fp32, fp16 or bf16")
    if device.type == "cpu" and table[dtype] == torch.float16:
        raise ValueError("fp16 is not supported on the CPU; use fp32 or bf16")
    return table[dtype]


def resolve_path(pretrained: str) -> str:
    return ALIASES.get(pretrained, pretrained)


def _missing(pretrained: str, err: Exception) -> WeightsNotFoundError:
    return WeightsNotFoundError(
        f"could not load model weights {pretrained!r}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}\n"
        f"If this machine is offline, download the model elsewhere (e.g. `huggingface-cli download {pretrained} "
        f"--local-dir DIR`) and pass the folder: model.pretrained=DIR (a save_pretrained folder with "
        f"model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)."
    )


@dataclass
class SDModels:
    """The components of an SD-shaped model, on one device and dtype, frozen."""

    vae: torch.nn.Module
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    device: torch.device
    dtype: torch.dtype
    model_id: str
    revision: str | None = None
    #: what the checkpoint's scheduler config declares; a ``v_prediction`` U-Net carries the ε
    #: conversion of :func:`oig.diffusion.install_epsilon_output` and ``scheduler`` says ``epsilon``
    prediction_type: str = "epsilon"

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_multiple(self) -> int:
        """Latent sides must be divisible by this so every U-Net down/up sample lines up."""
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def pixel_multiple(self) -> int:
        return self.vae_scale_factor * self.latent_multiple

    @property
    def resolution(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    def fingerprint(self) -> str:
        """Identifies the weights and the timestep grid for cache keys: id, revision, the scheduler's
        ``steps_offset`` and, for local folders, file mtimes."""
        grid = f"|offset={self.scheduler.config.get('steps_offset', 0)}"
        if self.prediction_type != "epsilon":
            grid += f"|pred={self.prediction_type}"
        p = Path(self.model_id)
        if p.is_dir():
            stamp = ",".join(
                f"{f.relative_to(p)}:{f.stat().st_size}:{int(f.stat().st_mtime)}"
                for f in sorted(p.rglob("*.safetensors"))
            )
            return f"{p.resolve()}|{stamp}{grid}"
        return f"{self.model_id}@{self.revision or 'main'}{grid}"


#: DDIM settings every Stable Diffusion checkpoint ships and every reference code uses; diffusers'
#: class defaults are the opposite (True), so a folder whose scheduler config lacks them would
#: silently clip x0 and end on abar = 1.
SD_SCHEDULER_SETTINGS = {"clip_sample": False, "set_alpha_to_one": False}


def sd_scheduler(scheduler, where: str = "the model"):
    """``scheduler`` with :data:`SD_SCHEDULER_SETTINGS` (rebuilt, with a warning, when its config differs)."""
    wrong = {k: scheduler.config.get(k) for k, v in SD_SCHEDULER_SETTINGS.items() if scheduler.config.get(k) != v}
    if not wrong:
        return scheduler
    log.warning("%s: scheduler config has %s; using %s as Stable Diffusion and the reference codes do", where,
                ", ".join(f"{k}={v}" for k, v in wrong.items()),
                ", ".join(f"{k}={v}" for k, v in SD_SCHEDULER_SETTINGS.items()))
    return type(scheduler).from_config({**_explicit(scheduler.config), **SD_SCHEDULER_SETTINGS})


def _explicit(config) -> dict:
    """A scheduler config without diffusers' ``_use_default_values`` list, which would make
    ``from_config`` drop the keys it names even when they are set explicitly."""
    return {k: v for k, v in config.items() if k != "_use_default_values"}


def epsilon_unet(unet, prediction_type: str, alphas_cumprod, where: str = "the model") -> None:
    """Refuse a prediction type the editors cannot use; give a ``v_prediction`` U-Net the ε conversion
    (:func:`oig.diffusion.install_epsilon_output`). ``epsilon`` needs nothing."""
    from .diffusion import PREDICTION_TYPES, install_epsilon_output

    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"{where}: scheduler/scheduler_config.json declares prediction_type={prediction_type!r}; every editor "
            f"here works on noise predictions and supports {' and '.join(PREDICTION_TYPES)} (v_prediction is "
            f"converted to ε at load). Use a checkpoint trained for one of them (model.pretrained=...)")
    if prediction_type == "v_prediction":
        install_epsilon_output(unet, alphas_cumprod)
        log.info("%s: v_prediction model; its U-Net output is converted to ε (eps = sqrt(abar) v + "
                 "sqrt(1 - abar) x_t)", where)


def epsilon_scheduler(scheduler, unet, where: str = "the model"):
    """Make ``unet`` and ``scheduler`` speak ε: :func:`epsilon_unet` for the prediction type the
    scheduler declares, and for ``v_prediction`` the scheduler rebuilt with ``prediction_type: epsilon``
    (so diffusers pipelines built from it read the converted output right). Returns
    ``(scheduler, declared prediction type)``."""
    pred = scheduler.config.get("prediction_type", "epsilon")
    epsilon_unet(unet, pred, scheduler.alphas_cumprod, where)
    if pred != "epsilon":
        scheduler = type(scheduler).from_config({**_explicit(scheduler.config), "prediction_type": "epsilon"})
    return scheduler, pred


_CACHE: dict[tuple, SDModels] = {}


def clear_loaded() -> None:
    """Forget the memoised models (:func:`load_sd` loads them again), so that their memory can be freed
    once nothing else holds them."""
    _CACHE.clear()


def _declared_prediction_type(path: str, default: str) -> str:
    """The prediction type a replacement U-Net's own folder/repo declares in ``scheduler/``, else ``default``
    (the base model's): a U-Net shares the base's scheduler but may have been trained otherwise."""
    from diffusers import DDIMScheduler

    try:
        cfg = DDIMScheduler.load_config(path, subfolder="scheduler", local_files_only=True)
    except (OSError, ValueError, EnvironmentError):
        return default
    return cfg.get("prediction_type", "epsilon")


def load_sd(
    pretrained: str = "toy",
    device: str = "auto",
    dtype: str = "auto",
    revision: str | None = None,
    unet: str | None = None,
    local_files_only: bool | None = None,
    steps_offset: int | None = None,
) -> SDModels:
    """Load VAE, U-Net, tokenizer + text encoder and DDIM scheduler.

    ``steps_offset`` overrides the scheduler's timestep offset: the checkpoints ship 1 (50 steps:
    981, 961, ..., 1); the Prompt-to-Prompt, null-text and MasaCtrl reference codes build their
    DDIM scheduler without it, i.e. 0 (980, ..., 0). ``None`` keeps the checkpoint's.

    ``unet`` optionally names another folder/id whose ``unet`` replaces the base one (the
    toy InstructPix2Pix U-Net). Loaded models are memoised per process, so a sweep loads
    each model once.

    Prediction type: ``epsilon`` and ``v_prediction`` (SD 2.x at 768) checkpoints load; a
    ``v_prediction`` U-Net's output is converted to ε in one place (:func:`epsilon_scheduler`),
    so every editor works on either. Other types are refused here with a ValueError.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    path = resolve_path(pretrained)
    key = (path, str(dev), str(dt), revision, unet, steps_offset)
    if key in _CACHE:
        return _CACHE[key]
    if local_files_only is None:
        local_files_only = Path(path).is_dir() or os.environ.get("HF_HUB_OFFLINE") == "1"
    kw = dict(revision=revision, local_files_only=local_files_only)
    if unet is not None and resolve_path(unet) != path:
        # another U-Net on the same VAE / text encoder: share the (memoised) base components
        base = load_sd(pretrained, device, dtype, revision, None, local_files_only, steps_offset)
        try:
            unet_m = UNet2DConditionModel.from_pretrained(resolve_path(unet), subfolder="unet", torch_dtype=dt,
                                                          local_files_only=Path(resolve_path(unet)).is_dir() or local_files_only)
        except (OSError, ValueError, EnvironmentError) as e:
            raise _missing(unet, e) from e
        unet_m.to(dev).eval().requires_grad_(False)
        pred = _declared_prediction_type(resolve_path(unet), base.prediction_type)
        epsilon_unet(unet_m, pred, base.scheduler.alphas_cumprod, unet)
        models = dataclasses.replace(base, unet=unet_m, model_id=f"{path}+{unet}", prediction_type=pred)
        _CACHE[key] = models
        return models
    try:
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=dt, **kw)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dt, **kw)
        unet_m = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dt, **kw)
        scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
    except (OSError, ValueError, EnvironmentError) as e:
        raise _missing(pretrained if pretrained == path else f"{pretrained} ({path})", e) from e
    scheduler = sd_scheduler(scheduler, path)
    if steps_offset is not None and scheduler.config.get("steps_offset") != int(steps_offset):
        scheduler = type(scheduler).from_config({**_explicit(scheduler.config), "steps_offset": int(steps_offset)})
    scheduler, pred = epsilon_scheduler(scheduler, unet_m, path)
    for m in (text_encoder, vae, unet_m):
        m.to(dev).eval().requires_grad_(False)
    models = SDModels(vae, unet_m, text_encoder, tokenizer, scheduler, dev, dt, path, revision, pred)
    log.info("loaded %s on %s (%s), resolution %d", models.model_id, dev, dt, models.resolution)
    _CACHE[key] = models
    return models
