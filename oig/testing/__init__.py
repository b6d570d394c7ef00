"""Random-weight models for tests, saved with ``save_pretrained`` and loaded back through the
same code paths as real weights (:func:`oig.models.load_sd`, :func:`oig.clip.load_clip`).

Here: tiny SD-shaped models (:func:`make_tiny_sd`, :func:`make_tiny_clip`) for fast tests.
:mod:`oig.testing.twin`: the twin zoo, random weights in the *published* architectures (SD 1.x /
2.x, InstructPix2Pix, the metric models) at their true sizes (``python -m oig.testing.twin DIR``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=2,
    norm_num_groups=8,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(16, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=16,
)


def make_tiny_sd(folder: str | Path, seed: int = 0, in_channels: int = 4) -> Path:
    """Write a random tiny SD folder (16x16 images, 8x8x4 latents) and return its path."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..toy.tokenizer import save_tokenizer
    from ..toy.train import SCHEDULER_CONFIG

    folder = Path(folder)
    torch.manual_seed(seed)
    tok = save_tokenizer(folder / "tokenizer")
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    te.save_pretrained(folder / "text_encoder")
    AutoencoderKL(**TINY_VAE).save_pretrained(folder / "vae")
    UNet2DConditionModel(**{**TINY_UNET, "in_channels": in_channels}).save_pretrained(folder / "unet")
    DDIMScheduler(**SCHEDULER_CONFIG).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None], "safety_checker": [None, None], "image_encoder": [None, None],
        "requires_safety_checker": False, "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}, indent=2))
    return folder


def make_tiny_clip(folder: str | Path, seed: int = 0) -> str:
    """Write a random tiny open_clip ``local-dir`` folder in the toy CLIP's format; returns ``local-dir:<folder>``."""
    import copy

    import open_clip
    from safetensors.torch import save_file

    from ..toy.tokenizer import save_tokenizer
    from ..toy.train import CLIP_MEAN, CLIP_STD, CLIP_MODEL_CFG

    folder = Path(folder)
    tok = save_tokenizer(folder, model_max_length=32)
    cfg = copy.deepcopy(CLIP_MODEL_CFG)
    cfg["text_cfg"]["vocab_size"] = len(tok)
    cfg["vision_cfg"].update(layers=1, width=64, head_width=32)
    cfg["text_cfg"].update(layers=1, width=32, heads=2)
    cfg["embed_dim"] = 32
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": cfg, "preprocess_cfg": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)}}))
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{folder}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return f"local-dir:{folder}"
