"""Train the toy-world model zoo on a CPU.

    python -m oig.toy.train vae          # AutoencoderKL 64x64x3 -> 16x16x4
    python -m oig.toy.train unet         # UNet2DConditionModel + CLIPTextModel, jointly, with CFG dropout
    python -m oig.toy.train clip         # an open_clip model, contrastive on scenes and captions
    python -m oig.toy.train ip2p         # an InstructPix2Pix UNet (8 input channels), from the UNet
    python -m oig.toy.train all          # the four in order (one at a time: two on 2 cores is slower)

Every component checkpoints to ``.toy_train/<component>/ckpt.pt`` and resumes from it; the
final weights go to ``oig/toy/models`` (fp16 safetensors) and a line with the wall time and
final loss is appended to ``.toy_train/<component>/log.txt``. Seeds are fixed, data is drawn
from scene seeds below 1,000,000 (held-out benchmark scenes use seeds from 1,000,000).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import world
from .tokenizer import save_tokenizer

log = logging.getLogger(__name__)

MODELS = Path(__file__).parent / "models"
SD_DIR = MODELS / "sd"
IP2P_DIR = MODELS / "ip2p"
CLIP_DIR = MODELS / "clip"
WORK = Path(".toy_train")

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=64,
)
TEXT_CONFIG = dict(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=128,
)
UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    cross_attention_dim=128,
    attention_head_dim=4,  # diffusers' legacy name: this is the number of heads
    norm_num_groups=16,
)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


def to_tensor(imgs: list[np.ndarray]) -> torch.Tensor:
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x


def scene_batch(tag: str, step: int, bs: int, flip: bool = True) -> tuple[torch.Tensor, list[str]]:
    imgs, caps = [], []
    for i in range(bs):
        rng = random.Random(f"{tag}:{step}:{i}")
        s = world.random_scene(rng)
        img = world.render(s)
        if flip and rng.random() < 0.5:
            img = img[:, ::-1]
        imgs.append(np.ascontiguousarray(img))
        caps.append(s.caption)
    return to_tensor(imgs), caps


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))


class Trainer:
    """Checkpointed loop shared by every component."""

    def __init__(self, name: str, modules: dict[str, torch.nn.Module], params, total: int, lr: float, warmup: int):
        self.name, self.modules, self.total, self.lr, self.warmup = name, modules, total, lr, warmup
        self.dir = WORK / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
        self.ema = {k: copy.deepcopy(m).eval().requires_grad_(False) for k, m in modules.items()}
        self.step = 0
        self.losses: list[float] = []
        ck = self.dir / "ckpt.pt"
        if ck.exists():
            state = torch.load(ck, map_location="cpu", weights_only=True)
            for k, m in modules.items():
                m.load_state_dict(state["model"][k])
                self.ema[k].load_state_dict(state["ema"][k])
            self.opt.load_state_dict(state["opt"])
            self.step = int(state["step"])
            self.losses = list(state["losses"])
            log.info("%s: resumed at step %d", name, self.step)
        self.t0 = time.time()

    def save(self):
        state = {
            "model": {k: m.state_dict() for k, m in self.modules.items()},
            "ema": {k: m.state_dict() for k, m in self.ema.items()},
            "opt": self.opt.state_dict(),
            "step": self.step,
            "losses": self.losses,
        }
        tmp = self.dir / "ckpt.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(self.dir / "ckpt.pt")

    def run(self, loss_fn, ema_decay: float = 0.999, every: int = 250):
        bar = tqdm(total=self.total, initial=self.step, desc=f"train {self.name}")
        params = [p for g in self.opt.param_groups for p in g["params"]]
        while self.step < self.total:
            for g in self.opt.param_groups:
                g["lr"] = lr_at(self.step, self.total, self.lr, self.warmup)
            loss = loss_fn(self.step)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            self.opt.step()
            d = min(ema_decay, (1 + self.step) / (10 + self.step))
            with torch.no_grad():
                for k, m in self.modules.items():
                    for pe, pm in zip(self.ema[k].parameters(), m.parameters()):
                        pe.lerp_(pm, 1 - d)
                    for be, bm in zip(self.ema[k].buffers(), m.buffers()):
                        be.copy_(bm)
            self.losses.append(float(loss.detach()))
            self.step += 1
            bar.update(1)
            if self.step % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(self.losses[-50:]):.4f}")
            if self.step % every == 0 or self.step == self.total:
                self.save()
        bar.close()
        final = float(np.mean(self.losses[-100:])) if self.losses else float("nan")
        with open(self.dir / "log.txt", "a") as f:
            f.write(
                json.dumps({"component": self.name, "steps": self.step, "session_seconds": round(time.time() - self.t0, 1),
                            "final_loss_mean100": final}) + "\n"
            )
        return final


# --------------------------------------------------------------------------------------


def train_vae(steps: int = 1300, bs: int = 32, lr: float = 1e-3, kl: float = 1e-6):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**VAE_CONFIG)
    tr = Trainer("vae", {"vae": vae}, vae.parameters(), steps, lr, warmup=100)

    def loss_fn(step):
        x, _ = scene_batch("vae", step, bs)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        return F.mse_loss(rec, x) + 0.1 * F.l1_loss(rec, x) + kl * post.kl().mean() / x[0].numel()

    tr.run(loss_fn)
    ema = tr.ema["vae"]
    # SD convention: scale latents to unit variance
    with torch.no_grad():
        x, _ = scene_batch("vae-scale", 0, 256, flip=False)
        z = ema.encode(x).latent_dist.mean
    ema.register_to_config(scaling_factor=float(1.0 / z.std()))
    ema.half().save_pretrained(SD_DIR / "vae")
    log.info("vae saved, scaling factor %.4f", ema.config.scaling_factor)


def _load_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(SD_DIR / "vae", torch_dtype=torch.float32).eval().requires_grad_(False)


def latent_bank(kind: str, n: int, bs: int = 64):
    """Encode ``n`` training examples once; cached in .toy_train."""
    path = WORK / f"bank_{kind}_{n}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    vae = _load_vae()
    mus, sds, caps, srcs, srcs_sd, instr = [], [], [], [], [], []
    for b in tqdm(range(0, n, bs), desc=f"encode {kind} bank"):
        imgs, simgs = [], []
        for i in range(b, min(n, b + bs)):
            rng = random.Random(f"bank-{kind}:{i}")
            if kind == "t2i":
                s = world.random_scene(rng)
                imgs.append(world.render(s))
                caps.append(s.caption)
            else:
                task = rng.choice(world.TASKS)
                src = world.random_scene(rng, striped=False if task == "appearance_change" else None)
                e = world.make_edit(src, task, rng)
                imgs.append(e.target_image)
                simgs.append(e.source_image)
                instr.append(e.instruction)
        with torch.no_grad():
            d = vae.encode(to_tensor(imgs)).latent_dist
            mus.append(d.mean)
            sds.append(d.std)
            if simgs:
                srcs.append(vae.encode(to_tensor(simgs)).latent_dist.mode())
    bank = {"mu": torch.cat(mus), "sd": torch.cat(sds), "text": caps if kind == "t2i" else instr}
    if srcs:
        bank["src"] = torch.cat(srcs)
    torch.save(bank, path)
    return bank


def _text_models():
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tok_dir = SD_DIR / "tokenizer"
    save_tokenizer(tok_dir)
    tok = CLIPTokenizer.from_pretrained(tok_dir)
    cfg = CLIPTextConfig(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **TEXT_CONFIG,
    )
    return tok, CLIPTextModel(cfg)


def _diffusion_loss(unet, text_encoder, tok, bank, step, bs, sched, drop=0.1, image_cond=False):
    g = torch.Generator().manual_seed(step)
    idx = torch.randint(0, bank["mu"].shape[0], (bs,), generator=g)
    z0 = (bank["mu"][idx] + bank["sd"][idx] * torch.randn(bank["mu"][idx].shape, generator=g)) * bank["scale"]
    texts = [bank["text"][i] for i in idx.tolist()]
    u = torch.rand(bs, generator=g)
    if image_cond:  # InstructPix2Pix: 5% no text, 5% no image, 5% neither
        texts = ["" if (0.05 <= v < 0.10 or v >= 0.95) else t for v, t in zip(u.tolist(), texts)]
    else:
        texts = ["" if v < drop else t for v, t in zip(u.tolist(), texts)]
    ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    emb = text_encoder(ids)[0]
    t = torch.randint(0, sched.config.num_train_timesteps, (bs,), generator=g)
    noise = torch.randn(z0.shape, generator=g)
    zt = sched.add_noise(z0, noise, t)
    if image_cond:
        src = bank["src"][idx] * bank["scale"]
        keep = ~((u < 0.05) | (u >= 0.95))
        src = src * keep[:, None, None, None]
        zt = torch.cat([zt, src], 1)
    pred = unet(zt, t, encoder_hidden_states=emb).sample
    ac = sched.alphas_cumprod[t]
    snr = ac / (1 - ac)
    w = torch.clamp(snr, max=5.0) / snr
    return (w * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()


def _save_sd_folder(unet, text_encoder, tok):
    from diffusers import DDIMScheduler

    unet.half().save_pretrained(SD_DIR / "unet")
    text_encoder.half().save_pretrained(SD_DIR / "text_encoder")
    tok.save_pretrained(SD_DIR / "tokenizer")
    DDIMScheduler(**SCHEDULER_CONFIG).save_pretrained(SD_DIR / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (SD_DIR / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def train_unet(steps: int = 4000, bs: int = 32, lr: float = 5e-4, bank_size: int = 20000):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    tok, text_encoder = _text_models()
    unet = UNet2DConditionModel(**UNET_CONFIG)
    bank = latent_bank("t2i", bank_size)
    bank["scale"] = _load_vae().config.scaling_factor
    sched = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k not in ("set_alpha_to_one",)})
    params = list(unet.parameters()) + list(text_encoder.parameters())
    tr = Trainer("unet", {"unet": unet, "text_encoder": text_encoder}, params, steps, lr, warmup=300)
    tr.run(lambda s: _diffusion_loss(unet, text_encoder, tok, bank, s, bs, sched))
    _save_sd_folder(tr.ema["unet"], tr.ema["text_encoder"], tok)


def train_ip2p(steps: int = 2000, bs: int = 32, lr: float = 3e-4, bank_size: int = 12000):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    base = UNet2DConditionModel.from_pretrained(SD_DIR / "unet", torch_dtype=torch.float32)
    cfg = dict(base.config)
    cfg["in_channels"] = 8
    unet = UNet2DConditionModel.from_config(cfg)
    sd = base.state_dict()
    w = sd["conv_in.weight"]
    sd["conv_in.weight"] = torch.cat([w, torch.zeros_like(w)], 1)  # InstructPix2Pix's zero-init of the new channels
    unet.load_state_dict(sd)
    tok = CLIPTokenizer.from_pretrained(SD_DIR / "tokenizer")
    te = CLIPTextModel.from_pretrained(SD_DIR / "text_encoder", torch_dtype=torch.float32).eval().requires_grad_(False)
    bank = latent_bank("ip2p", bank_size)
    bank["scale"] = _load_vae().config.scaling_factor
    sched = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k not in ("set_alpha_to_one",)})
    tr = Trainer("ip2p", {"unet": unet}, unet.parameters(), steps, lr, warmup=100)
    tr.run(lambda s: _diffusion_loss(unet, te, tok, bank, s, bs, sched, image_cond=True))
    tr.ema["unet"].half().save_pretrained(IP2P_DIR / "unet")


CLIP_MODEL_CFG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 192, "patch_size": 8, "head_width": 48},
    "text_cfg": {"context_length": 32, "vocab_size": None, "width": 128, "heads": 4, "layers": 3,
                 "hf_tokenizer_name": "toy"},
}
# The toy world's pixel statistics, used as the toy CLIP's normalisation
CLIP_MEAN = (0.55, 0.5, 0.45)
CLIP_STD = (0.27, 0.27, 0.3)


def train_clip(steps: int = 1000, bs: int = 128, lr: float = 1e-3):
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_tokenizer(CLIP_DIR, model_max_length=32)
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(CLIP_DIR)
    cfg = copy.deepcopy(CLIP_MODEL_CFG)
    cfg["text_cfg"]["vocab_size"] = len(tok)
    (CLIP_DIR / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": cfg,
        "preprocess_cfg": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD), "interpolation": "bicubic",
                           "resize_mode": "shortest"},
    }, indent=2) + "\n")
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{CLIP_DIR}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{CLIP_DIR}")
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)

    def loss_fn(step):
        x, caps = scene_batch("clip", step, bs)
        x = ((x + 1) / 2 - mean) / std
        img = F.normalize(model.encode_image(x), dim=-1)
        # hard negatives: each image's caption with one attribute changed
        rng = random.Random(f"clip-neg:{step}")
        negs = [_perturb_caption(c, rng) for c in caps]
        txt = F.normalize(model.encode_text(tokenizer(caps + negs)), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.t()
        labels = torch.arange(bs)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits[:, :bs].t(), labels)) / 2

    tr = Trainer("clip", {"clip": model}, model.parameters(), steps, lr, warmup=200)
    tr.run(loss_fn, ema_decay=0.995)
    state = {k: v.half() if v.is_floating_point() else v for k, v in tr.ema["clip"].state_dict().items()}
    save_file(state, CLIP_DIR / "open_clip_model.safetensors")


def _perturb_caption(caption: str, rng: random.Random) -> str:
    words = caption.split()
    striped = "striped" in words
    rest = [w for w in words if w != "striped"]
    color, shape, bg = rest[1], rest[2], rest[5]
    which = rng.choice(["color", "shape", "bg", "striped"])
    if which == "color":
        color = rng.choice([c for c in world.COLORS if c != color])
    elif which == "shape":
        shape = rng.choice([s for s in world.SHAPES if s != shape])
    elif which == "bg":
        bg = rng.choice([b for b in world.BACKGROUNDS if b != bg])
    else:
        striped = not striped
    return f"a {'striped ' if striped else ''}{color} {shape} on a {bg} background"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("component", choices=["vae", "unet", "clip", "ip2p", "all"])
    p.add_argument("--steps", type=int, default=None, help="override the component's step count")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(a.threads)
    fns = {"vae": train_vae, "unet": train_unet, "clip": train_clip, "ip2p": train_ip2p}
    names = list(fns) if a.component == "all" else [a.component]
    for n in names:
        t = time.time()
        kw = {"steps": a.steps} if a.steps else {}
        fns[n](**kw)
        log.info("%s done in %.1f min", n, (time.time() - t) / 60)


if __name__ == "__main__":
    main()
