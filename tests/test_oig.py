"""OIG / OIG+: exactness properties on a tiny random SD-shaped model."""

import numpy as np
import pytest
import torch

from oig.oig_editor import OIG, OIGPlus, official_lr, step_sizes
from oig.registry import get_editor
from oig.types import EditRequest

STEPS = 6


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from oig.testing import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("clip"))


def _req(img, seed=0):
    return EditRequest(img, "a red circle on a gray background", "a blue square on a gray background", seed=seed)


def test_step_size_schedule_matches_reference():
    eta = step_sizes(50)
    ref = {0: 0.80, 1: 1.20, 2: 1.60, 3: 1.567, 4: 1.492, 5: 1.421, 9: 1.169, 14: 0.916, 19: 0.718, 24: 0.563,
           29: 0.441, 34: 0.345, 39: 0.271, 44: 0.212, 48: 0.174, 49: 0.174}
    for k, v in ref.items():
        assert eta[k] == pytest.approx(v, abs=6e-4), k
    assert official_lr(0, 50) == pytest.approx(0.4)
    assert step_sizes(10, "constant", 0.3) == [0.3] * 10
    with pytest.raises(ValueError, match="step-size schedule"):
        step_sizes(10, "cosine")


def test_zero_lambdas_equal_ddim_word_swap(tiny_models, rand_image):
    ws = get_editor("ddim_word_swap")(steps=STEPS).bind(tiny_models)
    oig = OIG(lambda1=0.0, lambda2=0.0, steps=STEPS, clip_model="unused").bind(tiny_models)
    a = np.asarray(ws(_req(rand_image)).image)
    b = np.asarray(oig(_req(rand_image)).image)
    assert np.array_equal(a, b)


def test_zero_lambdas_equal_word_swap_even_with_hooks(tiny_models, rand_image, tiny_clip):
    """λ=0 with every term switched on (hooks installed, CLIP loaded) changes nothing."""
    ws = get_editor("ddim_word_swap")(steps=STEPS).bind(tiny_models)
    oig = OIG(lambda1=0.0, lambda2=0.0, steps=STEPS, clip_model=tiny_clip).bind(tiny_models)
    oig.layer_names = oig.layer_names or __import__("oig.features", fromlist=["x"]).resnet_layers(tiny_models.unet)
    a = np.asarray(ws(_req(rand_image)).image)
    b = np.asarray(oig(_req(rand_image)).image)
    assert np.array_equal(a, b)


def test_guidance_changes_output_and_is_deterministic(tiny_models, rand_image, tiny_clip):
    oig = OIG(lambda1=0.5, lambda2=1.0, steps=STEPS, clip_model=tiny_clip).bind(tiny_models)
    r1 = oig(_req(rand_image))
    r2 = oig(_req(rand_image))
    assert np.array_equal(np.asarray(r1.image), np.asarray(r2.image))
    ws = get_editor("ddim_word_swap")(steps=STEPS).bind(tiny_models)
    assert not np.array_equal(np.asarray(r1.image), np.asarray(ws(_req(rand_image)).image))
    assert r1.info["loss_struct_mean"] >= 0 and r1.info["loss_clip_mean"] >= 0
    assert r1.info["source_feature_mb"] > 0
    assert set(r1.timings) >= {"inversion", "reconstruction", "editing", "total"}


def test_only_down_and_up_resnets_are_hooked(tiny_models):
    oig = OIG(steps=STEPS, lambda1=0.0).bind(tiny_models)
    names = oig.layer_names
    assert names and all(n.startswith(("down_blocks.", "up_blocks.")) and ".resnets." in n for n in names)
    n_down = sum(len(b.resnets) for b in tiny_models.unet.down_blocks)
    n_up = sum(len(b.resnets) for b in tiny_models.unet.up_blocks)
    assert len(names) == n_down + n_up
    assert OIG(steps=STEPS, lambda1=0.0, layers="up").bind(tiny_models).layer_names == [
        n for n in names if n.startswith("up_blocks.")]
    with pytest.raises(ValueError, match="not ResnetBlock2D"):
        OIG(steps=STEPS, lambda1=0.0, layers=["down_blocks.9.resnets.0"]).bind(tiny_models)


def test_gradient_matches_finite_differences(tiny_models, rand_image, tiny_clip):
    from oig.features import FeatureHooks

    oig = OIG(lambda1=0.3, lambda2=1.0, steps=STEPS, clip_model=tiny_clip).bind(tiny_models)
    c = oig.core
    src = c.prepare(rand_image)
    z0 = c.encode_image(src)
    g = torch.Generator().manual_seed(1)
    x = z0 + 0.5 * torch.randn(z0.shape, generator=g)
    t = c.timesteps(STEPS)[2]
    emb2 = torch.cat([c.encode_text(["a red circle"]), c.encode_text(["a blue square"])])
    e_src, e_tgt = oig.clip.encode_text(["a red circle"]), oig.clip.encode_text(["a blue square"])
    with FeatureHooks(tiny_models.unet, oig.layer_names) as fh:
        with torch.no_grad():
            tiny_models.unet(torch.cat([z0, z0]), t, encoder_hidden_states=emb2)
            S = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in fh.pop().items()}
            tiny_models.unet(torch.cat([x, x]) * 1.1, t, encoder_hidden_states=emb2)
            P = fh.pop()

        def L(xn, xc):
            return oig.loss_at(xn, xc, t, emb2, S, P, e_src, e_tgt, fh)[0]

        # the reference's batch-2 forward: both copies differentiable, one U-Net call
        xn, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        g_neg, g_cond = torch.autograd.grad(L(xn, xc), (xn, xc))
        # ours: only the negative copy is differentiated, the other copy runs without autograd
        xn = x.clone().requires_grad_(True)
        (g_split,) = torch.autograd.grad(L(xn, x), xn)
        d = torch.randn(x.shape, generator=g)
        h = 1e-2
        with torch.no_grad():
            lp = L(x + h * d, x)
            lm = L(x - h * d, x)
    torch.testing.assert_close(g_split, g_neg, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(g_neg, g_cond)
    fd = float((lp - lm) / (2 * h))
    an = float((g_neg * d).sum())
    assert abs(an) > 1e-4
    assert fd == pytest.approx(an, rel=0.05, abs=1e-4)


def test_oig_plus_with_lambda4_zero_equals_oig(tiny_models, rand_image, tiny_clip):
    kw = dict(lambda1=0.3, lambda2=1.0, steps=STEPS, clip_model=tiny_clip)
    a = np.asarray(OIG(**kw).bind(tiny_models)(_req(rand_image)).image)
    b = np.asarray(OIGPlus(lambda4=0.0, **kw).bind(tiny_models)(_req(rand_image)).image)
    assert np.array_equal(a, b)
    c = OIGPlus(lambda4=0.5, **kw).bind(tiny_models)(_req(rand_image))
    assert not np.array_equal(a, np.asarray(c.image))
    assert c.info["loss_cycle_tgt_mean"] > 0


def test_ablation_switches_validate_and_change_output(tiny_models, rand_image, tiny_clip):
    with pytest.raises(ValueError, match="clip_term"):
        OIG(clip_term="both")
    base = dict(lambda1=0.3, lambda2=1.0, steps=STEPS, clip_model=tiny_clip)
    ref = np.asarray(OIG(**base).bind(tiny_models)(_req(rand_image)).image)
    for kw in ({"struct_term": "positive_only"}, {"clip_term": "target_only"}, {"grad_branch": "both"},
               {"lr_schedule": "constant", "lr": 0.5}, {"guide_range": (0.0, 0.5)}):
        out = np.asarray(OIG(**{**base, **kw}).bind(tiny_models)(_req(rand_image)).image)
        assert out.shape == ref.shape
        assert not np.array_equal(out, ref), kw
    off = OIG(**{**base, "clip_term": "off", "struct_term": "off"}).bind(tiny_models)
    ws = get_editor("ddim_word_swap")(steps=STEPS).bind(tiny_models)
    assert np.array_equal(np.asarray(off(_req(rand_image)).image), np.asarray(ws(_req(rand_image)).image))


def test_cached_reconstruction_gives_the_same_edit(tiny_models, rand_image, tiny_clip, tmp_path):
    from oig.cache import InversionCache

    cache = InversionCache(tmp_path)
    ed = OIG(lambda1=0.3, lambda2=1.0, steps=STEPS, clip_model=tiny_clip).bind(tiny_models, cache=cache)
    a, b = ed(_req(rand_image)), ed(_req(rand_image))
    assert not a.info["reconstruction_cached"] and b.info["reconstruction_cached"] and b.info["inversion_cached"]
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert np.array_equal(np.asarray(a.reconstruction), np.asarray(b.reconstruction))
    assert cache.stats()["cache_reconstruction_hits"] == 1
    uncached = OIG(lambda1=0.3, lambda2=1.0, steps=STEPS, clip_model=tiny_clip).bind(tiny_models)
    assert np.array_equal(np.asarray(uncached(_req(rand_image)).image), np.asarray(a.image))


def test_same_prompt_reconstruction_is_one_forward_per_step(tiny_models, rand_image):
    """Real images: negative = source prompt, so ε̂ = ε(x, y_src); the batch-1 pass equals CFG sampling."""
    oig = OIG(lambda1=0.0, lambda2=1.0, steps=STEPS).bind(tiny_models)
    c = oig.core
    ts, d = c.timesteps(STEPS), c.step_size(STEPS)
    emb = c.encode_text(["a red circle on a gray background"])
    xT = c.noise((1, 4, 8, 8), 3)
    calls = []
    h = tiny_models.unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        z, S = oig._reconstruct(xT, torch.cat([emb, emb]), ts, d)
    finally:
        h.remove()
    assert calls == [1] * STEPS
    assert all(v.shape[0] == 1 for s in S for v in s.values())
    ref = c.sample(xT, emb, emb, oig.guidance, STEPS)
    torch.testing.assert_close(z, ref, rtol=1e-5, atol=1e-5)


def test_inactive_hinges_change_nothing(tiny_models, rand_image, tiny_clip):
    """A hinge at 0 has no gradient: left out of the backward, the edit equals the one without that term."""
    base = dict(steps=STEPS, clip_model=tiny_clip)
    no_clip = np.asarray(OIG(lambda1=0.0, lambda2=1.0, **base).bind(tiny_models)(_req(rand_image)).image)
    r = OIG(lambda1=0.5, lambda2=1.0, beta_p=-10.0, **base).bind(tiny_models)(_req(rand_image))
    assert r.info["loss_clip_mean"] == 0.0
    assert np.array_equal(np.asarray(r.image), no_clip)
    # β_f = 0: every hinge after the first step is at 0 (skipped); the same edit as computing
    # the zero gradient of the positive-only term, and (up to float rounding of the split CFG
    # forward) plain word swap
    r = OIG(lambda1=0.0, lambda2=1.0, beta_f=0.0, **base).bind(tiny_models)(_req(rand_image))
    pos = OIG(lambda1=0.0, lambda2=1.0, beta_f=0.0, struct_term="positive_only", **base).bind(tiny_models)
    assert r.info["loss_struct_mean"] == 0.0
    assert np.array_equal(np.asarray(r.image), np.asarray(pos(_req(rand_image)).image))
    ws = np.asarray(get_editor("ddim_word_swap")(steps=STEPS).bind(tiny_models)(_req(rand_image)).image)
    assert np.abs(np.asarray(r.image).astype(int) - ws).max() <= 2
