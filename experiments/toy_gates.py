"""Quality gates of the toy model zoo, measured on held-out scenes (seeds >= 1,000,000).

    python -m experiments.toy_gates [--n 200] [--out oig/toy/models/GATES.json]

Gates (issue: toy world):
  vae_psnr          VAE reconstruction PSNR >= 30 dB
  t2i_color/bg/shape text-to-image (50 DDIM steps, CFG 5): oracle reads the prompt's colour >= 90%,
                    background >= 90%, shape >= 80%
  inversion_psnr    DDIM inversion (guidance 1) then reconstruction (guidance 1) PSNR >= 25 dB
  clip_zero_shot    toy CLIP picks the right caption among captions differing in one attribute >= 95%
  ip2p_success      toy InstructPix2Pix oracle edit success >= 80% on shape-swap and colour-change
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch

from oig.clip import load_clip
from oig.diffusion import Diffusion
from oig.image import pil_to_tensor
from oig.models import load_sd
from oig.toy import world
from oig.toy.train import _perturb_caption

log = logging.getLogger("toy_gates")
THRESH = {"vae_psnr": 30.0, "t2i_color": 0.9, "t2i_background": 0.9, "t2i_shape": 0.8, "inversion_psnr": 25.0,
          "clip_zero_shot": 0.95, "ip2p_success": 0.8}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))


def held_out(n: int, seed: int = 1_000_000):
    return [world.random_scene(random.Random(f"gate:{seed}:{i}")) for i in range(n)]


@torch.no_grad()
def gate_vae(core: Diffusion, scenes) -> float:
    vals = []
    for s in scenes:
        img = world.render(s)
        from PIL import Image

        z = core.encode_image(Image.fromarray(img))
        vals.append(psnr(np.asarray(core.decode_pil(z)), img))
    return float(np.mean(vals))


@torch.no_grad()
def gate_t2i(core: Diffusion, scenes, steps=50, cfg=5.0, bs=25) -> dict:
    oracle = world.Oracle()
    hits = {"color": 0, "background": 0, "shape": 0}
    for b in range(0, len(scenes), bs):
        chunk = scenes[b : b + bs]
        cond = core.encode_text([s.caption for s in chunk])
        neg = core.encode_text([""] * len(chunk))
        xT = torch.cat([core.noise((1, 4, 16, 16), 10_000 + b + i) for i in range(len(chunk))])
        z = core.sample(xT, cond, neg, cfg, steps)
        imgs = ((core.decode(z).clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        for s, im in zip(chunk, imgs):
            c = oracle.check(im, s)
            for k in hits:
                hits[k] += c[k]
    return {f"t2i_{k}": v / len(scenes) for k, v in hits.items()}


@torch.no_grad()
def gate_inversion(core: Diffusion, scenes, steps=50) -> float:
    from PIL import Image

    vals = []
    for s in scenes:
        img = world.render(s)
        inv = core.invert_image(Image.fromarray(img), s.caption, steps, convention="standard")
        z = core.sample(inv.xT, core.encode_text([s.caption]), None, 1.0, steps)
        vals.append(psnr(np.asarray(core.decode_pil(z)), img))
    return float(np.mean(vals))


@torch.no_grad()
def gate_clip(n: int) -> float:
    clip = load_clip("toy")
    ok = 0
    for i, s in enumerate(held_out(n, seed=2_000_000)):
        rng = random.Random(f"clipgate:{i}")
        negs = sorted({_perturb_caption(s.caption, rng) for _ in range(20)} - {s.caption})
        x = torch.from_numpy(world.render(s)).permute(2, 0, 1)[None].float() / 255
        v = clip.encode_image(x)
        t = clip.encode_text([s.caption] + negs)
        ok += int((v @ t.T).argmax().item() == 0)
    return ok / n


@torch.no_grad()
def gate_ip2p(n: int, steps=50) -> float:
    from baselines.instruct_pix2pix import InstructPix2Pix
    from oig.types import EditRequest
    from PIL import Image

    base = load_sd("toy", device="cpu", dtype="fp32")
    ed = InstructPix2Pix(steps=steps).bind(base)
    oracle = world.Oracle()
    samples = world.benchmark(n, seed=3_000_000, tasks=("shape_swap", "color_change"))
    ok = 0
    for e in samples:
        r = ed(EditRequest(Image.fromarray(e.source_image), e.source_prompt, e.target_prompt, e.instruction, seed=0))
        attr = world.TASK_ATTRIBUTE[e.task]
        ok += int(oracle.check(np.asarray(r.image), e.target)[attr])
    return ok / len(samples)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="held-out prompts for the text-to-image gate")
    p.add_argument("--n-small", type=int, default=50, help="scenes for the VAE / inversion / IP2P gates")
    p.add_argument("--only", nargs="*", default=None, help="subset of: vae t2i inversion clip ip2p")
    p.add_argument("--out", default=str(Path(world.__file__).parent / "models" / "GATES.json"))
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(0)
    core = Diffusion(load_sd("toy", device="cpu", dtype="fp32"))
    todo = a.only or ["vae", "t2i", "inversion", "clip", "ip2p"]
    res, t0 = {}, time.time()
    small = held_out(a.n_small)
    if "vae" in todo:
        res["vae_psnr"] = gate_vae(core, small)
    if "t2i" in todo:
        res.update(gate_t2i(core, held_out(a.n, seed=1_500_000)))
    if "inversion" in todo:
        res["inversion_psnr"] = gate_inversion(core, small[:20])
    if "clip" in todo:
        res["clip_zero_shot"] = gate_clip(a.n)
    if "ip2p" in todo:
        res["ip2p_success"] = gate_ip2p(max(1, a.n_small // 2))
    report = {k: {"value": round(v, 4), "threshold": THRESH[k], "pass": bool(v >= THRESH[k])} for k, v in res.items()}
    report["_seconds"] = round(time.time() - t0, 1)
    old = json.loads(Path(a.out).read_text()) if Path(a.out).exists() else {}
    old.update(report)
    Path(a.out).write_text(json.dumps(old, indent=2) + "\n")
    for k, v in report.items():
        log.info("%s: %s", k, v)


if __name__ == "__main__":
    main()
