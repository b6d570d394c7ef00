"""Twin zoo: random weights in the published architectures, written in the hubs' folder layouts.

``python -m oig.testing.twin DIR`` writes (about 10 GB, two to three minutes on a CPU) a model of
every architecture a real run of this project loads, with random weights, so that every shape,
module name, token length and byte of memory of the real models can be exercised without
the weights (which cannot be downloaded here). The folders are read by the same loaders and
code paths as the real downloads (``oig.models.load_sd``, ``oig.clip.load_clip``,
``eval.clip``, ``eval.structure``, ``eval.masks``, ``eval.background``, ``oig.data.prompts``).

==================  =======================================================================
folder              architecture (hub repository whose configuration it copies)
==================  =======================================================================
``sd14/``           ``CompVis/stable-diffusion-v1-4``: U-Net 320/640/1280/1280, 2 ResNets per
                    block, cross-attention 768, 8 heads; VAE 128/256/512/512; CLIP ViT-L/14 text
                    tower (12 layers, 768, QuickGELU, 77 tokens); CLIP BPE tokenizer; PNDM
                    scheduler config (``steps_offset`` 1, ``clip_sample``/``set_alpha_to_one``
                    false). No safety checker (nothing here loads it).
``sd21base/``       ``stabilityai/stable-diffusion-2-1-base``: U-Net with ``attention_head_dim``
                    [5, 10, 20, 20], linear projections, cross-attention 1024; OpenCLIP ViT-H/14
                    text tower (23 layers, 1024, GELU); tokenizer padding with ``!``.
``sd21/``           ``stabilityai/stable-diffusion-2-1`` (``prediction_type: v_prediction``,
                    ``upcast_attention``, DDIM config; 1.5 x ``--resolution``: 768 px by
                    default): sd21base's weights (links), its own configs.
``ip2p/``           ``timbrooks/instruct-pix2pix``: the SD-1.x U-Net with 8 input channels, Euler
                    ancestral scheduler config; VAE / text encoder / tokenizer link to sd14's.
``vit_base_patch32_clip_224.openai/``
                    OpenAI CLIP ViT-B/32 for open_clip (``ViT-B-32-quickgelu``; QuickGELU has
                    no weights, so the file is also a ``ViT-B-32`` state dict):
                    ``open_clip_model.safetensors`` + ``open_clip_config.json``.
``clip-vit-large-patch14/``
                    ``openai/clip-vit-large-patch14`` as transformers' ``CLIPModel`` +
                    ``CLIPProcessor`` (what torchmetrics' CLIPScore and PIE-Bench load).
``vit_base_patch8_224.dino/``
                    DINO ViT-B/8, timm's ``vit_base_patch8_224.dino`` state dict
                    (``model.safetensors``, for ``structure.weights=...``).
``blip-image-captioning-base/``
                    ``Salesforce/blip-image-captioning-base`` (``BlipForConditionalGeneration``
                    + ``BlipProcessor``, 384 px). Its BERT WordPiece vocabulary is a stand-in
                    with bert-base-uncased's size and special-token ids (the words come from
                    CLIP's BPE vocabulary; bert's own file is not on this machine).
``clipseg-rd64-refined/``
                    ``CIDAS/clipseg-rd64-refined`` (ViT-B/16 CLIP, reduce_dim 64, complex
                    transposed convolution) + ``CLIPSegProcessor`` (352 px).
``torch_home/``     ``hub/checkpoints/alexnet-owt-7be5be79.pth`` and
                    ``squeezenet1_1-b8a52dc0.pth``: torchvision's LPIPS backbones; point
                    ``TORCH_HOME`` here (the ``lpips`` package ships its linear layers).
==================  =======================================================================

Random weights: every parameter at PyTorch's default scale (:func:`fill_random_`: weight
matrices uniform in ±1/sqrt(fan_in), norms 1, biases 0), its values windows of one seeded random
block, which fills the zoo's ~2.5e9 parameters in seconds. Outputs are finite but meaningless.

The CLIP BPE tokenizer files (``vocab.json``, ``merges.txt``) are rebuilt from the BPE
vocabulary open_clip ships (``bpe_simple_vocab_16e6.txt.gz``): 256 byte symbols, the same
with ``</w>``, one symbol per merge (48,894), then the two special tokens: 49,408 ids, as
OpenAI's tokenizer.

Options: ``--resolution`` sets the image size the SD models declare (``sample_size`` of the
U-Net = resolution / 8 and of the VAE; it changes no weight shape); ``--dtype`` the storage
dtype of the weights whose loaders cast them on load (SD components, open_clip, timm,
torchvision: fp16 by default, as the hubs' fp16 variants, to keep the folder small). The
transformers models (CLIP ViT-L/14, BLIP, CLIPSeg) are stored in fp32, as their hub files:
transformers >= 5 loads a file in its own dtype, so an fp16 file would change what the
metrics compute in. ``--models`` picks a subset. ``twin.json`` records what was written and
the Hydra overrides / environment that point a run at the folder (:func:`overrides`).

Never commit a twin: it is a few GB and generated on demand.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- published configurations
SCHEDULER_SD = {  # scheduler/scheduler_config.json of SD 1.x / 2.x (PNDM, as the hub ships it)
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None, "clip_sample": False,
}
SCHEDULER_IP2P = {  # timbrooks/instruct-pix2pix scheduler/scheduler_config.json
    "_class_name": "EulerAncestralDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "steps_offset": 1, "trained_betas": None,
}
UNET_SD1 = dict(
    in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
UNET_SD2 = dict(UNET_SD1, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
                upcast_attention=False)
VAE_SD = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    act_fn="silu", latent_channels=4, norm_num_groups=32,
)
TEXT_CLIP_L = dict(  # CLIP ViT-L/14 text tower (SD 1.x text_encoder/config.json)
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
TEXT_OPENCLIP_H = dict(  # OpenCLIP ViT-H/14 text tower without its last layer (SD 2.x text_encoder/config.json)
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
    max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=512,
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
VISION_CLIP_L = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     image_size=224, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LPIPS_FILES = {"alex": ("alexnet", "alexnet-owt-7be5be79.pth"),
               "squeeze": ("squeezenet1_1", "squeezenet1_1-b8a52dc0.pth")}

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
N_MERGES = 49152 - 256 - 2  # OpenAI's tokenizer uses the first 48,894 merges of the file


# ----------------------------------------------------------------------------- helpers
def _dtype(name: str) -> torch.dtype:
    table = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}
    if name not in table:
        raise ValueError(f"twin: --dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _link(src: Path, dst: Path) -> None:
    """``dst`` -> ``src`` as a relative symlink (copies when the filesystem has no symlinks)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        else:
            dst.unlink()
    try:
        dst.symlink_to(os.path.relpath(src, dst.parent), target_is_directory=src.is_dir())
    except OSError:
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)


def byte_symbols() -> list[str]:
    """The 256 symbols byte-level BPE uses for the bytes 0..255, in byte order: bytes that are
    printable Latin-1 characters ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves, every other
    byte b gets chr(256 + n), n counting those bytes in increasing order."""
    printable = {b for lo, hi in (("!", "~"), ("¡", "¬"), ("®", "ÿ")) for b in range(ord(lo), ord(hi) + 1)}
    out, n = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + n))
            n += 1
    return out


def _bpe_file() -> Path:
    """open_clip's ``bpe_simple_vocab_16e6.txt.gz`` (found without importing open_clip, which is slow)."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("twin: the CLIP tokenizer is rebuilt from open_clip's BPE file; "
                                  "install open_clip_torch")
    return Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"


@functools.lru_cache(maxsize=1)
def clip_bpe() -> tuple[dict[str, int], list[str]]:
    """CLIP's BPE vocabulary (token -> id, 49,408 entries) and merges, from the file open_clip ships:
    the byte symbols in the order OpenAI's tokenizer lists them (printable ones first), the same
    with ``</w>``, one token per merge, then the two special tokens."""
    lines = gzip.open(_bpe_file()).read().decode("utf-8").split("\n")
    merges = lines[1 : N_MERGES + 1]  # line 0 is the file's version header
    sym = byte_symbols()
    printable_first = [s for s in sym if ord(s) < 256] + [s for s in sym if ord(s) >= 256]
    tokens = printable_first + [s + "</w>" for s in printable_first] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != 49408:
        raise RuntimeError(f"rebuilt CLIP BPE vocabulary has {len(vocab)} distinct tokens, expected 49408")
    return vocab, merges


def save_clip_tokenizer(folder: Path, pad_token: str = EOS, model_max_length: int = 77):
    """A ``CLIPTokenizer`` folder (``vocab.json``, ``merges.txt`` + transformers' files) as the hubs ship it."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_bpe()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), bos_token=BOS, eos_token=EOS,
                        unk_token=EOS, pad_token=pad_token, model_max_length=model_max_length)
    tok.save_pretrained(folder)
    return tok


def _bert_vocab() -> list[str]:
    """A WordPiece vocabulary with bert-base-uncased's size (30,522) and special-token ids
    ([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103); the words are CLIP BPE whole words."""
    import string

    specials = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    specials += [f"[unused{i}]" for i in range(99, 994)]
    chars = list(string.digits + string.ascii_lowercase + string.punctuation)
    out = specials + chars + ["##" + c for c in string.ascii_lowercase + string.digits]
    seen = set(out)
    vocab, _ = clip_bpe()
    for tok in vocab:
        if len(out) >= 30522:
            break
        if tok.endswith("</w>"):
            w = tok[:-4]
            if len(w) > 1 and w.isascii() and w.isalpha() and w not in seen:
                seen.add(w)
                out.append(w)
    if len(out) != 30522:
        raise RuntimeError(f"stand-in BERT vocabulary has {len(out)} tokens, expected 30522")
    return out


#: random weights are windows of one seeded block of this (prime) length: fast (no per-element RNG
#: for the ~1e9 parameters of a zoo), and no two rows of a weight matrix are the same window
_BLOCK = 1_048_583


def fill_random_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every parameter random values in place, at PyTorch's default scale: weights with >= 2
    dims uniform in ±1/sqrt(fan_in) (the default ``Linear``/``Conv`` bound), 1-D weights (norms) 1,
    biases 0, other vectors (class / position embeddings) ±0.02, ``logit_scale`` log(1/0.07)."""
    import math

    g = torch.Generator().manual_seed(seed)
    base = torch.rand(_BLOCK, generator=g) * 2 - 1
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if p.ndim >= 2 or (p.ndim == 1 and leaf not in ("weight", "bias")):
                off = int(torch.randint(_BLOCK, (1,), generator=g))
                bound = 1 / math.sqrt(p[0].numel()) if p.ndim >= 2 else 0.02
                src = (torch.roll(base, -off) * bound).to(p.dtype)
                flat = p.view(-1)
                for s in range(0, flat.numel(), _BLOCK):  # one write of the parameter, no large temporaries
                    m = min(_BLOCK, flat.numel() - s)
                    flat[s : s + m].copy_(src[:m])
            elif leaf == "logit_scale":
                p.fill_(math.log(1 / 0.07))
            elif leaf == "weight":
                p.fill_(1.0)
            else:
                p.zero_()
    return model


def new_diffusers(cls, config: dict, dtype: torch.dtype, seed: int):
    """A diffusers model built on the meta device, materialised in ``dtype`` and filled by :func:`fill_random_`."""
    with torch.device("meta"):
        model = cls(**config)
    if any(True for _ in model.buffers()):  # buffers would be left uninitialised: build for real
        torch.manual_seed(seed)
        return fill_random_(cls(**config).to(dtype), seed)
    return fill_random_(model.to(dtype).to_empty(device="cpu"), seed)


def new_transformers(cls, config, seed: int):
    """A transformers model built without its (slow) weight initialisation, filled by :func:`fill_random_`."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        model = cls(config)
    if hasattr(model, "tie_weights"):  # the initialisation skipped above also ties shared weights
        model.tie_weights()
    return fill_random_(model, seed)


# ----------------------------------------------------------------------------- builders
def _sd_model_index(cls: str, scheduler: str) -> dict:
    import diffusers

    return {"_class_name": cls, "_diffusers_version": diffusers.__version__,
            "feature_extractor": ["transformers", "CLIPImageProcessor"], "image_encoder": [None, None],
            "requires_safety_checker": False, "safety_checker": [None, None],
            "scheduler": ["diffusers", scheduler], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]}


def _save_feature_extractor(folder: Path):
    from transformers import CLIPImageProcessor

    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                       image_mean=list(OPENAI_MEAN), image_std=list(OPENAI_STD), resample=3).save_pretrained(folder)


def build_unet(folder: Path, config: dict, resolution: int, dtype: torch.dtype, seed: int):
    from diffusers import UNet2DConditionModel

    new_diffusers(UNet2DConditionModel, {**config, "sample_size": resolution // 8}, dtype, seed).save_pretrained(folder)


def build_vae(folder: Path, resolution: int, dtype: torch.dtype, seed: int):
    from diffusers import AutoencoderKL

    new_diffusers(AutoencoderKL, {**VAE_SD, "sample_size": resolution}, dtype, seed).save_pretrained(folder)


def build_text_encoder(folder: Path, config: dict, dtype: torch.dtype, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    new_transformers(CLIPTextModel, CLIPTextConfig(**config), seed).to(dtype).save_pretrained(folder)


def build_sd(folder: Path, version: int, resolution: int, dtype: torch.dtype, seed: int) -> None:
    """SD 1.x (``version=1``) or SD 2.x-base (``version=2``) pipeline folder."""
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "model_index.json", _sd_model_index("StableDiffusionPipeline", "PNDMScheduler"))
    _write_json(folder / "scheduler" / "scheduler_config.json",
                {**SCHEDULER_SD, **({"prediction_type": "epsilon"} if version == 2 else {})})
    _save_feature_extractor(folder / "feature_extractor")
    save_clip_tokenizer(folder / "tokenizer", pad_token="!" if version == 2 else EOS)
    build_text_encoder(folder / "text_encoder", TEXT_OPENCLIP_H if version == 2 else TEXT_CLIP_L, dtype, seed + 1)
    build_vae(folder / "vae", resolution, dtype, seed + 2)
    build_unet(folder / "unet", UNET_SD2 if version == 2 else UNET_SD1, resolution, dtype, seed + 3)


def build_sd21_v(folder: Path, base: Path, resolution: int) -> None:
    """SD 2.1 (768, v-prediction): sd21base's weights (linked) with SD 2.1's configs."""
    if not (base / "unet").is_dir():
        raise FileNotFoundError(f"twin: sd21 reuses sd21base's weights; build sd21base first ({base} is missing)")
    folder.mkdir(parents=True, exist_ok=True)
    for sub in ("text_encoder", "tokenizer", "feature_extractor"):
        _link(base / sub, folder / sub)
    for sub, extra in (("unet", {"sample_size": resolution // 8, "upcast_attention": True}),
                       ("vae", {"sample_size": resolution})):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        for f in (base / sub).iterdir():
            if f.suffix == ".safetensors":
                _link(f, folder / sub / f.name)
        cfg = json.loads((base / sub / "config.json").read_text())
        _write_json(folder / sub / "config.json", {**cfg, **extra})
    _write_json(folder / "model_index.json", _sd_model_index("StableDiffusionPipeline", "DDIMScheduler"))
    _write_json(folder / "scheduler" / "scheduler_config.json", {
        "_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None})


def build_ip2p(folder: Path, sd14: Path | None, resolution: int, dtype: torch.dtype, seed: int) -> None:
    """InstructPix2Pix: the 8-channel U-Net; VAE / text encoder / tokenizer linked to sd14's when present."""
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "model_index.json",
                _sd_model_index("StableDiffusionInstructPix2PixPipeline", "EulerAncestralDiscreteScheduler"))
    _write_json(folder / "scheduler" / "scheduler_config.json", SCHEDULER_IP2P)
    if sd14 is not None and (sd14 / "vae").is_dir():
        for sub in ("vae", "text_encoder", "tokenizer", "feature_extractor"):
            _link(sd14 / sub, folder / sub)
    else:
        _save_feature_extractor(folder / "feature_extractor")
        save_clip_tokenizer(folder / "tokenizer")
        build_text_encoder(folder / "text_encoder", TEXT_CLIP_L, dtype, seed + 1)
        build_vae(folder / "vae", resolution, dtype, seed + 2)
    build_unet(folder / "unet", {**UNET_SD1, "in_channels": 8}, resolution, dtype, seed + 4)


def build_open_clip_b32(folder: Path, dtype: torch.dtype, seed: int) -> None:
    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model = fill_random_(open_clip.create_model("ViT-B-32-quickgelu"), seed)
    sd = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(folder / "open_clip_model.safetensors"))
    _write_json(folder / "open_clip_config.json", {
        "model_cfg": open_clip.get_model_config("ViT-B-32-quickgelu"),
        "preprocess_cfg": {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)}})


def build_clip_l14(folder: Path, seed: int) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = save_clip_tokenizer(folder / ".tokenizer")
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, image_mean=list(OPENAI_MEAN),
        image_std=list(OPENAI_STD), resample=3), tokenizer=tok)
    proc.save_pretrained(folder)
    shutil.rmtree(folder / ".tokenizer")
    cfg = CLIPConfig(text_config=TEXT_CLIP_L, vision_config=VISION_CLIP_L, projection_dim=768)
    new_transformers(CLIPModel, cfg, seed).save_pretrained(folder)


def build_dino(folder: Path, dtype: torch.dtype, seed: int) -> None:
    import timm
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model = fill_random_(timm.create_model("vit_base_patch8_224.dino", pretrained=False), seed)
    save_file({k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    _write_json(folder / "config.json", {"architecture": "vit_base_patch8_224", "num_classes": 0,
                                         "pretrained_cfg": {"tag": "dino", "mean": list(IMAGENET_MEAN),
                                                            "std": list(IMAGENET_STD)}})


def build_blip(folder: Path, seed: int) -> None:
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".vocab.txt"
    tmp.write_text("\n".join(_bert_vocab()) + "\n")
    tok = BertTokenizer(str(tmp), do_lower_case=True, model_max_length=512)
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    proc = BlipProcessor(image_processor=BlipImageProcessor(
        size={"height": 384, "width": 384}, image_mean=list(OPENAI_MEAN), image_std=list(OPENAI_STD), resample=3),
        tokenizer=tok)
    proc.save_pretrained(folder)
    tmp.unlink()
    cfg = BlipConfig(
        text_config=dict(vocab_size=30524, hidden_size=768, encoder_hidden_size=768, intermediate_size=3072,
                         num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=512,
                         bos_token_id=30522, sep_token_id=102, pad_token_id=0, eos_token_id=102),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=384, patch_size=16, layer_norm_eps=1e-5),
        projection_dim=512, image_text_hidden_size=256)
    if len(tok) != cfg.text_config.vocab_size:
        raise RuntimeError(f"BLIP twin: tokenizer has {len(tok)} tokens, the text model {cfg.text_config.vocab_size}")
    new_transformers(BlipForConditionalGeneration, cfg, seed).save_pretrained(folder)


def build_clipseg(folder: Path, seed: int) -> None:
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, ViTImageProcessor

    tok = save_clip_tokenizer(folder / ".tokenizer")
    proc = CLIPSegProcessor(image_processor=ViTImageProcessor(
        do_resize=True, size={"height": 352, "width": 352}, resample=2, image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD)), tokenizer=tok)
    proc.save_pretrained(folder)
    shutil.rmtree(folder / ".tokenizer")
    cfg = CLIPSegConfig(
        text_config=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77, bos_token_id=0, eos_token_id=2,
                         pad_token_id=1),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=16),
        projection_dim=512, extract_layers=[3, 6, 9], reduce_dim=64, decoder_num_attention_heads=4,
        decoder_intermediate_size=2048, conditional_layer=0, use_complex_transposed_convolution=True)
    new_transformers(CLIPSegForImageSegmentation, cfg, seed).save_pretrained(folder)


def build_lpips(folder: Path, dtype: torch.dtype, seed: int) -> None:
    """torchvision's AlexNet / SqueezeNet 1.1 under ``<folder>/hub/checkpoints`` (a ``TORCH_HOME``)."""
    import torchvision

    ck = folder / "hub" / "checkpoints"
    ck.mkdir(parents=True, exist_ok=True)
    for net, (arch, fname) in LPIPS_FILES.items():
        torch.manual_seed(seed)
        m = getattr(torchvision.models, arch)(weights=None)  # small: torchvision's own initialisation
        torch.save({k: v.to(dtype) for k, v in m.state_dict().items()}, ck / fname)


# ----------------------------------------------------------------------------- the zoo
#: model name -> folder inside the twin directory
FOLDERS = {
    "sd14": "sd14", "sd21base": "sd21base", "sd21": "sd21", "ip2p": "ip2p",
    "clip_b32": "vit_base_patch32_clip_224.openai", "clip_l14": "clip-vit-large-patch14",
    "dino": "vit_base_patch8_224.dino", "blip": "blip-image-captioning-base", "clipseg": "clipseg-rd64-refined",
    "lpips": "torch_home",
}
DEFAULT_MODELS = ("sd14", "sd21base", "sd21", "ip2p", "clip_b32", "clip_l14", "dino", "blip", "clipseg", "lpips")


def build(folder: str | Path, models=DEFAULT_MODELS, resolution: int = 512, dtype: str = "fp16", seed: int = 0,
          force: bool = False) -> Path:
    """Write the twin zoo (or the ``models`` subset) into ``folder``; returns it. Models already
    written with the same settings are kept unless ``force``."""
    folder = Path(folder).expanduser().resolve()
    models = list(dict.fromkeys(models))
    bad = [m for m in models if m not in FOLDERS]
    if bad:
        raise ValueError(f"twin: unknown models {bad}; choose from {list(FOLDERS)}")
    if resolution % 64 or resolution < 64:
        raise ValueError(f"twin: --resolution must be a positive multiple of 64 (the SD U-Net's pixel multiple), "
                         f"got {resolution}")
    dt = _dtype(dtype)
    folder.mkdir(parents=True, exist_ok=True)
    manifest_path = folder / "twin.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    built = manifest.get("models", {})
    settings = {"resolution": resolution, "dtype": dtype, "seed": seed}
    if "sd21" in models and "sd21base" not in models and built.get("sd21base") != settings:
        models.insert(models.index("sd21"), "sd21base")  # sd21 links sd21base's weights
    import diffusers

    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # "modules to keep in float32: []" on every fp16 save
    try:
        _build(folder, models, built, settings, dt, force)
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)
    _write_manifest(folder, built)
    return folder


def _build(folder: Path, models: list[str], built: dict, settings: dict, dt: torch.dtype, force: bool) -> None:
    resolution, seed = settings["resolution"], settings["seed"]
    for name in models:
        dst = folder / FOLDERS[name]
        if not force and built.get(name) == settings and dst.exists():
            log.info("twin: %s already in %s", name, dst)
            continue
        if dst.exists() and not dst.is_symlink():
            shutil.rmtree(dst)
        t0 = time.perf_counter()
        s = seed * 1000 + 10 * list(FOLDERS).index(name)  # a model's weights do not depend on the subset built
        if name == "sd14":
            build_sd(dst, 1, resolution, dt, s)
        elif name == "sd21base":
            build_sd(dst, 2, resolution, dt, s)
        elif name == "sd21":
            build_sd21_v(dst, folder / FOLDERS["sd21base"], resolution * 3 // 2)
        elif name == "ip2p":  # shares sd14's VAE / text encoder when those are in this folder at these settings
            build_ip2p(dst, folder / FOLDERS["sd14"] if built.get("sd14") == settings else None, resolution, dt, s)
        elif name == "clip_b32":
            build_open_clip_b32(dst, dt, s)
        elif name == "clip_l14":
            build_clip_l14(dst, s)
        elif name == "dino":
            build_dino(dst, dt, s)
        elif name == "blip":
            build_blip(dst, s)
        elif name == "clipseg":
            build_clipseg(dst, s)
        elif name == "lpips":
            build_lpips(dst, dt, s)
        built[name] = dict(settings)
        size = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file() and not f.is_symlink())
        log.info("twin: %s -> %s (%.0f MB, %.1f s)", name, dst, size / 2**20, time.perf_counter() - t0)
        _write_manifest(folder, built)


def _write_manifest(folder: Path, built: dict) -> None:
    import diffusers
    import transformers

    _write_json(folder / "twin.json", {
        "models": built, "folders": {k: FOLDERS[k] for k in built},
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__},
        "env": env(folder), "overrides": {k: overrides(folder, k) for k in ("sd14", "sd21base", "paper", "pie_bench",
                                                                             "captioner")},
    })


def env(folder: str | Path) -> dict[str, str]:
    """Environment a run needs to find the twin's LPIPS backbones."""
    return {"TORCH_HOME": str(Path(folder).resolve() / FOLDERS["lpips"])}


def overrides(folder: str | Path, what: str = "sd14") -> list[str]:
    """Hydra overrides that point a run at the twin: ``sd14`` / ``sd21base`` / ``sd21`` (model,
    guidance CLIP, InstructPix2Pix), ``paper`` / ``pie_bench`` (the metric presets' models;
    LPIPS also needs :func:`env`), ``captioner`` (a folder dataset's BLIP)."""
    d = Path(folder).resolve()
    p = {k: str(d / v) for k, v in FOLDERS.items()}
    clip_b32 = f"{p['clip_b32']}/open_clip_model.safetensors"
    dino = f"{p['dino']}/model.safetensors"
    if what in ("sd14", "sd21base", "sd21"):
        out = [f"model.pretrained={p[what]}", "model.guidance_clip.name=ViT-B-32-quickgelu",
               f"model.guidance_clip.pretrained={clip_b32}"]
        if what == "sd14":
            out += [f"model.ip2p.unet={p['ip2p']}", f"model.ip2p.pretrained={p['ip2p']}"]
        return out
    if what == "paper":
        return ["metrics.clip.model=ViT-B-32-quickgelu", f"metrics.clip.pretrained={clip_b32}",
                f"metrics.structure.weights={dino}", f"metrics.background.mask_from_text.model={p['clipseg']}"]
    if what == "pie_bench":
        return [f"metrics.clip.model={p['clip_l14']}", f"metrics.structure.weights={dino}"]
    if what == "captioner":
        return [f"dataset.captioner={p['blip']}"]
    raise ValueError(f"twin.overrides: unknown target {what!r}; "
                     "use sd14, sd21base, sd21, paper, pie_bench or captioner")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m oig.testing.twin", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", help="output folder (created; a few GB)")
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS),
                    help=f"comma-separated subset of {','.join(FOLDERS)} (default: all)")
    ap.add_argument("--resolution", type=int, default=512,
                    help="image size the SD models declare (U-Net sample_size = resolution/8); default 512")
    ap.add_argument("--dtype", default="fp16", help="storage dtype of the SD / open_clip / timm / torchvision weights: "
                                                    "fp16 (default) | fp32 | bf16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rebuild models already present")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    out = build(a.dir, [m.strip() for m in a.models.split(",") if m.strip()], a.resolution, a.dtype, a.seed, a.force)
    lines = [f"twin zoo in {out} ({time.perf_counter() - t0:.0f} s)", f"  export TORCH_HOME={env(out)['TORCH_HOME']}"]
    lines += [f"  {k}: {' '.join(overrides(out, k))}" for k in ("sd14", "paper", "pie_bench", "captioner")]
    sys.stdout.write("\n".join(lines) + "\n")  # the command's answer (library code logs; this is the CLI)


if __name__ == "__main__":
    main()
