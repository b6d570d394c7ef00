"""DiffEdit's paper mode and InstructPix2Pix's official sampler (issue #14, items 6 and 7).

DiffEdit: the paper's masked denoising pastes, after the step t_i -> t_{i+1}, the inverted latent at
t_{i+1} outside the mask and, after the last step, the clean latent z0 itself; diffusers' pipeline
pastes one step late and ends on the latent at abar(t=1) (pinned here too). InstructPix2Pix: the
official CLI samples with k-diffusion's Euler-ancestral on ``get_sigmas(steps)``; the references in
this file are transcriptions of k-diffusion 0.0.16 (PIE-Bench's pin; same code at the current head)
``k_diffusion/external.py`` lines 59-84 (``DiscreteSchedule.get_sigmas``, ``sigma_to_t``,
``t_to_sigma``) and 96-113 (``DiscreteEpsDDPMDenoiser``), ``k_diffusion/sampling.py`` lines 51-58 and
139-155 (``get_ancestral_step``, ``sample_euler_ancestral``), the CLI's ``CFGDenoiser`` and sampling
lines (``edit_cli.py`` 28-36, 98-119) and the LDM beta schedule (``make_beta_schedule`` /
``register_schedule``).
All on tiny models, a few steps each.
"""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest
import torch

import baselines.diffedit as diffedit_mod
from baselines.diffedit import DiffEdit, seeded
from baselines.instruct_pix2pix import InstructPix2Pix
from oig.types import EditRequest

SRC = "a red circle on a gray background"
TGT = "a red square on a gray background"
STEPS = 5  # int(5 * 0.8) = 4 masked steps, int(5 * 0.5) = 2 for the mask


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ip2p_unet(tmp_path_factory):
    from oig.testing import make_tiny_sd

    return str(make_tiny_sd(tmp_path_factory.mktemp("tiny_ip2p_protocol"), in_channels=8))


def diffedit(models, **kw):
    return DiffEdit(**{"steps": STEPS, "num_maps_per_mask": 2, **kw}).bind(models)


def reference_pipe(models):
    from diffusers import DDIMInverseScheduler, DDIMScheduler, StableDiffusionDiffEditPipeline

    return StableDiffusionDiffEditPipeline(
        vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer, unet=models.unet,
        scheduler=DDIMScheduler.from_config(models.scheduler.config),
        inverse_scheduler=DDIMInverseScheduler.from_config(models.scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


class Recorder:
    """Wraps a bound editor's core to record the inversion, each step's blended latent and the decoded latent."""

    def __init__(self, ed):
        self.inv, self.steps, self.z = None, [], None
        core = ed.core
        invert, sample, decode = core.invert, core.sample, core.decode_pil

        def rec_invert(*a, **k):
            self.inv = invert(*a, **k)
            return self.inv

        def rec_sample(*a, callback=None, **k):
            def cb(i, t, x_prev, x0):
                out = callback(i, t, x_prev, x0)
                self.steps.append((i, t, x_prev.clone(), out.clone()))
                return out
            return sample(*a, callback=cb, **k)

        def rec_decode(z):
            self.z = z.clone()
            return decode(z)

        core.invert, core.sample, core.decode_pil = rec_invert, rec_sample, rec_decode


# ------------------------------------------------------------------ DiffEdit: mask
def test_paper_mask_equals_pipeline_mask(tiny_models, toy_image):
    m = tiny_models
    ed = diffedit(m)
    pipe = reference_pipe(m)
    z0 = ed.core.encode_image(ed.core.prepare(toy_image[0]))
    fractions = []
    for seed in (0, 1, 2):
        req = EditRequest(toy_image[0], SRC, TGT, seed=seed)
        ref = pipe.generate_mask(image=z0, source_prompt=SRC, target_prompt=TGT, num_maps_per_mask=2,
                                 num_inference_steps=STEPS, generator=gen(seed), output_type="np")
        mine = ed.compute_mask(z0, req)
        assert mine.dtype == torch.int64 and mine.shape == (1, 8, 8)
        assert np.array_equal(mine.numpy(), ref)
        fractions.append(float(ref.mean()))
        # the CFG scale only scales |eps_t - eps_s|, which the clamp at 3 x mean removes: same mask without CFG
        ed.mask_guidance = 1.0
        assert torch.equal(ed.compute_mask(z0, req), mine)
        ed.mask_guidance = 7.5
    assert len(set(fractions)) > 1  # the seed sets the noise maps


def gen(seed):
    return torch.Generator(device="cpu").manual_seed(seed)


# ------------------------------------------------------------------ DiffEdit: paper blending
def test_paper_final_latent_is_z0_outside_the_mask(tiny_models, toy_image):
    ed = diffedit(tiny_models)
    rec = Recorder(ed)
    r = ed(EditRequest(toy_image[0], SRC, TGT, seed=1))
    f = tiny_models.vae_scale_factor
    mask = torch.from_numpy(r.extras["mask"][::f, ::f].copy())
    assert 0 < mask.float().mean() < 1
    z0, z = rec.inv.z0, rec.z
    out = (~mask).expand_as(z[0])[None]
    assert torch.equal(z[out], z0[out])  # bit-exact: the last paste is z0 itself
    assert not torch.allclose(z[~out], z0[~out])  # inside, the denoised target
    # the decoded output is the decode of that latent
    assert np.array_equal(np.asarray(r.image), np.asarray(ed.core.decode_pil(z)))


def test_paper_background_is_the_inverted_latent_of_the_same_step(tiny_models, toy_image):
    m = tiny_models
    ed = diffedit(m)
    rec = Recorder(ed)
    r = ed(EditRequest(toy_image[0], SRC, TGT, seed=1))
    f = m.vae_scale_factor
    out = torch.from_numpy(~r.extras["mask"][::f, ::f].copy()).expand(1, 4, 8, 8)
    ts = ed.core.timesteps(STEPS)
    n = ed.n_inpaint()
    start = STEPS - n
    traj = rec.inv.trajectory
    assert n == 4 and len(traj) == n + 1 and torch.equal(traj[-1], rec.inv.z0)

    # the pipeline's inversion (same prompt, CFG 7.5), indexed by its inverse timesteps: latent at timestep t
    pipe = reference_pipe(m)
    inv = pipe.invert(prompt=SRC, image=rec.inv.z0, num_inference_steps=STEPS, generator=gen(1)).latents[0]
    inv_ts = [int(t) for t in pipe.inverse_scheduler.timesteps[:n]]
    at = {t: inv[n - 1 - j] for j, t in enumerate(inv_ts)}  # the pipeline stores them noisiest first
    assert sorted(at) == sorted(ts[start:])
    for k in range(n):  # traj[k] is the inverted latent at the sampling timestep ts[start + k]
        torch.testing.assert_close(traj[k], at[ts[start + k]][None], rtol=1e-4, atol=1e-5)

    assert [s[0] for s in rec.steps] == list(range(start, STEPS))
    for i, t, x_prev, blended in rec.steps:
        assert t == ts[i]
        bg = traj[i - start + 1]  # the latent at ts[i + 1], z0 after the last step
        assert torch.equal(blended[out], bg[out])
        assert torch.equal(blended[~out], x_prev[~out])
        if i + 1 < STEPS:
            torch.testing.assert_close(bg, at[ts[i + 1]][None], rtol=1e-4, atol=1e-5)
    assert torch.equal(rec.steps[-1][3], rec.z)


def test_diffusers_mode_pastes_one_step_late(tiny_models, toy_image):
    """What the paper mode fixes, pinned on the pipeline itself: after step i it pastes image_latents[i] (the
    latent at t_i, not t_{i+1}) and the last paste is the latent at t = 1, not z0."""
    m = tiny_models
    pipe = reference_pipe(m)
    ed = diffedit(m)
    z0 = ed.core.encode_image(ed.core.prepare(toy_image[0]))
    mask = pipe.generate_mask(image=z0, source_prompt=SRC, target_prompt=TGT, num_maps_per_mask=2,
                              num_inference_steps=STEPS, generator=gen(1), output_type="np")
    inv = pipe.invert(prompt=SRC, image=z0, num_inference_steps=STEPS, generator=gen(1)).latents
    seen = []
    z = pipe(prompt=TGT, mask_image=mask, image_latents=inv, num_inference_steps=STEPS, negative_prompt=SRC,
             generator=gen(1), output_type="latent", callback=lambda i, t, x: seen.append(x.clone())).images
    out = torch.from_numpy(mask == 0).expand(1, 4, 8, 8)
    assert mask.any() and out.any()
    for i, x in enumerate(seen):
        assert torch.equal(x[out], inv[0, i][None][out])  # inverted latent of the step's *starting* timestep
    assert torch.equal(z[out], inv[0, -1][None][out])  # the latent at t = 1 ...
    assert not torch.allclose(z[out], z0[out])  # ... which is not z0


# ------------------------------------------------------------------ DiffEdit: options
def test_unconditional_inversion_option(tiny_models, toy_image):
    m = tiny_models
    cond = diffedit(m)
    unc = diffedit(m, invert_prompt="empty", invert_guidance=1)
    z0 = cond.core.encode_image(cond.core.prepare(toy_image[0]))
    req = EditRequest(toy_image[0], SRC, TGT, seed=0)
    a, b = cond.invert_source(z0, req), unc.invert_source(z0, req)
    assert not torch.allclose(a.trajectory[0], b.trajectory[0])
    ref = unc.core.invert(z0, unc.core.encode_text([""]), STEPS, stop=4, keep=True)  # plain DDIM, "" prompt
    assert len(b.trajectory) == len(ref.trajectory) == 5
    for x, y in zip(b.trajectory, ref.trajectory):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match="invert_prompt=empty .*set invert_guidance: 1"):
        DiffEdit(invert_prompt="empty")
    with pytest.raises(ValueError, match="invert_prompt must be one of"):
        DiffEdit(invert_prompt="target")
    with pytest.raises(ValueError, match="mode must be one of"):
        DiffEdit(mode="official")
    with pytest.raises(ValueError, match="generate_mask fails for guidance_scale <= 1"):
        DiffEdit(mode="diffusers", mask_guidance=1.0)


def test_empty_negative_prompt_option(tiny_models, toy_image):
    """``negative`` is the denoising's negative prompt: the source prompt by default, "" with ``empty``."""
    req = EditRequest(toy_image[0], SRC, TGT, seed=0)
    images = []
    for negative, want in (("source", SRC), ("empty", "")):
        ed = diffedit(tiny_models, negative=negative)
        calls, enc = [], ed.core.encode_text
        ed.core.encode_text = lambda p, enc=enc, calls=calls: (calls.append(list(p)), enc(p))[1]
        images.append(np.asarray(ed(req).image))
        # mask: source, target, ""; inversion: source, ""; denoising: target, then the negative prompt
        assert calls == [[SRC], [TGT], [""], [SRC], [""], [TGT], [want]], negative
    assert not np.array_equal(*images)


def test_diffusers_mode_options_equal_the_pipeline(tiny_models, toy_image):
    m = tiny_models
    ed = diffedit(m, mode="diffusers", invert_prompt="empty", invert_guidance=1, negative="empty")
    r = ed(EditRequest(toy_image[0], SRC, TGT, seed=3))
    pipe = reference_pipe(m)
    z0 = ed.core.encode_image(r.source)
    mask = pipe.generate_mask(image=z0, source_prompt=SRC, target_prompt=TGT, num_maps_per_mask=2,
                              num_inference_steps=STEPS, generator=gen(3))
    inv = pipe.invert(prompt="", image=z0, num_inference_steps=STEPS, guidance_scale=1, generator=gen(3)).latents
    ref = pipe(prompt=TGT, mask_image=mask, image_latents=inv, num_inference_steps=STEPS, negative_prompt="",
               generator=gen(3)).images[0]
    assert np.array_equal(np.asarray(r.image), np.asarray(ref))


def test_paper_mode_needs_no_deprecated_pipeline(tiny_models, toy_image, monkeypatch):
    def missing(*a, **k):
        raise ImportError("no StableDiffusionDiffEditPipeline")

    monkeypatch.setattr(diffedit_mod, "diffusers_pipeline", missing)
    with pytest.raises(ImportError, match="no StableDiffusionDiffEditPipeline"):
        DiffEdit(mode="diffusers")
    ed = diffedit(tiny_models)
    assert ed.mode == "paper" and ed.pipe is None
    r = ed(EditRequest(toy_image[0], SRC, TGT, seed=0))
    assert r.image.size == r.source.size


def test_paper_mode_is_the_default_and_differs_from_diffusers(tiny_models, toy_image):
    assert DiffEdit().mode == "paper"
    req = EditRequest(toy_image[0], SRC, TGT, seed=1)
    p, d = diffedit(tiny_models)(req), diffedit(tiny_models, mode="diffusers")(req)
    assert np.array_equal(p.extras["mask"], d.extras["mask"])  # same mask ...
    assert not np.array_equal(np.asarray(p.image), np.asarray(d.image))  # ... different blending
    assert set(p.timings) >= {"encode", "mask", "inversion", "sampling", "total"}


# ------------------------------------------------------------------ scheduler guard
def _ddim_flags(sched):
    params = inspect.signature(type(sched).__init__).parameters
    return {k: sched.config[k] for k in ("clip_sample", "set_alpha_to_one") if k in params}


@pytest.mark.parametrize("mode", ["paper", "diffusers"])
def test_diffedit_schedulers_never_clip_nor_end_on_alpha_one(tiny_models, mode):
    from diffusers import DDIMScheduler

    bad = DDIMScheduler.from_config({**tiny_models.scheduler.config, "clip_sample": True, "set_alpha_to_one": True})
    for models in (tiny_models, dataclasses.replace(tiny_models, scheduler=bad)):
        ed = DiffEdit(steps=STEPS, mode=mode).bind(models)
        scheds = [ed.ddim_scheduler] + ([ed.pipe.scheduler, ed.pipe.inverse_scheduler] if mode == "diffusers" else [])
        for s in scheds:
            assert _ddim_flags(s) == {"clip_sample": False, "set_alpha_to_one": False}, type(s).__name__
        if mode == "diffusers":
            assert ed.pipe.inverse_scheduler.initial_alpha_cumprod == models.scheduler.alphas_cumprod[0]


@pytest.mark.parametrize("scheduler", ["ddim", "euler_ancestral"])
def test_ip2p_schedulers_never_clip_nor_end_on_alpha_one(tiny_models, ip2p_unet, scheduler):
    from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler

    ed = InstructPix2Pix(steps=STEPS, unet=ip2p_unet, scheduler=scheduler).bind(tiny_models)
    ip = ed.models
    bad = DDIMScheduler.from_config({**ip.scheduler.config, "clip_sample": True, "set_alpha_to_one": True})
    ed2 = InstructPix2Pix(steps=STEPS, unet=None, scheduler=scheduler).bind(dataclasses.replace(ip, scheduler=bad))
    for e in (ed, ed2):
        s = e.pipe.scheduler
        if scheduler == "ddim":
            assert type(s) is DDIMScheduler
            assert _ddim_flags(s) == {"clip_sample": False, "set_alpha_to_one": False}
        else:  # neither setting exists in Euler ancestral (no x0 clipping, the grid ends on sigma = 0)
            assert type(s) is EulerAncestralDiscreteScheduler and _ddim_flags(s) == {}


# ------------------------------------------------------------------ InstructPix2Pix: the official sampler
def ldm_alphas_cumprod(linear_start=0.00085, linear_end=0.012, n=1000):
    """``ldm/modules/diffusionmodules/util.py: make_beta_schedule("linear")`` + ``ddpm.register_schedule``:
    betas in float64, cumprod in float64, stored as float32."""
    betas = torch.linspace(linear_start**0.5, linear_end**0.5, n, dtype=torch.float64) ** 2
    return torch.tensor(np.cumprod((1.0 - betas).numpy()), dtype=torch.float32)


class KDiscrete:
    """Transcription of k-diffusion's ``DiscreteSchedule`` / ``DiscreteEpsDDPMDenoiser`` (CompVisDenoiser)."""

    def __init__(self, alphas_cumprod):
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.log_sigmas = self.sigmas.log()

    def t_to_sigma(self, t):
        t = t.float()
        lo, hi, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp()

    def sigma_to_t(self, sigma):
        ls = sigma.log()
        dists = ls - self.log_sigmas[:, None]
        lo = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        hi = lo + 1
        low, high = self.log_sigmas[lo], self.log_sigmas[hi]
        w = ((low - ls) / (low - high)).clamp(0, 1)
        return ((1 - w) * lo + w * hi).view(sigma.shape)

    def get_sigmas(self, n):
        t = torch.linspace(len(self.sigmas) - 1, 0, n)
        return torch.cat([self.t_to_sigma(t), torch.zeros(1)])


@pytest.mark.parametrize("steps", [50, 100])
def test_euler_ancestral_grid_is_kdiffusion_get_sigmas(ip2p_unet, tiny_models, steps):
    from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler

    ref = KDiscrete(ldm_alphas_cumprod())
    want = ref.get_sigmas(steps)
    # (a) the shipped toy InstructPix2Pix (its scheduler config is the toy SD's DDIM one: timestep_spacing "leading")
    from oig.models import load_sd

    toy = load_sd("toy", device="cpu", dtype="fp32")
    assert toy.scheduler.config.timestep_spacing == "leading"
    # (b) SD v1.4's and timbrooks/instruct-pix2pix's scheduler_config.json values, read into a DDIMScheduler as
    # load_sd does, under an 8-channel U-Net
    sd_cfg = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
              "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
              "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False}
    ip2p_cfg = {"_class_name": "EulerAncestralDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
                "steps_offset": 1, "trained_betas": None}
    tiny_ip = load_sd(tiny_models.model_id, device="cpu", dtype="fp32", unet=ip2p_unet)
    binds = [(toy, "toy"), (dataclasses.replace(tiny_ip, scheduler=DDIMScheduler.from_config(sd_cfg)), "unet=None"),
             (dataclasses.replace(tiny_ip, scheduler=DDIMScheduler.from_config(ip2p_cfg)), "unet=None")]
    for models, how in binds:
        ed = (InstructPix2Pix(steps=steps, unet=None) if how == "unet=None" else InstructPix2Pix(steps=steps))
        ed.bind(models)
        s = ed.pipe.scheduler
        assert type(s) is EulerAncestralDiscreteScheduler and s.config.timestep_spacing == "linspace"
        s.set_timesteps(steps)
        assert len(s.sigmas) == steps + 1 and s.sigmas[-1] == 0
        # diffusers interpolates sigma linearly between integer timesteps, k-diffusion log sigma: <= 1e-4 apart
        torch.testing.assert_close(s.sigmas, want, rtol=1e-4, atol=0)
        assert float(s.init_noise_sigma) == pytest.approx(float(want[0]), rel=1e-6)  # z = randn * sigmas[0]
        # the U-Net sees k-diffusion's sigma_to_t(sigma) = the linspace timesteps
        torch.testing.assert_close(s.timesteps, ref.sigma_to_t(want[:-1]), rtol=0, atol=2e-3)
    # without the linspace override the model's DDIM config would give the "leading" grid (not k-diffusion's)
    lead = EulerAncestralDiscreteScheduler.from_config(toy.scheduler.config)
    lead.set_timesteps(steps)
    assert int(lead.timesteps[0]) == 1000 - 1000 // steps + 1 and lead.sigmas[0] < want[0]


def official_sample(unet, text, null, img_latent, alphas_cumprod, steps, g, cfg_text=7.5, cfg_image=1.5):
    """``edit_cli.py`` lines 98-119 with k-diffusion's ``sample_euler_ancestral`` (eta 1, s_noise 1), noises drawn
    from ``g`` in the order diffusers draws them (initial latent, then one per step)."""
    k = KDiscrete(alphas_cumprod)
    sigmas = k.get_sigmas(steps)
    c_cross = torch.cat([text, null, null])
    c_concat = torch.cat([img_latent, img_latent, torch.zeros_like(img_latent)])

    def denoiser(z, sigma):  # CFGDenoiser(CompVisDenoiser(model))
        c_in = 1 / (sigma**2 + 1) ** 0.5
        x = torch.cat([z] * 3)
        eps = unet(torch.cat([x * c_in, c_concat], dim=1), k.sigma_to_t(sigma), encoder_hidden_states=c_cross).sample
        out_cond, out_img, out_uncond = (x + eps * -sigma).chunk(3)
        return out_uncond + cfg_text * (out_cond - out_img) + cfg_image * (out_img - out_uncond)

    z = torch.randn(img_latent.shape, generator=g) * sigmas[0]
    for i in range(len(sigmas) - 1):
        denoised = denoiser(z, sigmas[i])
        s_from, s_to = sigmas[i], sigmas[i + 1]
        s_up = min(s_to, (s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** 0.5)
        s_down = (s_to**2 - s_up**2) ** 0.5
        d = (z - denoised) / s_from
        z = z + d * (s_down - s_from)
        noise = torch.randn(z.shape, generator=g)
        if s_to > 0:
            z = z + noise * s_up
    return z


@pytest.mark.parametrize("steps", [9, 12])
def test_default_sampler_reproduces_the_official_loop(steps, toy_image):
    from oig.models import load_sd

    base = load_sd("toy", device="cpu", dtype="fp32")
    ed = InstructPix2Pix(steps=steps).bind(base)  # the defaults: toy_ip2p U-Net, euler_ancestral
    assert ed.scheduler == "euler_ancestral"
    src = ed.core.prepare(toy_image[0])
    instr = "turn the circle into a square"
    got = ed.pipe(prompt=instr, image=src, num_inference_steps=steps, generator=seeded(4),
                  output_type="latent").images
    ip = ed.models
    with torch.no_grad():
        img_latent = ip.vae.encode(ed.pipe.image_processor.preprocess(src)).latent_dist.mode()
        text, null = ed.core.encode_text([instr]), ed.core.encode_text([""])
        want = official_sample(ip.unet, text, null, img_latent, ldm_alphas_cumprod(), steps, seeded(4))
    assert got.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    # the edit is that latent decoded; the seed sets every draw
    r = ed(EditRequest(toy_image[0], SRC, TGT, instruction=instr, seed=4))
    with torch.no_grad():
        dec = ed.pipe.image_processor.postprocess(ip.vae.decode(got / ip.scaling_factor).sample, output_type="pil")[0]
    assert np.array_equal(np.asarray(r.image), np.asarray(dec))


def test_ip2p_noise_comes_from_the_seeded_generator(ip2p_unet, tiny_models, toy_image):
    ed = InstructPix2Pix(steps=STEPS, unet=ip2p_unet).bind(tiny_models)
    assert (InstructPix2Pix().scheduler, InstructPix2Pix().steps) == ("euler_ancestral", 100)
    src = ed.core.prepare(toy_image[0])
    req = EditRequest(toy_image[0], SRC, TGT, instruction="make it blue", seed=5)
    from oig.diffusion import Timer

    torch.manual_seed(0)
    a = ed.edit(req, src, Timer()).image
    torch.manual_seed(123)
    torch.randn(10)
    b = ed.edit(req, src, Timer()).image  # the global RNG state does not matter
    c = ed.edit(EditRequest(toy_image[0], SRC, TGT, instruction="make it blue", seed=6), src, Timer()).image
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
