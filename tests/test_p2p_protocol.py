"""Prompt-to-Prompt and null-text inversion as PIE-Bench ran them (cure-lab/PnPInversion), checked
against our own transcriptions of the reference update rules:

* per-sample edit words (``blended_word``) reach the controller through ``EditRequest.meta``;
* refine as the base edit with re-weighting ×2 *on top of it* (``AttentionReweight(controller=refine)``);
* LocalBlend's mask equals ``LocalBlend.get_mask`` (``models/p2p/attention_control.py``);
* the step windows at N = 50 (cross 0.4 -> 20 steps, self 0.6 -> 30 steps);
* the null-text optimisation equals ``NullInversion.null_optimization`` (``models/p2p/inversion.py``);
* null-text editors refuse half precision unless forced.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from baselines.null_text_p2p import DDIMP2P, NullText, NullTextP2P, optimise_null_text
from oig.attn_control import AttnLayer
from oig.diffusion import Diffusion
from oig.p2p import PromptToPrompt, word_positions, word_token_spans
from oig.toy import world
from oig.types import EditRequest, Sample, edit_words

SRC = "a red circle on a gray background"
TGT = "a red square on a gray background"


@pytest.fixture(scope="module")
def toy_img():
    return Image.fromarray(world.benchmark(1)[0].source_image)


# ------------------------------------------------------------------ per-sample words
def test_edit_words_come_from_the_sample_meta():
    assert edit_words({"blended_word": "cat dog"}) == ("cat", "dog")  # PIE-Bench: split on the space
    assert edit_words({"blended_word": ""}) is None and edit_words({}) is None and edit_words(None) is None
    assert edit_words({"source_word": "cat", "target_word": "cat wearing glasses"}) == ("cat", "cat wearing glasses")
    with pytest.raises(ValueError, match="two space-separated words"):
        edit_words({"blended_word": "a b c"})
    s = Sample("x", Image.new("RGB", (8, 8)), SRC, TGT, meta={"blended_word": "circle square", "editing_type": "x"})
    req = EditRequest.from_sample(s, seed=3)
    assert req.meta == s.meta and req.meta is not s.meta and req.edit_words() == ("circle", "square")

    from oig.data.toyworld import ToyWorld

    words = {x.task: x.meta for x in ToyWorld(n_per_task=1)}
    for task, m in words.items():
        e = EditRequest.from_sample(next(x for x in ToyWorld(n_per_task=1) if x.task == task), 0).edit_words()
        assert e == (m["source_word"], m["target_word"])
    sw = next(x for x in ToyWorld(n_per_task=1) if x.task == "shape_swap")
    assert sw.meta["source_word"] in sw.source_prompt.split() and sw.meta["target_word"] in sw.target_prompt.split()
    assert words["appearance_change"]["source_word"] == "" and words["appearance_change"]["target_word"] == "striped"


# ------------------------------------------------------------------ controller construction
def test_refine_with_reweight_on_top_and_dataset_words(tiny_models):
    tok = tiny_models.tokenizer
    ctrl = PromptToPrompt(tok, SRC, TGT, steps=10, edit_type="refine", reweight_words="dataset", reweight_value=2.0,
                          blend_words="dataset", edit_words=("circle", "square"))
    assert ctrl.base_type == "refine" and ctrl.alphas is not None  # same word count, still refine (PIE-Bench)
    assert ctrl.reweight_words == ["square"] and ctrl.blend_words == (["circle"], ["square"])
    sq = word_positions(tok, TGT, "square")
    eq = torch.ones(77)
    eq[sq] = 2.0
    assert torch.equal(ctrl.equalizer, eq)
    ci = word_positions(tok, SRC, "circle")
    assert ctrl.blend_alpha[0].nonzero().flatten().tolist() == ci
    assert ctrl.blend_alpha[1].nonzero().flatten().tolist() == sq

    # the cross-attention edit is refine(source, target) * equalizer
    torch.manual_seed(0)
    probs = torch.rand(4, 2, 16, 77).softmax(-1)
    cross = AttnLayer("x", 0, 0, "cross", "up", 1, 0, 0)
    ctrl.setup([cross])
    ctrl.begin_step(0)
    out = ctrl.edit_probs(cross, probs.clone())[3]
    refine = probs[2][..., ctrl.mapper] * ctrl.alphas + probs[3] * (1 - ctrl.alphas)
    assert torch.allclose(out, refine * eq, atol=0, rtol=0)

    # no words in the sample: PIE-Bench passes blend_word=None and eq_params=None
    off = PromptToPrompt(tok, SRC, TGT, steps=10, edit_type="refine", reweight_words="dataset", blend_words="dataset",
                         edit_words=None)
    assert off.equalizer is None and off.blend_alpha is None
    # the old edit_type=reweight is refused with the way to express it now
    with pytest.raises(ValueError, match="reweight_words"):
        PromptToPrompt(tok, SRC, TGT, steps=10, edit_type="reweight")
    with pytest.raises(ValueError, match="reweight_words"):
        DDIMP2P(edit_type="reweight")


def test_missing_blend_word_error_or_zero_map_as_the_reference(tiny_models):
    tok = tiny_models.tokenizer
    with pytest.raises(ValueError, match="not in the prompt"):
        PromptToPrompt(tok, SRC, TGT, steps=10, blend_words="dataset", edit_words=("cat", "square"))
    ctrl = PromptToPrompt(tok, SRC, TGT, steps=10, blend_words="dataset", reweight_words="dataset",
                          edit_words=("cat", "dog"), missing_words="ignore")
    assert ctrl.blend_alpha.sum() == 0  # get_word_inds finds nothing: an all-zero map
    assert torch.equal(ctrl.equalizer, torch.ones(77))


def test_step_windows_at_fifty_steps(tiny_models):
    ctrl = PromptToPrompt(tiny_models.tokenizer, SRC, TGT, steps=50, cross_replace=0.4, self_replace=0.6)
    assert ctrl.cross_window == (0, 20) and ctrl.self_window == (0, 30)
    cross_on = self_on = 0
    for i in range(50):
        ctrl.begin_step(i)
        cross_on += ctrl._cross_on()
        self_on += ctrl._self_on()
    assert (cross_on, self_on) == (20, 30)
    assert ctrl.blend_start == 10  # LocalBlend from the 11th step callback on: int(0.2 * 50)


# ------------------------------------------------------------------ LocalBlend against the reference
def _reference_get_mask(cross_maps, alpha, th, latent_hw):
    """Transcription of PnPInversion ``LocalBlend.get_mask`` (use_pool=True) on per-head maps.

    ``cross_maps``: list over layers of ``[2, heads, 16*16, 77]`` conditional maps summed over
    the steps; ``alpha``: ``[2, 77]`` word indicator of source / target."""
    side = int(cross_maps[0].shape[2] ** 0.5)
    maps = torch.cat([m.reshape(2, -1, 1, side, side, 77) for m in cross_maps], dim=1)
    maps = (maps * alpha[:, None, None, None, None, :]).sum(-1).mean(1)
    maps = F.max_pool2d(maps, (3, 3), (1, 1), padding=(1, 1))
    mask = F.interpolate(maps, size=latent_hw)
    mask = mask / mask.max(2, keepdim=True)[0].max(3, keepdim=True)[0]
    mask = mask.gt(th)
    return mask[:1] + mask


def test_local_blend_mask_equals_reference(tiny_models):
    tok = tiny_models.tokenizer
    ctrl = PromptToPrompt(tok, SRC, TGT, steps=50, blend_words=[["circle"], ["square"]])
    # SD at 512 px: the five 16x16 cross-attention layers of a 64x64 latent (2 down, 3 up), plus others
    layers, idx = [], 0
    for place, levels in (("down", [0, 1, 2, 2]), ("mid", [3]), ("up", [2, 2, 2, 1, 0])):
        for lv in levels:
            layers.append(AttnLayer(f"{place}{idx}", idx, idx, "cross", place, 0, lv, 0))
            idx += 1
    ctrl.layers = layers  # what install() sets
    ctrl.setup(layers)
    assert sorted(ctrl.store_layers) == [2, 3, 5, 6, 7]
    g = torch.Generator().manual_seed(0)
    heads, per_head = 8, {}
    words = ctrl.blend_alpha.bool()
    for i in ctrl.store_layers:
        # softmax maps summed over 2 steps; rows: [neg·src, neg·tgt, cond·src, cond·tgt]; the edited
        # word attends to a random blob of the 16x16 map
        logits = torch.randn(2, 4, heads, 256, 77, generator=g)
        blob = (torch.rand(16, 16, generator=g) > 0.7).flatten()
        for row in (2, 3):
            logits[:, row, :, blob] += 4.0 * words[row - 2]
        per_head[i] = logits.softmax(-1).sum(0)
        ctrl.map_sums[i] = per_head[i].mean(1)  # what the controller stores: head-averaged
    ours = ctrl.blend_mask((2, 4, 64, 64))
    ref = _reference_get_mask([per_head[i][2:] for i in sorted(ctrl.store_layers)], ctrl.blend_alpha, 0.3, (64, 64))
    assert ours.shape == ref.shape == (2, 1, 64, 64)
    assert torch.equal(ours, ref.bool())
    assert 0 < ours[1].float().mean() < 1  # a real mask, not all or nothing

    # the blend itself: x_t[:1] + mask * (x_t - x_t[:1]) from the 11th step on
    x = torch.randn(2, 4, 64, 64, generator=g)
    assert ctrl.step_callback(9, x) is None
    blended = ctrl.step_callback(10, x)
    m = ref[1].float()
    assert torch.equal(blended[1], x[0] + m * (x[1] - x[0])) and torch.equal(blended[0], x[0])


# ------------------------------------------------------------------ null-text against the reference
def _reference_null_optimization(unet, alphas, timesteps, latents, cond, uncond, guidance, inner, eps):
    """Transcription of PnPInversion ``NullInversion.null_optimization`` (fp32); ``latents`` is the
    pivot as ``ddim_loop`` returns it (clean latent first)."""
    final = alphas[0]  # set_alpha_to_one=False
    step = 1000 // len(timesteps)

    def prev_step(e, t, x):
        a_t = alphas[t]
        a_p = alphas[t - step] if t - step >= 0 else final
        x0 = (x - (1 - a_t) ** 0.5 * e) / a_t**0.5
        return a_p**0.5 * x0 + (1 - a_p) ** 0.5 * e

    out, x = [], latents[-1]
    u = uncond
    for i, t in enumerate(timesteps):
        u = u.clone().detach()
        if inner:
            u.requires_grad = True
            opt = torch.optim.Adam([u], lr=1e-2 * (1.0 - i / 100.0))
            target = latents[len(latents) - i - 2]
            with torch.no_grad():
                e_c = unet(x, t, encoder_hidden_states=cond).sample
            for _ in range(inner):
                e_u = unet(x, t, encoder_hidden_states=u).sample
                loss = F.mse_loss(prev_step(e_u + guidance * (e_c - e_u), t, x), target)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if loss.item() < eps + i * 2e-5:
                    break
        out.append(u[:1].detach())
        with torch.no_grad():
            e = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([u, cond])).sample
            e_u, e_c = e.chunk(2)
            x = prev_step(e_u + guidance * (e_c - e_u), t, x)
    return out


def test_null_text_optimisation_equals_reference(tiny_models, toy_img):
    core = Diffusion(tiny_models)
    steps = 4
    src = core.prepare(toy_img)
    z0 = core.encode_image(src)
    cond, empty = core.encode_text([SRC]), core.encode_text([""])
    pivot = core.invert(z0, cond, steps, guidance=1.0, convention="standard", keep=True)
    ours = optimise_null_text(core, pivot.trajectory, cond, empty, steps, 7.5, inner_steps=5, lr=1e-2)
    alphas = tiny_models.scheduler.alphas_cumprod.float()
    ref = _reference_null_optimization(tiny_models.unet, alphas, core.timesteps(steps), pivot.trajectory[::-1],
                                       cond, empty, 7.5, 5, 1e-5)
    assert len(ours) == len(ref) == steps
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(ours[-1], empty, atol=1e-4)  # the optimiser moved it


# ------------------------------------------------------------------ precision policy
def test_null_text_refuses_half_precision_unless_forced(tiny_sd_path):
    from oig.models import load_sd

    half = load_sd(tiny_sd_path, device="cpu", dtype="bf16")
    for cls, name in ((NullTextP2P, "null_text_p2p"), (NullText, "null_text")):
        with pytest.raises(ValueError, match=rf"{name}: null-text inversion needs an fp32 model .*allow_half=true"):
            cls(steps=2).bind(half)
        assert cls(steps=2, allow_half=True).bind(half).core is not None
    DDIMP2P(steps=2).bind(half)  # plain DDIM + P2P optimises nothing: any dtype


# ------------------------------------------------------------------ wiring: blended_word reaches the controller
def test_blended_word_reaches_the_p2p_controller(tiny_models, toy_img, monkeypatch):
    seen = []
    orig = PromptToPrompt.__init__

    def spy(self, *a, **k):
        orig(self, *a, **k)
        seen.append(self)

    monkeypatch.setattr(PromptToPrompt, "__init__", spy)
    ed = DDIMP2P(steps=3, edit_type="refine", blend_words="dataset", reweight_words="dataset").bind(tiny_models)
    s = Sample("pie_000", toy_img, SRC, TGT, meta={"blended_word": "circle square", "editing_type_id": "1"})
    res = ed(EditRequest.from_sample(s, seed=0))
    ctrl = seen[-1]
    assert ctrl.blend_words == (["circle"], ["square"]) and ctrl.reweight_words == ["square"]
    assert res.info["p2p_blend_words"] == "circle | square" and res.info["p2p_reweight_words"] == "square"
    assert res.info["p2p_edit"] == "refine" and "blend_mask" in res.extras

    plain = ed(EditRequest.from_sample(Sample("pie_001", toy_img, SRC, TGT), seed=0))  # no blended_word
    assert seen[-1].blend_alpha is None and seen[-1].equalizer is None
    assert plain.info["p2p_blend_words"] == "" and "blend_mask" not in plain.extras
    assert not np.array_equal(np.asarray(plain.image), np.asarray(res.image))


# ------------------------------------------------------------------ scheduler: reference grid and settings
def test_steps_offset_gives_the_reference_grid_and_its_own_cache_key(tiny_sd_path):
    from oig.models import load_sd

    ckpt = load_sd(tiny_sd_path, device="cpu", dtype="fp32")
    ref = load_sd(tiny_sd_path, device="cpu", dtype="fp32", steps_offset=0)
    assert Diffusion(ckpt).timesteps(50)[:2] == [981, 961] and Diffusion(ckpt).timesteps(50)[-1] == 1
    assert Diffusion(ref).timesteps(50)[:2] == [980, 960] and Diffusion(ref).timesteps(50)[-1] == 0
    assert ref.unet is not ckpt.unet or ref.scheduler is not ckpt.scheduler
    assert ckpt.fingerprint() != ref.fingerprint()  # cached inversions of one grid never serve the other


def test_load_sd_enforces_sd_scheduler_settings(tmp_path, caplog):
    import json
    import shutil

    from oig.models import load_sd
    from oig.testing import make_tiny_sd

    folder = make_tiny_sd(tmp_path / "m")
    cfg_file = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_file.read_text())
    for k in ("clip_sample", "set_alpha_to_one"):
        cfg.pop(k)  # diffusers' class defaults are True
    cfg_file.write_text(json.dumps(cfg))
    with caplog.at_level("WARNING"):
        m = load_sd(str(folder), device="cpu", dtype="fp32")
    assert m.scheduler.config.clip_sample is False and m.scheduler.config.set_alpha_to_one is False
    assert "clip_sample=True" in caplog.text and str(folder) in caplog.text
    assert float(m.scheduler.final_alpha_cumprod) == float(m.scheduler.alphas_cumprod[0])
    shutil.rmtree(folder)


# ------------------------------------------------------------------ replace mapper: aligned vs the reference's
def _reference_replacement_mapper(x, y, tokenizer, max_len=77):
    """Transcription of prompt-to-prompt ``seq_aligner.get_replacement_mapper_`` (word positions by
    our per-word tokenisation, which tiles CLIP's BPE exactly as its decoded-length walk does)."""
    wx, wy = x.split(" "), y.split(" ")
    sx, sy = word_token_spans(tokenizer, x), word_token_spans(tokenizer, y)
    swaps = [k for k in range(len(wy)) if wy[k] != wx[k]]
    src = [sx[k][1] for k in swaps]
    tgt = [sy[k][1] for k in swaps]
    m = torch.zeros(max_len, max_len)
    i = j = cur = 0
    while i < max_len and j < max_len:
        if cur < len(src) and src[cur][0] == i:
            a, b = src[cur], tgt[cur]
            if len(a) == len(b):
                m[a, b] = 1
            else:
                for bt in b:
                    m[a, bt] = 1 / len(b)
            cur += 1
            i += len(a)
            j += len(b)
        elif cur < len(src):
            m[i, j] = 1
            i += 1
            j += 1
        else:
            m[j, j] = 1
            i += 1
            j += 1
    return m


@pytest.mark.parametrize("target", [TGT, "a red zebra on a gray background", "a blue square on a gray background",
                                    "a red circle on a pink background", SRC])
def test_reference_replace_mapper_equals_seq_aligner(tiny_models, target):
    from oig.p2p import replacement_mapper

    tok = tiny_models.tokenizer
    ref = _reference_replacement_mapper(SRC, target, tok)
    assert torch.equal(replacement_mapper(tok, SRC, target, mode="reference"), ref)
    aligned = replacement_mapper(tok, SRC, target)
    same_count = all(len(a) == len(b) for (_, a), (_, b) in zip(word_token_spans(tok, SRC), word_token_spans(tok, target)))
    # the two agree unless a swap changes the token count ("zebra" is 5 tokens in the tiny vocabulary)
    assert torch.equal(aligned, ref) == same_count
    ctrl = PromptToPrompt(tok, SRC, target, steps=10, edit_type="replace", mapper="reference")
    assert torch.equal(ctrl.mapper, ref)
