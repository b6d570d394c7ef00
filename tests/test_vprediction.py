"""v-prediction models (SD 2.x at 768): the U-Net output is converted to ε in one place at load time.

The reference is diffusers' DDIM scheduler run on the *unconverted* U-Net of the same tiny random
model, configured with ``prediction_type="v_prediction"`` (and ``epsilon`` for the ε model).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from oig.diffusion import Diffusion, EpsilonOutput, epsilon_from_v, outputs_epsilon
from oig.models import load_sd

STEPS = 5


def _with_scheduler(src: str, dst: Path, **changes) -> str:
    shutil.copytree(src, dst)
    p = dst / "scheduler" / "scheduler_config.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), **changes}))
    return str(dst)


@pytest.fixture(scope="module")
def v_sd_path(tiny_sd_path, tmp_path_factory):
    return _with_scheduler(tiny_sd_path, tmp_path_factory.mktemp("v") / "sd", prediction_type="v_prediction")


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def case(request, tiny_sd_path, v_sd_path):
    """(loaded models, the raw U-Net from the folder, the folder's scheduler config)."""
    from diffusers import UNet2DConditionModel

    path = tiny_sd_path if request.param == "epsilon" else v_sd_path
    raw = UNet2DConditionModel.from_pretrained(path, subfolder="unet").eval().requires_grad_(False)
    config = json.loads((Path(path) / "scheduler" / "scheduler_config.json").read_text())
    return load_sd(path, device="cpu", dtype="fp32"), raw, config


def _latent(seed=0):
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_load_converts_v_and_records_the_declared_type(tiny_models, v_sd_path):
    m = load_sd(v_sd_path, device="cpu", dtype="fp32")
    assert m.prediction_type == "v_prediction" and outputs_epsilon(m.unet)
    assert m.scheduler.config.prediction_type == "epsilon"  # what diffusers pipelines built from it must read
    assert tiny_models.prediction_type == "epsilon" and not outputs_epsilon(tiny_models.unet)
    assert "|pred=v_prediction" in m.fingerprint() and "|pred=" not in tiny_models.fingerprint()  # cache keys differ


def test_epsilon_from_v_identity():
    x0, eps, a = _latent(1), _latent(2), 0.3
    xt = a**0.5 * x0 + (1 - a) ** 0.5 * eps
    v = a**0.5 * eps - (1 - a) ** 0.5 * x0
    assert torch.allclose(epsilon_from_v(v, xt, a), eps, atol=1e-6)


def test_ddim_step_matches_diffusers(case):
    """One core DDIM step (ε from the converted U-Net) = ``DDIMScheduler.step(eta=0)`` on the raw output,
    at every timestep of the grid (the last one ends on abar(0), set_alpha_to_one=False)."""
    from diffusers import DDIMScheduler

    models, raw, config = case
    core = Diffusion(models)
    sched = DDIMScheduler.from_config(config)
    sched.set_timesteps(STEPS)
    cond = core.encode_text(["a red circle on a gray background"])
    d = core.step_size(STEPS)
    for k, t in enumerate(core.timesteps(STEPS)):
        x = _latent(k)
        ours, _ = core.ddim_step(x, core.eps(x, t, cond), t, t - d)
        ref = sched.step(raw(x, t, encoder_hidden_states=cond).sample, t, x, eta=0.0).prev_sample
        assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5), (config["prediction_type"], t)


def test_cfg_sampling_loop_matches_diffusers(case):
    """``core.sample`` with CFG = diffusers' DDIM loop with CFG on the raw outputs (CFG commutes with the
    conversion: it is affine in the output at a fixed input)."""
    from diffusers import DDIMScheduler

    models, raw, config = case
    core = Diffusion(models)
    cond, neg = core.encode_text(["a red circle"]), core.encode_text([""])
    xT = _latent(3)
    ours = core.sample(xT, cond, neg, guidance=4.0, steps=STEPS)
    sched = DDIMScheduler.from_config(config)
    sched.set_timesteps(STEPS)
    x = xT
    for t in sched.timesteps:
        o_neg, o_cond = raw(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([neg, cond])).sample.chunk(2)
        x = sched.step(o_neg + 4.0 * (o_cond - o_neg), t, x, eta=0.0).prev_sample
    assert torch.allclose(ours, x, atol=1e-5, rtol=1e-5)


def test_standard_inversion_is_ddim_inverse_scheduler_on_the_epsilon_model(case):
    """The standard convention is diffusers' DDIMInverseScheduler run on ε: for a v model, on its converted
    output (the ε-equivalent model; see the next test for why not on v)."""
    from diffusers import DDIMInverseScheduler

    models, _, config = case
    core = Diffusion(models)
    cond = core.encode_text(["a red circle"])
    z0 = _latent(4)
    inv = core.invert(z0, cond, STEPS)
    sched = DDIMInverseScheduler.from_config({**config, "prediction_type": "epsilon"})
    sched.set_timesteps(STEPS)
    x = z0
    for t in sched.timesteps:
        x = sched.step(models.unet(x, t, encoder_hidden_states=cond).sample, t, x).prev_sample
    assert torch.allclose(inv.xT, x, atol=1e-5, rtol=1e-5)


def _constant_v(models, raw):
    """Copies of the v model (converted and raw) whose U-Net outputs the constant v = 0.1."""
    unet, raw = copy.deepcopy(models.unet), copy.deepcopy(raw)
    with torch.no_grad():
        for u in (unet, raw):
            u.conv_out.weight.zero_()
            u.conv_out.bias.fill_(0.1)
    return dataclasses.replace(models, unet=unet), raw


def test_inversion_round_trip_of_a_v_model(v_sd_path):
    """20-step inversion then sampling of a constant-v model returns the latent: measured max|Δz|/std 0.028
    (bound 0.04; 0.008 at 50 steps); diffusers' DDIMInverseScheduler + DDIMScheduler with v_prediction, which
    converts the inversion's v with the level the latent is at, measured 0.35 (0.15 at 50 steps; asserted worse)."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler, UNet2DConditionModel

    base = load_sd(v_sd_path, device="cpu", dtype="fp32")
    raw = UNet2DConditionModel.from_pretrained(v_sd_path, subfolder="unet").eval().requires_grad_(False)
    models, raw = _constant_v(base, raw)
    core = Diffusion(models)
    cond = core.encode_text(["a red circle"])
    z0 = _latent(5)
    err = float((core.sample(core.invert(z0, cond, 20).xT, cond, steps=20) - z0).abs().max() / z0.std())
    assert err < 0.04
    config = {**dict(base.scheduler.config), "prediction_type": "v_prediction"}
    inv, fwd = DDIMInverseScheduler.from_config(config), DDIMScheduler.from_config(config)
    inv.set_timesteps(20)
    fwd.set_timesteps(20)
    x = z0
    for t in inv.timesteps:
        x = inv.step(raw(x, t, encoder_hidden_states=cond).sample, t, x).prev_sample
    for t in fwd.timesteps:
        x = fwd.step(raw(x, t, encoder_hidden_states=cond).sample, t, x, eta=0.0).prev_sample
    assert float((x - z0).abs().max() / z0.std()) > 5 * err


def test_p2pzero_inversion_converts_with_the_unet_timestep(v_sd_path):
    """The p2pzero convention on a v model: a transcription with the raw v converted at abar(t), then the
    convention's abar(t - 1) -> abar(t + d - 1) move."""
    from diffusers import UNet2DConditionModel

    models = load_sd(v_sd_path, device="cpu", dtype="fp32")
    raw = UNet2DConditionModel.from_pretrained(v_sd_path, subfolder="unet").eval().requires_grad_(False)
    core = Diffusion(models)
    cond = core.encode_text(["a red circle"])
    z0 = _latent(6)
    ours = core.invert(z0, cond, STEPS, convention="p2pzero").xT
    a = models.scheduler.alphas_cumprod.double()
    d, x = core.step_size(STEPS), z0.double()
    for t in list(reversed(core.timesteps(STEPS)))[1:-1]:
        v = raw(x.float(), t, encoder_hidden_states=cond).sample.double()
        eps = a[t] ** 0.5 * v + (1 - a[t]) ** 0.5 * x
        a_from, a_to = a[t - 1], a[t + d - 1]
        x = a_to**0.5 * (x - (1 - a_from) ** 0.5 * eps) / a_from**0.5 + (1 - a_to) ** 0.5 * eps
    assert torch.allclose(ours, x.float(), atol=1e-5, rtol=1e-5)


def test_fractional_timesteps_of_euler_schedulers(v_sd_path):
    """Euler on the ``linspace`` grid calls the U-Net at fractional timesteps: the converted output with an
    ``epsilon`` Euler scheduler = the raw output with a ``v_prediction`` one."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    models = load_sd(v_sd_path, device="cpu", dtype="fp32")
    raw = UNet2DConditionModel.from_pretrained(v_sd_path, subfolder="unet").eval().requires_grad_(False)
    cond = Diffusion(models).encode_text(["a red circle"])
    out = {}
    for pred, unet in (("v_prediction", raw), ("epsilon", models.unet)):
        s = EulerDiscreteScheduler.from_config({**dict(models.scheduler.config), "prediction_type": pred},
                                               timestep_spacing="linspace")
        s.set_timesteps(6)
        assert any(float(t) != round(float(t)) for t in s.timesteps)
        x = _latent(7) * s.init_noise_sigma
        for t in s.timesteps:
            x = s.step(unet(s.scale_model_input(x, t), t, encoder_hidden_states=cond).sample, t, x).prev_sample
        out[pred] = x
    assert torch.allclose(out["v_prediction"], out["epsilon"], atol=1e-4, rtol=1e-4)


def test_hook_handles_batches_tuples_and_extra_input_channels():
    hook = EpsilonOutput(torch.linspace(0.99, 0.01, 1000))
    x = torch.randn(2, 8, 4, 4)  # an InstructPix2Pix input: x_t, then the image latent
    v = torch.randn(2, 4, 4, 4)
    a = hook.abar(torch.tensor([10, 500]), 2).float().view(2, 1, 1, 1)
    want = epsilon_from_v(v, x[:, :4], a)
    (got,) = hook(None, (x, torch.tensor([10, 500])), {}, (v,))
    assert torch.allclose(got, want, atol=1e-6)
    with pytest.raises(ValueError, match="3 timesteps for a batch of 2"):
        hook(None, (x, torch.tensor([1, 2, 3])), {}, (v,))


def test_other_prediction_types_are_refused_at_load(tiny_sd_path, tmp_path):
    path = _with_scheduler(tiny_sd_path, tmp_path / "sd", prediction_type="sample")
    with pytest.raises(ValueError, match=r"prediction_type='sample'.*epsilon and v_prediction"):
        load_sd(path, device="cpu", dtype="fp32")


def test_core_refuses_an_unconverted_v_unet(v_sd_path):
    from diffusers import DDIMScheduler, UNet2DConditionModel

    models = load_sd(v_sd_path, device="cpu", dtype="fp32")
    raw = UNet2DConditionModel.from_pretrained(v_sd_path, subfolder="unet")
    v_sched = DDIMScheduler.from_config({**dict(models.scheduler.config), "prediction_type": "v_prediction"})
    with pytest.raises(ValueError, match="load the model with oig.models.load_sd"):
        Diffusion(dataclasses.replace(models, unet=raw, scheduler=v_sched))


def test_uneven_timestep_grid_is_refused(tiny_sd_path, tmp_path):
    models = load_sd(_with_scheduler(tiny_sd_path, tmp_path / "sd", timestep_spacing="linspace"), device="cpu",
                     dtype="fp32")
    with pytest.raises(ValueError, match='"timestep_spacing": "leading"'):
        Diffusion(models).timesteps(50)
    trailing = load_sd(_with_scheduler(tiny_sd_path, tmp_path / "sd2", timestep_spacing="trailing"), device="cpu",
                       dtype="fp32")
    assert Diffusion(trailing).timesteps(50)[:2] == [999, 979]


@pytest.mark.parametrize("method,kw", [
    ("oig", dict(lambda1=0.0, lambda2=1.0)),        # the differentiated CFG pair calls the U-Net itself
    ("oig_plus", dict(lambda1=0.0, lambda2=1.0)),   # so does the cycle chain
    ("diffedit", dict(mode="paper")),               # the mask's U-Net call
    ("diffedit", dict(mode="diffusers")),           # diffusers' DiffEdit pipeline + DDIM(-inverse) schedulers
    ("pix2pix_zero", dict()),
])
def test_editors_calling_the_unet_themselves_run_on_a_v_model(v_sd_path, toy_image, method, kw):
    from oig.registry import get_editor
    from oig.types import EditRequest

    models = load_sd(v_sd_path, device="cpu", dtype="fp32")
    ed = get_editor(method)(steps=3, **kw).bind(models)
    res = ed(EditRequest(image=toy_image[0], source_prompt="a red circle on a gray background",
                         target_prompt="a red square on a gray background", seed=0))
    assert res.image.size == (16, 16)
