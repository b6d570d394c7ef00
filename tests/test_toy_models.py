"""The shipped toy model zoo: loads through the real loaders, stays small, and keeps its quality.

Thresholds sit a little below the gates measured by experiments/toy_gates.py on larger sets
(see oig/toy/models/README.md), so a broken or swapped weight file fails here.
"""

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oig.models import TOY_DIR, load_sd
from oig.toy import world


def test_toy_zoo_is_small_fp16_safetensors():
    files = list(TOY_DIR.rglob("*"))
    weights = [f for f in files if f.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt")]
    assert weights and all(f.suffix == ".safetensors" for f in weights)
    assert sum(f.stat().st_size for f in files if f.is_file()) <= 40 * 2**20
    from safetensors import safe_open

    for f in weights:
        with safe_open(str(f), "pt") as st:
            dt = {st.get_slice(k).get_dtype() for k in st.keys()}
        assert dt <= {"F16", "I64"}, (f, dt)


def test_toy_folder_loads_with_plain_diffusers_and_open_clip():
    import open_clip
    from diffusers import StableDiffusionInstructPix2PixPipeline, StableDiffusionPipeline, UNet2DConditionModel

    pipe = StableDiffusionPipeline.from_pretrained(TOY_DIR / "sd", torch_dtype=torch.float32)
    assert pipe.unet.config.sample_size == 16 and pipe.vae.config.latent_channels == 4
    assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.scheduler.config.num_train_timesteps == 1000
    ip2p_unet = UNet2DConditionModel.from_pretrained(TOY_DIR / "ip2p", subfolder="unet", torch_dtype=torch.float32)
    assert ip2p_unet.config.in_channels == 8
    StableDiffusionInstructPix2PixPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                           unet=ip2p_unet, scheduler=pipe.scheduler, safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{TOY_DIR / 'clip'}")
    tok = open_clip.get_tokenizer(f"local-dir:{TOY_DIR / 'clip'}")
    assert model.encode_text(tok(["a red circle on a gray background"])).shape[-1] == 128


@torch.no_grad()
def test_toy_vae_and_clip_quality():
    from oig.clip import load_clip
    from oig.diffusion import Diffusion
    from oig.toy.train import _perturb_caption

    core = Diffusion(load_sd("toy", device="cpu", dtype="fp32"))
    clip = load_clip("toy")
    psnrs, right = [], 0
    for i in range(16):
        s = world.random_scene(random.Random(f"test-toy:{i}"))
        img = world.render(s)
        rec = np.asarray(core.decode_pil(core.encode_image(Image.fromarray(img))), dtype=np.float64)
        psnrs.append(10 * np.log10(255**2 / np.mean((rec - img) ** 2)))
        negs = sorted({_perturb_caption(s.caption, random.Random(f"n{i}:{k}")) for k in range(12)} - {s.caption})
        v = clip.encode_image(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255)
        right += int((v @ clip.encode_text([s.caption] + negs).T).argmax() == 0)
    assert np.mean(psnrs) >= 29.0
    assert right >= 14


@torch.no_grad()
def test_toy_text_to_image_follows_prompts():
    from oig.diffusion import Diffusion

    core = Diffusion(load_sd("toy", device="cpu", dtype="fp32"))
    scenes = [world.random_scene(random.Random(f"test-t2i:{i}")) for i in range(8)]
    xT = torch.cat([core.noise((1, 4, 16, 16), i) for i in range(8)])
    z = core.sample(xT, core.encode_text([s.caption for s in scenes]), core.encode_text([""] * 8), 5.0, 25)
    imgs = ((core.decode(z).clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    o = world.Oracle()
    reads = [o.check(im, s) for im, s in zip(imgs, scenes)]
    assert sum(r["color"] for r in reads) >= 6
    assert sum(r["background"] for r in reads) >= 6
