"""Peak memory and seconds per edit of every editor on the SD-1.x twin at 512 px.

    python -m experiments.bench_memory --twin DIR [--build] [--steps 2] [--editors oig,pnp,...]
                                       [--savers] [--out runs/bench_memory] [--device auto] [--dtype auto]

The twin (:mod:`oig.testing.twin`: random weights in CompVis/stable-diffusion-v1-4's shapes, the
InstructPix2Pix U-Net and OpenAI's ViT-B/32 for OIG's guidance) has every byte and every FLOP of
the real models, so memory and time are the real ones; only the pictures are noise.

Every measurement runs in its own subprocess, so peaks do not mix: one calibration process and
one process per editor (and per OIG memory saver with ``--savers``). Each loads the model,
builds the editor from its ``conf/method`` config (the overrides below), and edits one 512x512
image with ``--steps`` steps (a few: 50 steps of every editor take hours on a CPU). It records

* memory: on the CPU the process's resident set: ``rss_base`` (interpreter and libraries),
  ``rss_model`` (after loading the model and building the editor) and ``peak`` (the highest RSS
  during the edit: the kernel's peak counter is reset just before it, ``/proc/self/clear_refs``);
  on a GPU ``torch.cuda`` allocated bytes (after loading; peak during the edit).
* time: wall and CPU seconds of the edit (1 thread), and the U-Net / VAE work it did: images
  through the U-Net without and with a backward, through the VAE encoder and the decoder.

Extrapolation to the method's own step count (50; InstructPix2Pix 100), stated in the table:

* time: the same counters are read from the same editor on a tiny random SD model at the full
  step count (the call structure does not depend on the model's size; null-text's inner loop
  counted without early stopping, i.e. an upper bound); the calibration process times one image
  through each piece at 512 px; the extrapolated CPU time is the measured one plus the counted
  extra work times those unit costs.
* memory: the peak does not grow with the steps except for what an editor keeps per step;
  OIG / OIG+ keep the reconstruction's ResNet features (``source_feature_mb``, linear in the
  steps), added; the others keep latents per step (64 KB each at 512 px), neglected.
* GPU: ``gpu_fp32`` = peak - rss_base (the weights and tensors; a CUDA context adds about
  0.3-0.5 GB outside torch's allocator); ``gpu_fp16`` = half of it (weights and activations both
  halve). A GPU fits an editor when that plus 1 GB of context and fragmentation headroom is at
  most its size. These are estimates from CPU measurements; on a GPU the script measures directly.

Outputs ``<out>/bench_memory.json`` (every number) and ``<out>/bench_memory.md`` (the table).
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("bench_memory")

ROOT = Path(__file__).resolve().parent.parent
SOURCE, TARGET = "a red circle on a gray background", "a red square on a gray background"
#: case -> (method overrides, what to count the full-length run with). The measured run also gets
#: ``method.steps=--steps``; inner loops are shortened there (their cost is counted, see above).
CASES = {
    "oig": ["method=oig"],
    "oig_plus": ["method=oig_plus"],
    "ddim_recon": ["method=ddim_recon"],
    "ddim_word_swap": ["method=ddim_word_swap"],
    "sdedit": ["method=sdedit"],
    "diffedit": ["method=diffedit"],
    "diffedit_diffusers": ["method=diffedit", "method.mode=diffusers"],
    "pix2pix_zero": ["method=pix2pix_zero"],
    "pnp": ["method=pnp"],
    "pnp_reconstruction": ["method=pnp", "method.source_branch=reconstruction"],
    "masactrl": ["method=masactrl"],
    "ddim_p2p": ["method=ddim_p2p", "method.blend_words=auto"],
    "null_text": ["method=null_text"],
    "null_text_p2p": ["method=null_text_p2p"],
    "instruct_pix2pix": ["method=instruct_pix2pix"],
}
#: only for the short measured run: start the controlled phase at step 0 (MasaCtrl's start_step 4 is
#: past a 2-step run) and one inner iteration (null-text: 10 Adam steps per step, counted instead)
SHORT_RUN = {"masactrl": ["method.start_step=0"], "null_text": ["method.inner_steps=1"],
             "null_text_p2p": ["method.inner_steps=1"]}
SAVERS = {
    "oig +vae_checkpointing": ["method=oig", "++method.vae_checkpointing=true"],
    "oig +unet_checkpointing": ["method=oig", "++method.unet_checkpointing=true"],
    "oig +attention_slicing=auto": ["method=oig", "++method.attention_slicing=auto"],
    "oig +offload_features": ["method=oig", "method.offload_features=true"],
    "oig +all savers": ["method=oig", "++method.vae_checkpointing=true", "++method.unet_checkpointing=true",
                        "method.offload_features=true"],
}
COUNTERS = ("unet", "unet_grad", "vae_enc", "vae_dec", "vae_dec_grad")
GPUS_GB = (16, 24, 40, 80)


# ----------------------------------------------------------------------------- helpers (child side)
def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Counter:
    """Images through the U-Net (without / with autograd recording) and the VAE encoder / decoder."""

    def __init__(self, models):
        import torch

        self.n = collections.Counter()
        self.handles = []

        def hook(key, grad_key=None):
            def fn(module, args, kwargs):
                x = args[0] if args else next(iter(kwargs.values()))
                k = grad_key if grad_key and torch.is_grad_enabled() else key
                self.n[k] += int(x.shape[0])
            return fn

        for mod, key, gk in ((models.unet, "unet", "unet_grad"), (models.vae.encoder, "vae_enc", None),
                             (models.vae.decoder, "vae_dec", "vae_dec_grad")):
            self.handles.append(mod.register_forward_pre_hook(hook(key, gk), with_kwargs=True))

    def close(self):
        for h in self.handles:
            h.remove()


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    from oig.run import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _image(size: int):
    from PIL import Image

    from oig.toy import world

    s = world.random_scene(random.Random(0), striped=False)
    return Image.fromarray(world.render(s)).resize((size, size), Image.BICUBIC)


def _request(size: int):
    from oig.types import EditRequest

    return EditRequest(_image(size), SOURCE, TARGET, seed=0, id="bench")


def _bind(overrides, cache=None):
    from hydra.utils import instantiate

    from oig.models import load_sd

    cfg = _compose(overrides)
    models = load_sd(cfg.model.pretrained, device=cfg.device, dtype=cfg.dtype)
    return instantiate(cfg.method).bind(models, cache=cache), cfg


# ----------------------------------------------------------------------------- child: one edit
def child_edit(spec: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    rss_base = _status_mb("VmRSS")
    editor, cfg = _bind(spec["overrides"])
    models = editor.models
    cuda = models.device.type == "cuda"
    rss_model = _status_mb("VmRSS")
    cuda_model = torch.cuda.memory_allocated(models.device) / 2**20 if cuda else None
    req = _request(spec["resolution"])
    counter = Counter(models)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(models.device)
    peak_reset = _reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    res = editor(req)
    if cuda:
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    counter.close()
    import numpy as np

    out = {"case": spec["case"], "steps": int(cfg.method.steps), "device": str(models.device),
           "dtype": str(models.dtype).replace("torch.", ""), "rss_base_mb": rss_base, "rss_model_mb": rss_model,
           "peak_mb": _status_mb("VmHWM"), "peak_reset": peak_reset, "wall_s": wall, "cpu_s": cpu,
           "counts": dict(counter.n), "image": list(res.image.size),
           "finite": bool(np.isfinite(np.asarray(res.image, dtype=np.float32)).all()),
           "source_feature_mb": res.info.get("source_feature_mb"),
           "timings": {k: round(v, 2) for k, v in res.timings.items()}}
    if cuda:
        out.update(cuda_model_mb=cuda_model, cuda_peak_mb=torch.cuda.max_memory_allocated(models.device) / 2**20)
    return out


# ----------------------------------------------------------------------------- child: unit costs
def child_calibrate(spec: dict) -> dict:
    """CPU (or CUDA) seconds per image through each counted piece at the bench resolution."""
    import torch

    from oig.models import load_sd

    torch.set_num_threads(1)
    m = load_sd(spec["model"], device=spec["device"], dtype=spec["dtype"])
    lat = spec["resolution"] // m.vae_scale_factor
    dev, dt = m.device, m.dtype
    emb = torch.randn(2, 77, m.unet.config.cross_attention_dim, device=dev, dtype=dt)
    cuda = dev.type == "cuda"

    def clock(fn, repeats=spec.get("repeats", 1)):
        if cuda:
            fn()  # warm-up (kernel selection); the CPU has none worth the minutes
        best = float("inf")
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter() if cuda else time.process_time()
            fn()
            if cuda:
                torch.cuda.synchronize()
            best = min(best, (time.perf_counter() if cuda else time.process_time()) - t0)
        return best

    x2 = torch.randn(2, 4, lat, lat, device=dev, dtype=dt)
    img = torch.randn(1, 3, lat * 8, lat * 8, device=dev, dtype=dt)

    def unet_b2():
        with torch.no_grad():
            m.unet(x2, 500, encoder_hidden_states=emb)

    def unet_grad_b1():
        x = x2[:1].clone().requires_grad_(True)
        torch.autograd.grad(m.unet(x, 500, encoder_hidden_states=emb[:1]).sample.float().square().mean(), x)

    def vae_enc():
        with torch.no_grad():
            m.vae.encode(img)

    def vae_dec():
        with torch.no_grad():
            m.vae.decode(x2[:1])

    def vae_dec_grad():
        z = x2[:1].clone().requires_grad_(True)
        torch.autograd.grad(m.vae.decode(z).sample.float().square().mean(), z)

    return {"unet": clock(unet_b2) / 2, "unet_grad": clock(unet_grad_b1), "vae_enc": clock(vae_enc),
            "vae_dec": clock(vae_dec), "vae_dec_grad": clock(vae_dec_grad), "clock": "wall" if cuda else "cpu"}


# ----------------------------------------------------------------------------- full-length counts (tiny model)
def full_length_counts(cases: dict, tmp: Path) -> dict:
    """The counters of each case at its configured step count, on a tiny random SD model."""
    from oig.testing import make_tiny_clip, make_tiny_sd

    sd = make_tiny_sd(tmp / "sd")
    ip = make_tiny_sd(tmp / "ip2p", in_channels=8)
    clip = make_tiny_clip(tmp / "clip")
    out = {}
    for case, ov in cases.items():
        extra = ([f"model.pretrained={ip}", "method.unet=null", "method.pretrained=null"]
                 if "method=instruct_pix2pix" in ov else [])
        editor, cfg = _bind(["model=toy", f"model.pretrained={sd}", f"model.guidance_clip.name='{clip}'",
                             "device=cpu", "dtype=fp32", *ov, *extra,
                             *(["method.early_stop=-1.0"] if "null_text" in case else [])])
        counter = Counter(editor.models)
        editor(_request(64))
        counter.close()
        out[case] = {"steps": int(cfg.method.steps), "counts": dict(counter.n)}
    return out


# ----------------------------------------------------------------------------- parent
def _child(mode: str, spec: dict, env: dict) -> dict:
    cmd = [sys.executable, "-m", "experiments.bench_memory", f"--child-{mode}", json.dumps(spec)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout)[-2000:]
        last = tail.strip().splitlines()[-1] if tail.strip() else ""
        return {"case": spec.get("case", mode), "error": f"exit {p.returncode}: {last}", "stderr_tail": tail}
    return json.loads(lines[-1])


def _work(counts: dict, units: dict) -> float:
    return sum(counts.get(k, 0) * units[k] for k in COUNTERS)


def summarize(rows: list[dict], units: dict, full: dict) -> list[dict]:
    """Add the extrapolations (see the module docstring) to each measured row."""
    out = []
    for r in rows:
        r = dict(r)
        if "error" in r:
            out.append(r)
            continue
        base_case = r["case"].split(" ")[0]
        f = full.get(r["case"]) or full.get(base_case)
        r["edit_mb"] = r["peak_mb"] - r["rss_model_mb"]
        grow = 0.0
        if r.get("source_feature_mb") and f:
            grow = r["source_feature_mb"] / r["steps"] * (f["steps"] - r["steps"])
        r["peak_full_mb"] = r["peak_mb"] + grow
        r["gpu_fp32_gb"] = (r["peak_full_mb"] - r["rss_base_mb"]) / 1024
        r["gpu_fp16_gb"] = r["gpu_fp32_gb"] / 2
        if f and units:
            r["full_steps"] = f["steps"]
            clock = r["cpu_s"] if units.get("clock") == "cpu" else r["wall_s"]
            r["predicted_s"] = _work(r["counts"], units)
            r["full_s"] = clock + _work(f["counts"], units) - r["predicted_s"]
            r["full_counts"] = f["counts"]
        out.append(r)
    # a saver's recomputation is not in the counters: scale OIG's estimate by the measured ratio
    ref = next((r for r in out if r["case"] == "oig" and "full_s" in r), None)
    for r in out:
        if ref is not None and r["case"].startswith("oig +") and "full_s" in r:
            r["full_s"] = ref["full_s"] * r["cpu_s"] / ref["cpu_s"] if units.get("clock") == "cpu" else \
                ref["full_s"] * r["wall_s"] / ref["wall_s"]
    return out


def _fits(gb: float) -> str:
    return " ".join(f"{g}" if gb + 1.0 <= g else f"~~{g}~~" for g in GPUS_GB)


def markdown(rows: list[dict], units: dict, meta: dict) -> str:
    lines = [f"Measured {meta['date']} on {meta['device']} ({meta['dtype']}, 1 thread), SD-1.x twin at "
             f"{meta['resolution']} px, {meta['steps']} steps per measured edit; torch {meta['torch']}.",
             "",
             "| editor | RSS after load (GB) | peak during edit (GB) | edit working set (GB) | peak at full steps (GB) "
             "| GPU fp32 / fp16 (GB, est.) | fits fp32 | fits fp16 | measured edit (s) | full-length edit (s, est.) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | error: {r['error'][:120]} |||||||||")
            continue
        lines.append(
            f"| {r['case']} | {r['rss_model_mb'] / 1024:.2f} | {r['peak_mb'] / 1024:.2f} | {r['edit_mb'] / 1024:.2f} | "
            f"{r['peak_full_mb'] / 1024:.2f} | {r['gpu_fp32_gb']:.1f} / {r['gpu_fp16_gb']:.1f} | "
            f"{_fits(r['gpu_fp32_gb'])} | {_fits(r['gpu_fp16_gb'])} | "
            f"{r['cpu_s'] if units.get('clock') == 'cpu' else r['wall_s']:.0f} ({r['steps']} steps) | "
            f"{r.get('full_s', float('nan')):.0f} ({r.get('full_steps', '?')} steps) |")
    if units:
        lines += ["", "Unit costs per image at this resolution (" + units.get("clock", "cpu") + " seconds): " +
                  ", ".join(f"{k} {units[k]:.2f}" for k in COUNTERS) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--twin", required=False, help="twin zoo folder (python -m oig.testing.twin DIR)")
    p.add_argument("--build", action="store_true", help="build the twin's sd14, ip2p and clip_b32 if missing")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--steps", type=int, default=2, help="steps of each measured edit (default 2)")
    p.add_argument("--editors", default="all", help=f"comma-separated subset of {','.join(CASES)}, or all")
    p.add_argument("--savers", action="store_true", help="also measure OIG with each memory saver")
    p.add_argument("--no-editors", action="store_true", help="only the savers (with --savers)")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_memory"))
    p.add_argument("--units-from", default=None,
                   help="reuse the unit costs of an earlier run's bench_memory.json (same twin, resolution, device)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--child-edit", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-calibrate", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child_edit:
        print(json.dumps(child_edit(json.loads(a.child_edit))))
        return None
    if a.child_calibrate:
        print(json.dumps(child_calibrate(json.loads(a.child_calibrate))))
        return None
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not a.twin:
        p.error("--twin DIR is required")
    import torch

    from oig.testing import twin

    d = Path(a.twin).resolve()
    if a.build:
        twin.build(d, models=("sd14", "ip2p", "clip_b32"), resolution=a.resolution)
    if not (d / "sd14" / "unet").is_dir():
        p.error(f"{d}: no twin sd14 there; build one with `python -m oig.testing.twin {d} --resolution "
                f"{a.resolution}` or pass --build")
    built = json.loads((d / "twin.json").read_text())["models"].get("sd14", {})
    if built.get("resolution") != a.resolution:
        p.error(f"{d}: the twin declares {built.get('resolution')} px, the bench asks {a.resolution}; rebuild with "
                f"--resolution {a.resolution}")
    cases = dict(CASES) if a.editors == "all" else {k: CASES[k] for k in a.editors.split(",")}
    if a.no_editors:
        cases = {}
    if a.savers:
        cases.update(SAVERS)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **twin.env(d)}
    common = ["model=sd14", *twin.overrides(d, "sd14"), f"device={a.device}", f"dtype={a.dtype}", "progress=false"]
    t0 = time.perf_counter()
    if a.units_from:
        prev = json.loads(Path(a.units_from).read_text())
        if prev["meta"]["resolution"] != a.resolution:
            p.error(f"--units-from {a.units_from}: measured at {prev['meta']['resolution']} px, not {a.resolution}")
        units = prev["units"]
        log.info("unit costs from %s", a.units_from)
    else:
        log.info("calibrating unit costs at %d px", a.resolution)
        units = _child("calibrate", {"model": str(d / "sd14"), "resolution": a.resolution, "device": a.device,
                                     "dtype": a.dtype}, env)
    if "error" in units:
        log.warning("calibration failed: %s", units["error"])
        units = {}
    log.info("counting full-length U-Net / VAE work on a tiny model")
    with tempfile.TemporaryDirectory() as tmp:
        full = full_length_counts({k: v for k, v in cases.items()}, Path(tmp))
    rows = []
    for case, ov in cases.items():
        extra = SHORT_RUN.get(case, [])
        if "method=instruct_pix2pix" in ov:
            extra = extra + [f"model.pretrained={d / 'ip2p'}", "method.unet=null", "method.pretrained=null"]
        log.info("measuring %s", case)
        r = _child("edit", {"case": case, "resolution": a.resolution,
                            "overrides": common + ov + extra + [f"method.steps={a.steps}"]}, env)
        log.info("  %s", {k: r.get(k) for k in ("peak_mb", "rss_model_mb", "cpu_s", "wall_s", "counts", "error")})
        rows.append(r)
        (out / "bench_memory.partial.json").write_text(json.dumps(rows, indent=1))
    rows = summarize(rows, units, full)
    import datetime

    meta = {"date": datetime.date.today().isoformat(), "device": rows[0].get("device", "?") if rows else "?",
            "dtype": rows[0].get("dtype", "?") if rows else "?", "resolution": a.resolution, "steps": a.steps,
            "torch": torch.__version__, "seconds": round(time.perf_counter() - t0)}
    (out / "bench_memory.json").write_text(json.dumps({"meta": meta, "units": units, "rows": rows}, indent=1))
    md = markdown(rows, units, meta)
    (out / "bench_memory.md").write_text(md)
    print(md)
    return rows


if __name__ == "__main__":
    main()
