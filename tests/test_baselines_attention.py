"""PnP, MasaCtrl, null-text inversion and Prompt-to-Prompt on a tiny random SD-shaped model:
exact reductions, attention maths, token alignment, processor hygiene, configs."""

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from baselines.ddim import DDIMWordSwap
from baselines.masactrl import MasaCtrl, MutualSelfAttention, first_controlled_layer
from baselines.null_text_p2p import DDIMP2P, denoise, null_text_invert
from baselines.pnp import PnP, PnPControl, pnp_attn_layers, pnp_feature_layer
from oig.attn_control import AttentionController, AttnLayer, ControlProcessor, attention_layers
from oig.cache import InversionCache
from oig.diffusion import Diffusion
from oig.p2p import PromptToPrompt, refinement_mapper, replacement_mapper, word_positions, word_token_spans
from oig.toy import world
from oig.types import EditRequest

STEPS = 4
SRC = "a red circle on a gray background"
TGT = "a red square on a gray background"
CONF = Path(__file__).resolve().parents[1] / "conf" / "method"


def _req(img, source=SRC, target=TGT):
    return EditRequest(img, source, target, seed=0)


def _arr(img):
    return np.asarray(img)


@pytest.fixture(scope="module")
def toy_img():
    return Image.fromarray(world.benchmark(1)[0].source_image)


# ------------------------------------------------------------------ shared machinery
def test_layer_table_follows_call_order(tiny_models):
    unet = tiny_models.unet
    layers = attention_layers(unet)
    # tiny U-Net: CrossAttnDownBlock2D (1 layer), mid (1), CrossAttnUpBlock2D (2 layers)
    assert [(l.place, l.kind, l.transformer, l.level) for l in layers] == [
        ("down", "self", 0, 0), ("down", "cross", 0, 0), ("mid", "self", 1, 1), ("mid", "cross", 1, 1),
        ("up", "self", 2, 0), ("up", "cross", 2, 0), ("up", "self", 3, 0), ("up", "cross", 3, 0)]

    class Spy(AttentionController):
        def active(self, layer):
            self.calls.append(layer.index)
            return False

    spy = Spy()
    spy.calls = []
    with spy.install(unet), torch.no_grad():
        unet(torch.randn(1, 4, 8, 8), 500, encoder_hidden_states=torch.randn(1, 77, 32))
    assert spy.calls == list(range(len(layers)))
    # layer rules: PnP feature / attention, MasaCtrl start layer
    assert pnp_feature_layer(unet) == "up_blocks.1.resnets.1"
    assert [l.name for l in pnp_attn_layers(layers)] == ["up_blocks.1.attentions.1.transformer_blocks.0.attn1"]
    assert first_controlled_layer(10, 16) == 10 and first_controlled_layer(10, 7) == 4
    assert first_controlled_layer(10, 4) == 3


def test_layer_rules_match_the_references_on_an_sd_shaped_unet(tiny_models):
    """SD 1.x's block structure with tiny channels: the layer rules give the reference's hard-coded layers."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=64, block_out_channels=(8, 8, 8, 8), layers_per_block=2, cross_attention_dim=8,
        attention_head_dim=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    layers = attention_layers(unet)
    selfs = [l for l in layers if not l.is_cross]
    assert len(selfs) == 16 and [l.place for l in selfs].count("up") == 9  # MasaCtrl's 16 SD layers
    pnp = {l.name.split(".transformer_blocks")[0] for l in pnp_attn_layers(layers)}
    ref = [(1, 1), (1, 2)] + [(b, a) for b in (2, 3) for a in range(3)]  # pnp-diffusers' res_dict
    assert pnp == {f"up_blocks.{b}.attentions.{a}" for b, a in ref}
    assert pnp_feature_layer(unet) == "up_blocks.1.resnets.1"
    masa = MutualSelfAttention(start_layer=10)
    masa.setup(layers)
    assert {layers[i].name.split(".attentions")[0] for i in masa.mutual_layers} == {"up_blocks.2", "up_blocks.3"}
    assert len(masa.mutual_layers) == 6
    p2p = PromptToPrompt(tiny_models.tokenizer, SRC, TGT, steps=50, blend_words="auto")
    p2p.setup(layers)
    blend = sorted(layers[i].name.split(".transformer_blocks")[0] for i in p2p.store_layers)
    assert blend == ["down_blocks.2.attentions.0", "down_blocks.2.attentions.1", "up_blocks.1.attentions.0",
                     "up_blocks.1.attentions.1", "up_blocks.1.attentions.2"]  # LocalBlend's five 16x16 maps
    assert {l.hw((64, 64)) for l in layers if l.index in p2p.self_layers} == {(32, 32), (16, 16), (8, 8)}


def test_processors_restored_after_edit_and_exception(tiny_models, toy_img, monkeypatch):
    unet = tiny_models.unet
    before = dict(unet.attn_processors)

    class Boom(AttentionController):
        def active(self, layer):
            return True

        def edit_qkv(self, layer, q, k, v):
            raise RuntimeError("boom")

    ctrl = Boom()
    with pytest.raises(RuntimeError, match="boom"):
        with ctrl.install(unet):
            assert all(isinstance(p, ControlProcessor) for p in unet.attn_processors.values())
            unet(torch.randn(1, 4, 8, 8), 500, encoder_hidden_states=torch.randn(1, 77, 32))
    after = dict(unet.attn_processors)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)

    # a whole editor failing mid-sampling: processors and feature hooks are gone too
    ed = PnP(steps=STEPS).bind(tiny_models)

    def fail(*a, **k):
        raise RuntimeError("step failed")

    monkeypatch.setattr(ed.core, "ddim_step", fail)
    with pytest.raises(RuntimeError, match="step failed"):
        ed(_req(toy_img))
    after = dict(unet.attn_processors)
    assert all(after[k] is before[k] for k in before)
    assert not unet.up_blocks[1].resnets[1].conv2._forward_hooks


# ------------------------------------------------------------------ exact reductions
def test_disabled_injection_equals_ddim_word_swap(tiny_models, toy_img):
    ws = DDIMWordSwap(steps=STEPS, guidance=5.0, negative="source", inversion="standard").bind(tiny_models)
    ref = ws(_req(toy_img))
    c = ws.core  # the word-swap latent, for a comparison before decoding
    src = c.prepare(toy_img)
    inv = c.invert_image(src, SRC, STEPS, convention="standard")
    z_ref = c.sample(inv.xT, c.encode_text([TGT]), c.encode_text([SRC]), 5.0, STEPS)

    same = dict(steps=STEPS, guidance=5.0, negative="source", inversion_prompt="source")
    pnp = PnP(pnp_f_t=0.0, pnp_attn_t=0.0, **same).bind(tiny_models)(_req(toy_img))
    masa = MasaCtrl(inversion_guidance=1.0, start_step=STEPS, **same).bind(tiny_models)(_req(toy_img))
    assert torch.equal(pnp.extras["latent"], z_ref)
    assert np.array_equal(_arr(pnp.image), _arr(ref.image))
    # MasaCtrl denoises [source, target] in one CFG batch of four rows: bit for bit the plain DDIM
    # of that batch; against the one-row word swap only up to float32 rounding, as the CPU's GEMM
    # kernels may depend on the batch size
    z_pair = c.sample(torch.cat([inv.xT, inv.xT]), c.encode_text([SRC, TGT]), c.encode_text([SRC, SRC]), 5.0, STEPS)
    assert torch.equal(masa.extras["latent"], z_pair[1:])
    assert torch.allclose(masa.extras["latent"], z_ref, atol=1e-4)
    # ... and switching injection on does change the edit
    pnp_on = PnP(pnp_f_t=1.0, pnp_attn_t=1.0, **same).bind(tiny_models)(_req(toy_img))
    masa_on = MasaCtrl(inversion_guidance=1.0, start_step=0, start_layer=0, **same).bind(tiny_models)(_req(toy_img))
    assert (pnp_on.extras["latent"] - z_ref).abs().max() > 1e-3
    assert (masa_on.extras["latent"] - z_ref).abs().max() > 1e-3


def test_same_prompt_full_injection_reproduces_source_branch(tiny_models, toy_img):
    masa = MasaCtrl(steps=STEPS, inversion_prompt="source", inversion_guidance=1.0, start_step=0,
                    start_layer=0).bind(tiny_models)(_req(toy_img, SRC, SRC))
    p2p = DDIMP2P(steps=STEPS, cross_replace=1.0, self_replace=1.0, self_replace_res=1.0,
                  blend_words=[["red"], ["red"]]).bind(tiny_models)(_req(toy_img, SRC, SRC))
    for r in (masa, p2p):
        assert torch.equal(r.extras["latent"], r.extras["source_latent"])
        assert np.array_equal(_arr(r.image), _arr(r.reconstruction))


def test_pnp_injection_schedule_and_inversion_steps(tiny_models, toy_img):
    layers = attention_layers(tiny_models.unet)
    ctrl = PnPControl(feature_steps=2, attn_steps=1)
    ctrl.setup(layers)
    (qk,) = [l for l in layers if l.index in ctrl.qk_layers]
    torch.manual_seed(0)
    f, q, k, v = torch.randn(3, 8, 4, 4), torch.randn(3, 16, 32), torch.randn(3, 16, 32), torch.randn(3, 16, 32)
    ctrl.begin_step(0)
    assert ctrl.active(qk)
    q2, k2, v2 = ctrl.edit_qkv(qk, q, k, v)
    assert torch.equal(q2, q[[0, 0, 0]]) and torch.equal(k2, k[[0, 0, 0]]) and v2 is v
    assert torch.equal(ctrl.replace_feature("f", f), f[[0, 0, 0]])
    ctrl.begin_step(1)
    assert not ctrl.active(qk) and ctrl.replace_feature("f", f) is not None
    ctrl.begin_step(2)
    assert ctrl.replace_feature("f", f) is None

    # the source row reads the inverted latents at the sampling timesteps of a finer inversion
    ed = PnP(steps=STEPS, inversion_steps=2 * STEPS).bind(tiny_models)
    inv = ed.core.invert_image(ed.core.prepare(toy_img), "", 2 * STEPS, keep=True)
    lat = ed._source_latents(inv, ed.core.timesteps(STEPS))
    assert all(a is inv.trajectory[2 * i + 1] for i, a in enumerate(lat))  # 751, 501, 251, 1 of 876, 751, ...
    assert ed(_req(toy_img)).image.size == (16, 16)
    with pytest.raises(ValueError, match="no latent at sampling timesteps"):
        PnP(steps=STEPS, inversion_steps=5).bind(tiny_models)(_req(toy_img))


def test_local_blend_keeps_source_outside_mask(tiny_models, toy_img):
    # the random model's maps are nearly flat: a high threshold gives a partial mask
    r = DDIMP2P(steps=STEPS, blend_words="auto", blend_start=0.0, blend_threshold=0.8).bind(tiny_models)(_req(toy_img))
    mask = r.extras["blend_mask"]
    z, zs = r.extras["latent"][0], r.extras["source_latent"][0]
    assert mask.dtype == torch.bool and 0 < mask.sum() < mask.numel()
    assert torch.equal(z[:, ~mask], zs[:, ~mask])
    assert (z[:, mask] - zs[:, mask]).abs().max() > 1e-4


def test_mask_guided_masactrl_uses_cross_attention_masks(tiny_models, toy_img, monkeypatch):
    seen = []
    orig = MutualSelfAttention._masks

    def spy(self, layer):
        m = orig(self, layer)
        seen.append(m)
        return m

    monkeypatch.setattr(MutualSelfAttention, "_masks", spy)
    kw = dict(steps=STEPS, inversion_guidance=1.0, start_step=0, start_layer=0)
    plain = MasaCtrl(**kw).bind(tiny_models)(_req(toy_img))
    masked = MasaCtrl(mask_guided=True, mask_threshold=0.5, **kw).bind(tiny_models)(_req(toy_img))
    used = [m for m in seen if m is not None]
    assert used and all(set(x.unique().tolist()) <= {0.0, 1.0} for m in used for x in m)
    assert (masked.extras["latent"] - plain.extras["latent"]).abs().max() > 1e-4
    # the source row is not edited (recording maps takes the explicit-softmax path: rounding only)
    assert torch.allclose(masked.extras["source_latent"], plain.extras["source_latent"], atol=1e-4)


# ------------------------------------------------------------------ attention maths
def test_mutual_self_attention_uses_source_keys_values(tiny_models):
    unet = tiny_models.unet
    name = "up_blocks.1.attentions.1.transformer_blocks.0.attn1"
    attn = dict(unet.named_modules())[name]
    torch.manual_seed(0)
    h = torch.randn(4, 64, attn.to_q.in_features)  # rows [u_src, u_tgt, c_src, c_tgt]
    with torch.no_grad():
        plain = attn(h)
        ctrl = MutualSelfAttention(start_step=0, start_layer=0)
        with ctrl.install(unet):
            ctrl.begin_step(0)
            out = attn(h)
        q, k, v = attn.to_q(h), attn.to_k(h), attn.to_v(h)
        heads, hd = attn.heads, q.shape[-1] // attn.heads
        split = lambda x: x.view(x.shape[0], -1, heads, hd).transpose(1, 2)  # noqa: E731
        for tgt, src in ((1, 0), (3, 2)):
            p = (split(q[tgt:tgt + 1]) @ split(k[src:src + 1]).transpose(-1, -2) * attn.scale).softmax(-1)
            o = (p @ split(v[src:src + 1])).transpose(1, 2).reshape(1, -1, heads * hd)
            assert torch.allclose(out[tgt], attn.to_out[0](o)[0], atol=1e-5)
            assert (out[tgt] - plain[tgt]).abs().max() > 1e-4
        assert torch.equal(out[[0, 2]], plain[[0, 2]])


def _layer(kind, level, index=0):
    return AttnLayer("x", index, 0, kind, "up", 1, level, 0)


def test_p2p_controller_edits_conditional_target_only(tiny_models):
    tok = tiny_models.tokenizer
    torch.manual_seed(0)
    probs = torch.rand(4, 2, 16, 77).softmax(-1)
    cross, self_lo, self_hi = _layer("cross", 0, 0), _layer("self", 1, 1), _layer("self", 0, 2)

    ctrl = PromptToPrompt(tok, SRC, "a red zebra on a gray background", steps=10)  # replace, multi-token swap
    ctrl.setup([cross, self_lo, self_hi])
    ctrl.begin_step(0)
    out = ctrl.edit_probs(cross, probs.clone())
    assert torch.allclose(out[3], torch.einsum("hpw,wn->hpn", probs[2], ctrl.mapper), atol=1e-7)
    assert torch.equal(out[:3], probs[:3])
    assert torch.equal(ctrl.edit_probs(self_lo, probs.clone())[3], probs[2])  # half the latent side: replaced
    assert torch.equal(ctrl.edit_probs(self_hi, probs.clone()), probs)  # full resolution is never replaced
    ctrl.begin_step(int(0.4 * 11))  # first step past cross_replace = 0.4 (of steps + 1)
    assert not ctrl.active(cross) and ctrl.active(self_lo)
    ctrl.begin_step(6)  # self_replace = 0.6 of 10 steps
    assert not ctrl.active(self_lo)

    refine = PromptToPrompt(tok, SRC, "a striped red circle on a gray background", steps=10, edit_type="auto",
                            reweight_words="auto", reweight_value=3.0)
    assert refine.base_type == "refine"
    refine.begin_step(0)
    out = refine.edit_probs(cross, probs.clone())[3]
    eq = torch.ones(77)
    eq[2] = 3.0  # "striped", the word only the target has
    assert torch.allclose(out[..., 2], probs[3][..., 2] * 3.0)
    assert torch.allclose(out[..., 3], probs[2][..., 2])  # target "red" reads source "red"
    assert torch.allclose(out, (probs[2][..., refine.mapper] * refine.alphas + probs[3] * (1 - refine.alphas)) * eq)


# ------------------------------------------------------------------ token alignment
def test_word_swap_alignment_with_different_token_lengths(tiny_models):
    tok = tiny_models.tokenizer
    assert len(tok("zebra", add_special_tokens=False).input_ids) == 5  # unknown word: one token per letter
    spans = word_token_spans(tok, "a red zebra on a gray background")
    assert spans[2] == ("zebra", [3, 4, 5, 6, 7]) and spans[3] == ("on", [8])

    m = replacement_mapper(tok, SRC, "a red zebra on a gray background")  # circle (1 token) -> zebra (5)
    assert torch.allclose(m[3, 3:8], torch.full((5,), 0.2)) and m[3].sum() == pytest.approx(1.0)
    assert m[0, 0] == 1 and m[1, 1] == 1 and m[2, 2] == 1  # start token, "a", "red"
    assert m[4, 8] == 1 and m[7, 11] == 1  # "on" -> "on", "background" -> "background"
    assert m[8, 12] == 1 and m[72, 76] == 1  # end token and padding keep the offset
    assert torch.allclose(m[:73].sum(1), torch.ones(73))

    back = replacement_mapper(tok, "a zebra on a gray background", "a circle on a gray background")  # 5 -> 1
    assert torch.equal(back[2:7, 2], torch.ones(5)) and back[7, 3] == 1 and back[11, 7] == 1

    mapper, alphas = refinement_mapper(tok, "a red circle", "a striped red circle")
    assert mapper[:6].tolist() == [0, 1, 0, 2, 3, 4] and alphas[:6].tolist() == [1, 1, 0, 1, 1, 1]
    mapper, alphas = refinement_mapper(tok, "a circle", "a zebra circle")
    assert alphas[2:7].tolist() == [0] * 5 and mapper[7] == 2 and mapper[8] == 3 and alphas[7:].min() == 1

    with pytest.raises(ValueError, match="same number of words"):
        replacement_mapper(tok, SRC, "a red striped circle on a gray background")
    with pytest.raises(ValueError, match="not in the prompt"):
        word_positions(tok, SRC, "zebra")
    assert word_positions(tok, "a red zebra on a red background", "red") == [2, 10]


# ------------------------------------------------------------------ null-text inversion
def test_null_text_reconstruction_beats_ddim_at_cfg(tiny_models, toy_img):
    core = Diffusion(tiny_models)
    src = core.prepare(toy_img)
    cond, empty = core.encode_text([SRC]), core.encode_text([""])
    # the tiny random U-Net barely listens to the text, so the optimiser gets a larger budget than SD's default
    nt = null_text_invert(core, src, SRC, STEPS, guidance=7.5, inner_steps=15, lr=0.5)
    z_nt = denoise(core, nt.xT, cond, nt.uncond, 7.5, STEPS)
    z_ddim = core.sample(nt.xT, cond, empty, 7.5, STEPS)
    err_nt = (z_nt - nt.z0).pow(2).mean().item()
    err_ddim = (z_ddim - nt.z0).pow(2).mean().item()
    assert err_nt * 8 < err_ddim


def test_null_text_is_deterministic_and_cached(tiny_models, toy_img, tmp_path):
    kw = dict(steps=3, guidance=7.5, inner_steps=3, lr=0.1)
    plain = Diffusion(tiny_models)
    src = plain.prepare(toy_img)
    a = null_text_invert(plain, src, SRC, **kw)
    cache = InversionCache(tmp_path)
    cached = Diffusion(tiny_models, cache=cache)
    b = null_text_invert(cached, src, SRC, **kw)
    c = null_text_invert(cached, src, SRC, **kw)
    assert not b.from_cache and c.from_cache and cache.hits >= 1
    for r in (b, c):
        assert torch.equal(torch.stack(r.uncond), torch.stack(a.uncond)) and torch.equal(r.xT, a.xT)
    assert all(u.dtype == torch.float32 for u in a.uncond)
    assert not torch.equal(a.uncond[0], plain.encode_text([""]))  # the embedding was optimised
    hits = cache.hits
    null_text_invert(cached, src, SRC, **{**kw, "inner_steps": 2})  # other parameters: another entry
    assert cache.hits == hits


# ------------------------------------------------------------------ configs on the toy world
@pytest.mark.parametrize("name", ["pnp", "masactrl", "null_text_p2p", "null_text", "ddim_p2p"])
def test_config_instantiates_and_runs_on_toy_samples(name, tiny_models):
    from hydra.utils import get_class, instantiate

    path = CONF / f"{name}.yaml"
    cfg = OmegaConf.load(path)
    lines = [ln for ln in path.read_text().splitlines() if ln and not ln.startswith(("#", "_target_"))]
    assert all("#" in ln for ln in lines), f"{path}: every hyperparameter needs a comment"
    params = {p.name: p.default for p in inspect.signature(get_class(cfg._target_).__init__).parameters.values()
              if p.name != "self"}
    keys = {k for k in cfg if k != "_target_"}
    assert keys == set(params), f"{path}: keys differ from the __init__ arguments"
    for k in keys:
        v = OmegaConf.to_container(cfg, resolve=True)[k]
        d = list(params[k]) if isinstance(params[k], tuple) else params[k]
        assert v == d, f"{path}: {k} = {v!r}, default {d!r}"

    ed = instantiate(cfg)
    ed.steps = 3  # (PnP's inversion_steps: null follows)
    if hasattr(ed, "inner_steps"):
        ed.inner_steps = 2
    ed.bind(tiny_models)
    bench = world.benchmark(1)
    for e in (bench[0], bench[3]):  # shape swap (same word count), appearance change (added word)
        res = ed(EditRequest(Image.fromarray(e.source_image), e.source_prompt, e.target_prompt, mask=e.edit_mask))
        assert res.image.size == res.source.size == (16, 16)
        assert (res.reconstruction is not None) == type(ed).has_reconstruction
        assert res.timings["sampling"] > 0
