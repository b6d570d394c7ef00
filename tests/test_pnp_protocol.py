"""Plug-and-Play against its official code, on a tiny U-Net with Stable Diffusion's block layout.

The references are transcriptions (written for this test) of

* pnp-diffusers' injection (``pnp_utils.py:35-153``: ``register_attention_control_efficient``'s
  ``sa_forward`` on ``up_blocks[1].attentions[1:]`` + ``up_blocks[2:]`` and
  ``register_conv_control_efficient``'s ``conv_forward`` on ``up_blocks[1].resnets[1]``, active
  while the registered timestep is in ``scheduler.timesteps[:int(n · pnp_*_t)]``), installed by
  replacing the modules' ``forward`` on a copy of the U-Net as the official code does;
* its sampling step (``pnp.py:94-113``: batch ``[source, x, x]`` with texts ``["", negative,
  target]``, CFG on the last two rows, ``DDIMScheduler.step``);
* PIE-Bench's runner ``cure-lab/PnPInversion/run_editing_pnp.py``: ``ddim_inversion`` (:93-116),
  ``ddim_sample`` (:119-141), ``extract_latents`` (:144-156, the reconstruction list reversed) and
  ``run_pnp`` / ``sample_loop`` (:377-400: start from ``noisy_latent[-1]``, step ``i`` reads
  ``noisy_latent[-1 - i]``), for its rows ``ddim+pnp`` (the reconstruction list, :423-427) and
  ``directinversion+pnp`` (the inversion list, :449-453), both inverting with the source prompt.
"""

import copy
import dataclasses

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from PIL import Image

from baselines.pnp import PnP, PnPControl, pnp_feature_layer
from oig.diffusion import Diffusion
from oig.features import FeatureHooks
from oig.toy import world
from oig.types import EditRequest

SRC = "a red circle on a gray background"
TGT = "a red square on a gray background"
NEG = "ugly, blurry, black, low res, unrealistic"
# SD 1.x's block layout (3 cross-attention down blocks + a plain one, mirrored up blocks, two
# layers per block, so up_blocks[1].resnets[1] and pnp-diffusers' res_dict exist), tiny channels
SD_LAYOUT = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 16, 16, 16), layers_per_block=2,
    cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
# Everything runs in float64, so the only differences left are rounding (the official einsum
# softmax vs SDPA; measured below 1e-14): any wrong row, layer or step shows at 1e-2 and more.
TOL = 1e-10


@pytest.fixture(scope="module")
def sd(tiny_models):
    """The tiny text encoder / VAE with an SD-shaped U-Net (8x8 latents: levels 8, 4, 2, 1), float64."""
    torch.manual_seed(1)
    unet = UNet2DConditionModel(**SD_LAYOUT).double().eval().requires_grad_(False)
    return dataclasses.replace(tiny_models, unet=unet, vae=copy.deepcopy(tiny_models.vae).double(),
                               text_encoder=copy.deepcopy(tiny_models.text_encoder).double(), dtype=torch.float64,
                               model_id=tiny_models.model_id + "+sd_layout")


@pytest.fixture(scope="module")
def img():
    return Image.fromarray(world.benchmark(1)[0].source_image)


def _max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# ------------------------------------------------------------------ the transcribed references
class OfficialPnPUNet:
    """A copy of ``unet`` with pnp-diffusers' ``sa_forward`` / ``conv_forward`` (transcribed)."""

    RES_DICT = {1: [1, 2], 2: [0, 1, 2], 3: [0, 1, 2]}  # pnp_utils.py:90, decoder blocks 4-11

    def __init__(self, unet, qk_timesteps, conv_timesteps):
        self.unet = copy.deepcopy(unet)
        self.t = None
        for b, atts in self.RES_DICT.items():
            for a in atts:
                mod = self.unet.up_blocks[b].attentions[a].transformer_blocks[0].attn1
                mod.forward = self._sa_forward(mod, [int(t) for t in qk_timesteps])
        res = self.unet.up_blocks[1].resnets[1]
        res.forward = self._conv_forward(res, [int(t) for t in conv_timesteps])

    def _sa_forward(self, mod, schedule):
        def forward(x, encoder_hidden_states=None, attention_mask=None, **kwargs):
            assert attention_mask is None
            is_cross = encoder_hidden_states is not None
            ctx = encoder_hidden_states if is_cross else x
            q, k = mod.to_q(x), mod.to_k(ctx)
            if not is_cross and (self.t in schedule or self.t == 1000):
                n = q.shape[0] // 3
                q[n:2 * n] = q[:n]  # the unconditional target row gets the source's q and k ...
                k[n:2 * n] = k[:n]
                q[2 * n:] = q[:n]  # ... and so does the conditional one
                k[2 * n:] = k[:n]
            q, k = mod.head_to_batch_dim(q), mod.head_to_batch_dim(k)
            v = mod.head_to_batch_dim(mod.to_v(ctx))
            sim = torch.einsum("b i d, b j d -> b i j", q, k) * mod.scale
            out = torch.einsum("b i j, b j d -> b i d", sim.softmax(dim=-1), v)
            return mod.to_out[0](mod.batch_to_head_dim(out))

        return forward

    def _conv_forward(self, mod, schedule):
        def forward(input_tensor, temb, *args, **kwargs):
            h = mod.nonlinearity(mod.norm1(input_tensor))
            if mod.upsample is not None:
                input_tensor, h = mod.upsample(input_tensor), mod.upsample(h)
            elif mod.downsample is not None:
                input_tensor, h = mod.downsample(input_tensor), mod.downsample(h)
            h = mod.conv1(h)
            temb = mod.time_emb_proj(mod.nonlinearity(temb))[:, :, None, None]
            assert mod.time_embedding_norm == "default"
            h = mod.norm2(h + temb)
            h = mod.conv2(mod.dropout(mod.nonlinearity(h)))
            if self.t in schedule or self.t == 1000:
                n = h.shape[0] // 3
                h[n:2 * n] = h[:n]
                h[2 * n:] = h[:n]
            if mod.conv_shortcut is not None:
                input_tensor = mod.conv_shortcut(input_tensor)
            return (input_tensor + h) / mod.output_scale_factor

        return forward

    def __call__(self, x, t, emb):
        self.t = int(t)  # register_time
        return self.unet(x, t, encoder_hidden_states=emb).sample


def official_scheduler(models, steps):
    """The runners' ``DDIMScheduler`` (checkpoint config), its alphas in float64 as the whole test is."""
    s = DDIMScheduler.from_config(models.scheduler.config)
    s.set_timesteps(steps)
    s.alphas_cumprod = s.alphas_cumprod.double()
    s.final_alpha_cumprod = s.final_alpha_cumprod.double()
    return s


def official_injection_timesteps(sched, steps, pnp_f_t, pnp_attn_t):
    """``init_pnp``: the first ``int(n · f)`` timesteps (pnp.py:115-124, run_editing_pnp.py:371-388)."""
    return sched.timesteps[:int(steps * pnp_attn_t)], sched.timesteps[:int(steps * pnp_f_t)]


@torch.no_grad()
def pb_ddim_inversion(unet, sched, cond, latent):
    """run_editing_pnp.py:93-116: ``[z0, x_{t_1}, ..., x_{t_n}]`` over the reversed timesteps."""
    latents = [latent]
    ts = sched.timesteps.flip(0)
    for i, t in enumerate(ts):
        a_t = sched.alphas_cumprod[t]
        a_prev = sched.alphas_cumprod[ts[i - 1]] if i > 0 else sched.final_alpha_cumprod
        eps = unet(latent, t, encoder_hidden_states=cond).sample
        x0 = (latent - (1 - a_prev) ** 0.5 * eps) / a_prev**0.5
        latent = a_t**0.5 * x0 + (1 - a_t) ** 0.5 * eps
        latents.append(latent)
    return latents


@torch.no_grad()
def pb_ddim_sample(unet, sched, cond, x):
    """run_editing_pnp.py:119-141: the latent *after* every step (the start latent is not kept)."""
    out, ts = [], sched.timesteps
    for i, t in enumerate(ts):
        a_t = sched.alphas_cumprod[t]
        a_prev = sched.alphas_cumprod[ts[i + 1]] if i < len(ts) - 1 else sched.final_alpha_cumprod
        eps = unet(x, t, encoder_hidden_states=cond).sample
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
        out.append(x)
    return out


@torch.no_grad()
def pb_run_pnp(ref, sched, noisy_latent, emb, guidance):
    """run_editing_pnp.py:377-400 (= pnp-diffusers pnp.py:94-130 with the latents in memory)."""
    x = noisy_latent[-1]
    for i, t in enumerate(sched.timesteps):
        out = ref(torch.cat([noisy_latent[-1 - i], x, x]), t, emb)
        _, e_neg, e_cond = out.chunk(3)
        x = sched.step(e_neg + guidance * (e_cond - e_neg), t, x).prev_sample
    return x


# ------------------------------------------------------------------ one denoising step
def test_sd_layout_has_the_reference_layers(sd):
    assert pnp_feature_layer(sd.unet) == "up_blocks.1.resnets.1"
    assert len(sd.unet.up_blocks) == 4 and [len(b.attentions) for b in sd.unet.up_blocks[1:]] == [3, 3, 3]


def test_one_step_equals_pnp_diffusers_injection(sd):
    """Each step of a 4-step schedule (features in 2, q/k in 1) equals the transcribed official
    U-Net call on the batch ``[source, neg·target, cond·target]``, and injection matters."""
    steps, f_t, attn_t = 4, 0.5, 0.25
    core = Diffusion(sd)
    sched = official_scheduler(sd, steps)
    ref = OfficialPnPUNet(sd.unet, *official_injection_timesteps(sched, steps, f_t, attn_t))
    torch.manual_seed(0)
    x_src, x_tgt = torch.randn(1, 4, 8, 8).double(), torch.randn(1, 4, 8, 8).double()
    emb = torch.cat([core.encode_text([""]), core.encode_text([NEG]), core.encode_text([TGT])])
    batch = torch.cat([x_src, x_tgt, x_tgt])
    ctrl = PnPControl(int(steps * f_t), int(steps * attn_t))
    hooks = FeatureHooks(sd.unet, [pnp_feature_layer(sd.unet)], store=False, replace=ctrl.replace_feature)
    ts = core.timesteps(steps)
    assert ts == [int(t) for t in sched.timesteps]
    with torch.no_grad():
        plain = [sd.unet(batch, t, encoder_hidden_states=emb).sample for t in ts]
        with ctrl.install(sd.unet), hooks:
            ours = []
            for i, t in enumerate(ts):
                ctrl.begin_step(i, t)
                ours.append(core.eps(batch, t, emb))
        official = [ref(batch, t, emb) for t in ts]
    for i in range(steps):
        assert _max_rel(ours[i], official[i]) <= TOL, f"step {i}"
        assert torch.equal(ours[i][0], plain[i][0])  # the source row itself is never edited
    # steps 0 (q/k + feature) and 1 (feature only) inject; 2 and 3 are the plain U-Net
    assert _max_rel(ours[0], plain[0]) > 1e-3 and _max_rel(ours[1], plain[1]) > 1e-3
    assert torch.equal(ours[2], plain[2]) and torch.equal(ours[3], plain[3])
    # q/k injection alone changes the step too (feature injection off, q/k on)
    qk_only = PnPControl(0, 1)
    with torch.no_grad(), qk_only.install(sd.unet):
        qk_only.begin_step(0, ts[0])
        e_qk = core.eps(batch, ts[0], emb)
    ref_qk = OfficialPnPUNet(sd.unet, sched.timesteps[:1], [])
    with torch.no_grad():
        assert _max_rel(e_qk, ref_qk(batch, ts[0], emb)) <= TOL
    assert _max_rel(e_qk, plain[0]) > 1e-3


# ------------------------------------------------------------------ whole edits against PIE-Bench's runner
def _pb_reference(sd, image, steps, branch, guidance=7.5, f_t=0.8, attn_t=0.5):
    """PIE-Bench's ``ddim+pnp`` (``reconstruction``) or ``directinversion+pnp`` (``inversion``)."""
    core = Diffusion(sd)
    z0 = core.encode_image(core.prepare(image))
    sched = official_scheduler(sd, steps)
    cond = core.encode_text([SRC])  # extract_latents(inversion_prompt=prompt_src)
    inverted_x = pb_ddim_inversion(sd.unet, sched, cond, z0)
    if branch == "reconstruction":
        noisy_latent = pb_ddim_sample(sd.unet, sched, cond, inverted_x[-1])
        noisy_latent.reverse()
    else:
        noisy_latent = inverted_x
    emb = torch.cat([core.encode_text([""]), core.encode_text([NEG]), core.encode_text([TGT])])
    ref = OfficialPnPUNet(sd.unet, *official_injection_timesteps(sched, steps, f_t, attn_t))
    return pb_run_pnp(ref, sched, noisy_latent, emb, guidance), noisy_latent


@pytest.mark.parametrize("branch", ["inversion", "reconstruction"])
def test_edit_equals_pie_bench_runner(sd, img, branch):
    steps = 3  # injection: features at steps 0-1 (int(3 · 0.8)), q/k at step 0 (int(3 · 0.5))
    ed = PnP(steps=steps, inversion_prompt="source", source_text="empty", source_branch=branch).bind(sd)
    res = ed(EditRequest(img, SRC, TGT, seed=0))
    z_ref, noisy_latent = _pb_reference(sd, img, steps, branch)
    assert _max_rel(res.extras["latent"], z_ref) <= TOL
    # the source row's latent at each step is the runner's noisy_latent[-1 - i]
    src = res.extras["source_latents"]
    assert len(src) == steps
    for i in range(steps):
        assert _max_rel(src[i], noisy_latent[-1 - i]) <= TOL
    # the two branches feed different latents: PB's DDIM row is shifted by one step
    other = PnP(steps=steps, inversion_prompt="source",
                source_branch={"inversion": "reconstruction", "reconstruction": "inversion"}[branch]).bind(sd)
    assert _max_rel(other(EditRequest(img, SRC, TGT, seed=0)).extras["latent"], z_ref) > 1e-3


def test_reconstruction_branch_is_the_shifted_reconstruction(sd, img):
    """``reconstruction``: step ``i`` reads the DDIM reconstruction *after* step ``i``; the last
    one is the reconstructed clean latent, the first is where the target starts."""
    steps = 3
    ed = PnP(steps=steps, inversion_prompt="source", source_branch="reconstruction").bind(sd)
    res = ed(EditRequest(img, SRC, TGT, seed=0))
    c = ed.core
    inv = c.invert_image(c.prepare(img), SRC, steps, keep=True)
    cond = c.encode_text([SRC])
    src = res.extras["source_latents"]
    assert len(src) == steps
    assert torch.equal(src[-1], c.sample(inv.xT, cond, steps=steps))  # the reconstructed z0
    # one unguided DDIM step from the inverted noise (at t_0 = 667) gives the first source latent
    # (at abar(334)), which is also where the target starts
    d, ts = c.step_size(steps), c.timesteps(steps)
    first, _ = c.ddim_step(inv.xT, c.eps(inv.xT, ts[0], cond), ts[0], ts[0] - d)
    assert ts == [667, 334, 1] and torch.equal(src[0], first)
    # none of them is the inverted latent of its step (that is the inversion branch)
    assert not any(torch.allclose(s, t, atol=1e-4) for s, t in zip(src, inv.trajectory))


def test_reconstruction_from_a_finer_inversion_starts_at_the_first_sampling_timestep(tiny_models, img):
    """With ``inversion_steps`` > ``steps`` the reconstruction starts from the inverted latent at
    the first sampling timestep (751 of the 8-step grid 876, 751, ...) and runs on the sampling grid."""
    ed = PnP(steps=4, inversion_steps=8, inversion_prompt="source", source_branch="reconstruction").bind(tiny_models)
    res = ed(EditRequest(img, SRC, TGT, seed=0))
    c = ed.core
    inv = c.invert_image(c.prepare(img), SRC, 8, keep=True)
    assert c.timesteps(8)[1] == 751 == c.timesteps(4)[0]
    cond = c.encode_text([SRC])
    first, _ = c.ddim_step(inv.trajectory[1], c.eps(inv.trajectory[1], 751, cond), 751, 501)
    assert torch.equal(res.extras["source_latents"][0], first)
    assert torch.equal(res.extras["source_latents"][-1], c.sample(inv.trajectory[1], cond, steps=4))


# ------------------------------------------------------------------ which text the source row and the inversion read
@pytest.mark.parametrize("inversion_prompt,source_text,branch,want_inv,want_src", [
    ("empty", "empty", "inversion", "", ""),  # pnp-diffusers (config default)
    ("source", None, "inversion", SRC, ""),  # the default source_text is "" whatever the inversion prompt
    ("source", "empty", "inversion", SRC, ""),  # PIE-Bench directinversion+pnp
    ("source", "empty", "reconstruction", SRC, ""),  # PIE-Bench ddim+pnp
    ("source", "inversion", "inversion", SRC, SRC),  # the behaviour before source_text existed
    ("empty", "inversion", "inversion", "", ""),
    ("empty", "target", "inversion", "", TGT),
    ("a photo", "a gray photo", "reconstruction", "a photo", "a gray photo"),
])
def test_prompts_of_inversion_reconstruction_and_source_row(tiny_models, img, monkeypatch, inversion_prompt,
                                                            source_text, branch, want_inv, want_src):
    kw = {} if source_text is None else {"source_text": source_text}
    ed = PnP(steps=2, inversion_prompt=inversion_prompt, source_branch=branch, **kw).bind(tiny_models)
    c = ed.core
    seen = {"invert": [], "sample": [], "rows": []}
    invert, sample, eps = c.invert_image, c.sample, c.eps

    def spy_invert(img_, prompt, *a, **k):
        seen["invert"].append(prompt)
        return invert(img_, prompt, *a, **k)

    def spy_sample(x, cond, *a, **k):
        seen["sample"].append(cond)
        return sample(x, cond, *a, **k)

    def spy_eps(x, t, cond, *a, **k):
        if x.shape[0] == 3:
            seen["rows"].append(cond)
        return eps(x, t, cond, *a, **k)

    monkeypatch.setattr(c, "invert_image", spy_invert)
    monkeypatch.setattr(c, "sample", spy_sample)
    monkeypatch.setattr(c, "eps", spy_eps)
    ed(EditRequest(img, SRC, TGT, seed=0))
    assert seen["invert"] == [want_inv]
    if branch == "reconstruction":  # the reconstruction runs with the inversion prompt, unguided
        assert len(seen["sample"]) == 1 and torch.equal(seen["sample"][0], c.encode_text([want_inv]))
    else:
        assert seen["sample"] == []
    assert len(seen["rows"]) == 2
    for emb in seen["rows"]:
        assert torch.equal(emb[0], c.encode_text([want_src])[0])
        assert torch.equal(emb[1], c.encode_text([NEG])[0]) and torch.equal(emb[2], c.encode_text([TGT])[0])


def test_bad_source_branch_is_refused():
    with pytest.raises(ValueError, match="source_branch must be one of"):
        PnP(source_branch="ddim")
