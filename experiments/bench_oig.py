"""Cost of one OIG edit against a plain 50-step CFG DDIM sampling, same model, same process.

    python -m experiments.bench_oig [--model toy] [--device auto] [--repeats 3]

Prints the wall-clock seconds of each and the ratio (target: OIG <= 4.5x the plain sampling),
twice: ``cold`` (the whole edit: inversion, reconstruction, guided pass) and ``warm`` (the
source's inversion and reconstruction come from the content cache, as in every sweep point
after the first). The phases are printed too. The first call of each is a warm-up.

Sweeps (``--sweep N``, default 7): an N-point λ2 sweep of the image, cold, as a multiple of one
cold OIG edit: batched (every point in one pass, ``OIG.edit_points``; target <= 3x on the toy
model) and one edit per point in the same process (the per-job path without its per-job
process start and model load, i.e. a lower bound of the multirun's cost).

It also times the pieces every guided step must compute (U-Net forward of both CFG copies,
U-Net backward of one copy, VAE decoder and CLIP forward + backward) and prints
``floor_ratio_cold``: the ratio an implementation with zero overhead would reach, i.e. what
the algorithm itself costs on this model and device.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import time

import torch
from PIL import Image

from oig.diffusion import Diffusion
from oig.models import load_sd
from oig.oig_editor import OIG
from oig.toy import world
from oig.types import EditRequest

log = logging.getLogger("bench_oig")


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy")
    p.add_argument("--clip", default="toy")
    p.add_argument("--clip-pretrained", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--image", default=None, help="an image file (default: a toy scene)")
    p.add_argument("--sweep", type=int, default=7,
                   help="also time an N-point λ2 sweep of the image, batched vs one edit per point (0: skip)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    models = load_sd(a.model, device=a.device, dtype=a.dtype)
    core = Diffusion(models)
    if a.image:
        img = Image.open(a.image).convert("RGB")
        sp, tp = "a photo of a cat", "a photo of a dog"
    else:
        s = world.random_scene(random.Random(0), striped=False)
        img, sp, tp = Image.fromarray(world.render(s)), s.caption, s.replace(shape="square" if s.shape != "square" else "circle").caption
    src = core.prepare(img)
    lat = models.resolution // models.vae_scale_factor
    shape = (1, models.unet.config.in_channels, src.size[1] // models.vae_scale_factor, src.size[0] // models.vae_scale_factor)
    cond, neg = core.encode_text([tp]), core.encode_text([sp])

    def plain():
        _sync()
        t = time.perf_counter()
        z = core.sample(core.noise(shape, 0), cond, neg, 5.0, a.steps)
        core.decode_pil(z)
        _sync()
        return time.perf_counter() - t

    editor = OIG(steps=a.steps, clip_model=a.clip, clip_pretrained=a.clip_pretrained).bind(models)
    phases = {}

    def oig():
        _sync()
        t = time.perf_counter()
        r = editor(EditRequest(img, sp, tp, seed=0))
        _sync()
        phases.update(r.timings)
        return time.perf_counter() - t

    comp = components(models, core, editor, shape, cond, neg, a.repeats)
    plain(), oig()  # warm-up
    tp_ = [plain() for _ in range(a.repeats)]
    to_ = [oig() for _ in range(a.repeats)]
    cold_phases = dict(phases)
    import tempfile

    from oig.cache import InversionCache

    with tempfile.TemporaryDirectory() as tmp:
        editor.bind(models, cache=InversionCache(tmp))
        oig()  # fills the cache
        tw_ = [oig() for _ in range(a.repeats)]
    res = {
        "device": str(models.device), "dtype": str(models.dtype), "model": a.model, "latent": list(shape),
        "plain_sampling_s": statistics.median(tp_), "oig_edit_cold_s": statistics.median(to_),
        "ratio_cold": statistics.median(to_) / statistics.median(tp_),
        "oig_edit_warm_s": statistics.median(tw_), "ratio_warm": statistics.median(tw_) / statistics.median(tp_),
        "oig_phases_cold_s": {k: round(v, 3) for k, v in cold_phases.items()},
        "step_components_ms": {k: round(v * 1e3, 3) for k, v in comp.items()},
    }
    if a.sweep:
        res.update(sweep_costs(models, img, sp, tp, a))
    n = a.steps
    # inversion (n - 2 batch-1 calls, official index convention) + batch-1 reconstruction (n) + n guided steps
    floor = ((2 * n - 2) * comp["unet_fwd_b1"] + n * (comp["unet_fwd_b1"] + comp["unet_fwd_bwd_b1"] + comp["vae_clip_fwd_bwd"]))
    res["floor_ratio_cold"] = floor / res["plain_sampling_s"]
    log.info(json.dumps(res, indent=2))
    return res


#: the λ2 values of the sweep benchmark (log-spaced, as the lambda2_sweep preset)
SWEEP_LAMBDA2 = (0.0, 0.1, 1.0, 10.0, 30.0, 100.0, 300.0, 1000.0)


def sweep_costs(models, img, sp, tp, a) -> dict:
    """An N-point λ2 sweep of one image, cold (no cache): batched (one pass, ``OIG.edit_points``) and
    one edit per point in one process (the first cold, the others with the inversion and the
    reconstruction from the cache: the per-job path without its per-job process start and model
    load). Both as multiples of one cold OIG edit."""
    import tempfile

    from oig.cache import InversionCache

    values = list(SWEEP_LAMBDA2[: a.sweep])
    if len(values) < a.sweep:
        raise SystemExit(f"--sweep: at most {len(SWEEP_LAMBDA2)} points")
    eds = [OIG(steps=a.steps, lambda2=v, clip_model=a.clip, clip_pretrained=a.clip_pretrained).bind(models)
           for v in values]

    def timed(fn):
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
        return time.perf_counter() - t

    def per_job_sweep():
        with tempfile.TemporaryDirectory() as tmp:
            cache = InversionCache(tmp)
            for e in eds:
                e.bind(models, cache=cache)
            for e in eds:
                e(EditRequest(img, sp, tp, seed=0))
            for e in eds:
                e.bind(models)

    # interleaved (cold edit, batched sweep, per-job sweep) rounds, so that a drift of the machine's
    # speed during the benchmark hits the three alike
    cold, batched, per_job = [], [], []
    for _ in range(a.repeats):
        cold.append(timed(lambda: eds[2](EditRequest(img, sp, tp, seed=0))))
        batched.append(timed(lambda: eds[0].edit_points(EditRequest(img, sp, tp, seed=0), eds)))
        per_job.append(timed(per_job_sweep))
    cold_s = statistics.median(cold)
    b, j = statistics.median(batched), statistics.median(per_job)
    return {"sweep_points": len(values), "sweep_lambda2": values, "sweep_cold_edit_s": cold_s,
            "sweep_batched_s": b, "sweep_per_job_s": j,
            "sweep_batched_x_cold_edit": b / cold_s, "sweep_per_job_x_cold_edit": j / cold_s,
            "sweep_speedup": j / b}


def components(models, core, editor, shape, cond, neg, repeats):
    """Median seconds of the pieces of one guided step (see the module docstring)."""
    unet, t = models.unet, core.timesteps(50)[10]
    x = core.noise(shape, 1)
    direction = None  # the CLIP triplet's gradient direction: E_T(source) - E_T(target)
    if editor.clip is not None:
        with torch.no_grad():
            e = editor.clip.encode_text(["a red circle on a gray background", "a blue square on a gray background"])
        direction = (e[0] - e[1])[None]

    def timed(fn):
        fn()
        out = []
        for _ in range(max(repeats, 3) * 5):
            _sync()
            t0 = time.perf_counter()
            fn()
            _sync()
            out.append(time.perf_counter() - t0)
        return statistics.median(out)

    def fwd_b1():
        with torch.no_grad():
            unet(x, t, encoder_hidden_states=cond)

    def fwd_b2():
        with torch.no_grad():
            unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([neg, cond]))

    def fwd_bwd_b1():
        xg = x.detach().requires_grad_(True)
        torch.autograd.grad(unet(xg, t, encoder_hidden_states=cond).sample.square().sum(), xg)

    def vae_clip():
        xg = x.detach().requires_grad_(True)
        img = core.decode(xg) / 2 + 0.5
        loss = editor.clip.encode_image(img.to(editor.clip.dtype)) @ direction.T if direction is not None else img.sum()
        torch.autograd.grad(loss.sum(), xg)

    return {"unet_fwd_b2": timed(fwd_b2), "unet_fwd_b1": timed(fwd_b1), "unet_fwd_bwd_b1": timed(fwd_bwd_b1),
            "vae_clip_fwd_bwd": timed(vae_clip)}


if __name__ == "__main__":
    main()
