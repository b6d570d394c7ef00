"""Pix2Pix-Zero against its protocols (issue #14): the official regularised inversion and PIE-Bench's
patched copy against transcriptions of their loops, per-concept edit directions from sentence files
and from official-format ``.pt`` embeddings, the shipped toy sentence sets, BLIP captions, the
scheduler guard, and configuration errors.

The transcriptions below are written from pix2pix-zero (github.com/pix2pixzero/pix2pix-zero,
16e5c1d) and PIE-Bench (github.com/cure-lab/PnPInversion, 07f97f4); file:line in each docstring.
Their ``randrange`` draws are replaced by draws from a seeded ``torch.Generator`` in the same order.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from baselines.pix2pix_zero import (EMPTY_CONCEPT, TOY_SENTENCES_DIR, Pix2PixZero, RollDraw, concept_stem,
                                    inversion_schedule)
from oig.editor import EditError
from oig.types import EditRequest

SRC = "a red circle on a gray background"
TGT = "a red square on a gray background"
WORDS = {"source_word": "circle", "target_word": "square"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def toy_models():
    from oig.models import load_sd

    return load_sd("toy", device="cpu", dtype="fp32")


def arr(img):
    return np.asarray(img).astype(np.int16)


def source_latent(ed, img):
    return ed.core.encode_image(ed.core.prepare(img))


# ------------------------------------------------------------------ transcriptions of the references
def reference_inversion(models, z0, prompt, steps, gen, *, pie_bench=False, guidance_scale=1.0, lambda_ac=20.0,
                        lambda_kl=20.0, num_reg_steps=5, num_ac_rolls=5):
    """pix2pix-zero ``src/utils/ddim_inv.py`` (auto_corr_loss :23-39, kl_divergence :41-44, loop :75-133) with
    its ``DDIMInverseScheduler`` (``src/utils/scheduler.py``: alphas :133-147, set_timesteps :203-208,
    step(reverse=True) :224-236). ``pie_bench``: PIE-Bench's copy, ``models/pix2pix_zero/ddim_inv.py:32``
    (``randrange(H//2)``), ``:102`` (every timestep) and ``scheduler.py:232-235`` (abar[-1] past T)."""
    unet, tok, te = models.unet, models.tokenizer, models.text_encoder
    cfg = models.scheduler.config

    def randrange(a, b=None):
        if b is None:
            a, b = 0, a
        if b <= a:
            raise ValueError("empty range for randrange")
        return int(torch.randint(a, b, (1,), generator=gen).item())

    def auto_corr_loss(x):
        B, C, H, W = x.shape
        assert B == 1
        x = x.squeeze(0)
        reg_loss = 0.0
        for ch_idx in range(x.shape[0]):
            noise = x[ch_idx][None, None, :, :]
            while True:
                roll_amount = randrange(noise.shape[2] // 2) if pie_bench else randrange(1, noise.shape[2] // 2)
                reg_loss += (noise * torch.roll(noise, shifts=roll_amount, dims=2)).mean() ** 2
                reg_loss += (noise * torch.roll(noise, shifts=roll_amount, dims=3)).mean() ** 2
                if noise.shape[2] <= 8:
                    break
                noise = torch.nn.functional.avg_pool2d(noise, kernel_size=2)
        return reg_loss

    def kl_divergence(x):
        _mu = x.mean()
        _var = x.var()
        return _var + _mu**2 - 1 - torch.log(_var + 1e-7)

    T = cfg.num_train_timesteps
    assert cfg.beta_schedule == "scaled_linear"
    betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, T, dtype=torch.float32) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    final_alpha_cumprod = alphas_cumprod[0]  # set_alpha_to_one=False
    step_ratio = T // steps
    timesteps = torch.from_numpy((np.arange(0, steps) * step_ratio).round()[::-1].copy().astype(np.int64))
    timesteps += cfg.steps_offset

    def step(e_t, timestep, x):
        prev_timestep = timestep + T // steps
        a_t = alphas_cumprod[timestep - 1]
        if pie_bench:
            a_prev = alphas_cumprod[prev_timestep - 1] if prev_timestep <= T else alphas_cumprod[-1]
        else:
            a_prev = alphas_cumprod[prev_timestep - 1] if prev_timestep >= 0 else final_alpha_cumprod
        pred_x0 = (x - (1 - a_t) ** 0.5 * e_t) / a_t.sqrt()
        dir_xt = (1.0 - a_prev).sqrt() * e_t
        return a_prev.sqrt() * pred_x0 + dir_xt

    def embed(p):
        ids = tok(p, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        return te(ids)[0]

    do_cfg = guidance_scale > 1.0
    with torch.no_grad():
        prompt_embeds = torch.cat([embed(""), embed(prompt)]) if do_cfg else embed(prompt)
    latents = z0
    seq = timesteps.flip(0) if pie_bench else timesteps.flip(0)[1:-1]
    for t in seq:
        latent_model_input = torch.cat([latents] * 2) if do_cfg else latents
        with torch.no_grad():
            noise_pred = unet(latent_model_input, t, encoder_hidden_states=prompt_embeds).sample
        if do_cfg:
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
        e_t = noise_pred
        for _outer in range(num_reg_steps):
            if lambda_ac > 0:
                for _inner in range(num_ac_rolls):
                    _var = e_t.detach().clone().requires_grad_(True)
                    l_ac = auto_corr_loss(_var)
                    l_ac.backward()
                    _grad = _var.grad.detach() / num_ac_rolls
                    e_t = e_t - lambda_ac * _grad
            if lambda_kl > 0:
                _var = e_t.detach().clone().requires_grad_(True)
                l_kld = kl_divergence(_var)
                l_kld.backward()
                _grad = _var.grad.detach()
                e_t = e_t - lambda_kl * _grad
            e_t = e_t.detach()
        latents = step(e_t, t, latents)
    return latents


def reference_sentence_embeddings(sentences, tok, te):
    """pix2pix-zero ``src/make_edit_direction.py:19-33``: one sentence at a time, the mean over sentences,
    unsqueezed; the result is what the script saves as ``<concept>.pt``."""
    with torch.no_grad():
        out = []
        for sent in sentences:
            ids = tok(sent, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            out.append(te(ids, attention_mask=None)[0])
    return torch.concatenate(out, dim=0).mean(dim=0).unsqueeze(0)


def reference_construct_direction(emb_dir, src, dst):
    """pix2pix-zero ``src/utils/edit_directions.py:22-27``."""
    embs_a = torch.load(Path(emb_dir) / f"{src}.pt", map_location="cpu")
    embs_b = torch.load(Path(emb_dir) / f"{dst}.pt", map_location="cpu")
    return (embs_b.mean(0) - embs_a.mean(0)).unsqueeze(0)


# ------------------------------------------------------------------ inversion
def test_schedules_are_the_references():
    off = inversion_schedule("official", 50, 1000, 1)
    assert len(off) == 48 and off[0] == (21, 20, 40) and off[-1] == (961, 960, 980)
    pb = inversion_schedule("pie_bench", 50, 1000, 1)
    assert len(pb) == 50 and pb[0] == (1, 0, 20) and pb[-2] == (961, 960, 980) and pb[-1] == (981, 980, 999)
    assert all(b[0] - a[0] == 20 for a, b in zip(pb, pb[1:]))
    # steps_offset 0: the references index abar[t - 1] = abar[-1] at t = 0 (PIE-Bench only; official starts at 20)
    assert inversion_schedule("pie_bench", 50, 1000, 0)[0] == (0, -1, 19)
    assert inversion_schedule("official", 50, 1000, 0)[0] == (20, 19, 39)
    with pytest.raises(ValueError, match="unknown inversion schedule"):
        inversion_schedule("standard", 50, 1000, 1)


def test_roll_ranges():
    g = torch.Generator().manual_seed(0)
    official, pb = RollDraw(g, 1), RollDraw(g, 0)
    assert {official(8) for _ in range(200)} == {1, 2, 3}
    assert {pb(8) for _ in range(200)} == {0, 1, 2, 3}
    assert {official(4) for _ in range(20)} == {1}
    with pytest.raises(EditError, match=r"latent side of 3 px is too small.*\[1, 3//2\)"):
        official(3)
    assert pb(2) == 0
    with pytest.raises(EditError, match="too small"):
        pb(1)


@pytest.mark.parametrize("kind,guidance", [("official", 1.0), ("official", 3.0), ("pie_bench", 1.0)])
def test_inversion_matches_reference_loop(tiny_models, toy_image, kind, guidance):
    steps, seed = 5, 11
    ed = Pix2PixZero(steps=steps, inversion=kind, invert_guidance=guidance).bind(tiny_models)
    z0 = source_latent(ed, toy_image[0])
    assert z0.shape == (1, 4, 8, 8)
    ours = ed.invert_latent(z0, SRC, seed)
    ref = reference_inversion(tiny_models, z0, SRC, steps, torch.Generator().manual_seed(seed),
                              pie_bench=kind == "pie_bench", guidance_scale=guidance)
    assert torch.isfinite(ref).all() and ours.dtype == ref.dtype
    assert torch.equal(ours, ref), (ours - ref).abs().max()  # bit-identical on the CPU in fp32
    # the rolls matter: another seed gives another latent
    assert not torch.allclose(ed.invert_latent(z0, SRC, seed + 1), ref, rtol=1e-4, atol=1e-4)
    # the other reference differs (schedule and roll range)
    other = reference_inversion(tiny_models, z0, SRC, steps, torch.Generator().manual_seed(seed),
                                pie_bench=kind != "pie_bench", guidance_scale=guidance)
    assert not torch.allclose(ours, other, rtol=1e-3, atol=1e-3)


def test_official_inversion_without_regularisation_is_core_p2pzero(tiny_models, toy_image):
    ed = Pix2PixZero(steps=6, inversion="official", num_reg_steps=0).bind(tiny_models)
    z0 = source_latent(ed, toy_image[0])
    ours = ed.invert_latent(z0, SRC, 0)
    core = ed.core.invert(z0, ed.core.encode_text([SRC]), steps=6, convention="p2pzero").xT
    assert torch.allclose(ours, core, rtol=1e-6, atol=1e-6)


def test_official_inversion_on_toy_latent_two_levels(toy_models):
    """The toy model's 16x16 latent runs two levels of the auto-correlation pyramid (16 and 8)."""
    from oig.toy import world
    import random

    ed = Pix2PixZero(steps=4, inversion="official").bind(toy_models)
    img = Image.fromarray(world.render(world.random_scene(random.Random(3), striped=False)))
    z0 = source_latent(ed, img)
    assert z0.shape[-1] == 16
    ours = ed.invert_latent(z0, SRC, 5)
    ref = reference_inversion(toy_models, z0, SRC, 4, torch.Generator().manual_seed(5))
    assert torch.equal(ours, ref), (ours - ref).abs().max()


def test_edit_pass_starts_from_the_official_inversion(tiny_models, toy_image):
    from oig.attention import attn_processors

    ed = Pix2PixZero(steps=4, inversion="official", xa_guidance=20.0).bind(tiny_models)
    r = ed(EditRequest(toy_image[0], SRC, TGT, seed=3))
    m = tiny_models
    z0 = source_latent(ed, toy_image[0])
    xT = reference_inversion(m, z0, SRC, 4, torch.Generator().manual_seed(3))
    pipe = ed.pipe
    with attn_processors(m.unet, dict(m.unet.attn_processors)):
        ref = pipe(prompt=SRC, source_embeds=pipe.get_embeds([SRC]), target_embeds=pipe.get_embeds([TGT]),
                   num_inference_steps=4, guidance_scale=5.0, negative_prompt=SRC,
                   generator=torch.Generator().manual_seed(3), latents=xT,
                   cross_attention_guidance_amount=20.0).images[0]
    m.unet.requires_grad_(False)
    m.unet.zero_grad(set_to_none=True)
    assert np.array_equal(arr(r.image), arr(ref))
    assert not any(p.requires_grad for p in m.unet.parameters())


# ------------------------------------------------------------------ directions
def test_concept_stem_rule():
    assert concept_stem("cat") == "cat"
    assert concept_stem("cat wearing glasses") == "cat_wearing_glasses"
    assert concept_stem("  Tree  in\tfall ") == "tree_in_fall"
    assert concept_stem("") == concept_stem("   ") == EMPTY_CONCEPT == "_empty"
    for bad in ("../cat", "a/b", ".hidden"):
        with pytest.raises(EditError, match="cannot name a file"):
            concept_stem(bad)


def test_official_pt_embeddings_give_construct_direction(tiny_models, tmp_path):
    m = tiny_models
    cats = ["a red circle on a gray background", "a circle", "a blue circle on a pink background"]
    dogs = ["a red square on a gray background", "a green square"]
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "circle.txt").write_text("\n".join(cats) + "\n")
    (tmp_path / "txt" / "square.txt").write_text("\n".join(dogs) + "\n")
    pt = tmp_path / "pt"
    pt.mkdir()
    torch.save(reference_sentence_embeddings(cats, m.tokenizer, m.text_encoder), pt / "circle.pt")
    torch.save(reference_sentence_embeddings(dogs, m.tokenizer, m.text_encoder), pt / "square.pt")
    req = EditRequest(None, SRC, TGT, meta=dict(WORDS))

    ed = Pix2PixZero(steps=4, directions="embeddings", embeddings_dir=str(pt)).bind(m)
    want = reference_construct_direction(pt, "circle", "square")
    got = ed.edit_direction(req)
    assert got.shape == (1, m.tokenizer.model_max_length, 32) and torch.equal(got, want)
    # the same sentences through directions=sentences give the same direction (batched encoding: float rounding)
    ed_s = Pix2PixZero(steps=4, directions="sentences", sentences_dir=str(tmp_path / "txt")).bind(m)
    assert torch.allclose(ed_s.edit_direction(req), want, atol=1e-5)
    # ... and so does a file holding every sentence's embedding (N, tokens, dim): the official mean(0)
    enc = ed.core.encode_text
    torch.save(torch.cat([enc([s]) for s in cats]), pt / "circle.pt")
    torch.save(torch.cat([enc([s]) for s in dogs]), pt / "square.pt")
    ed2 = Pix2PixZero(steps=4, directions="embeddings", embeddings_dir=str(pt)).bind(m)
    assert torch.equal(ed2.edit_direction(req), reference_construct_direction(pt, "circle", "square"))
    assert torch.allclose(ed2.edit_direction(req), want, atol=1e-5)
    # fp16 files (as the shipped horse.pt / zebra.pt) are used as stored: the difference is taken in fp16
    torch.save(want.new_zeros(1, 77, 32).half() + 0.3, pt / "horse.pt")
    torch.save(torch.linspace(0, 1, 77 * 32).reshape(1, 77, 32).half(), pt / "zebra.pt")
    req_hz = EditRequest(None, SRC, TGT, meta={"source_word": "horse", "target_word": "zebra"})
    d = ed2.edit_direction(req_hz)
    assert d.dtype == torch.float16 and torch.equal(d, reference_construct_direction(pt, "horse", "zebra"))


def test_concept_files_are_read_once_and_errors_name_file_and_concept(tiny_models, tmp_path):
    (tmp_path / "circle.txt").write_text("a circle\n")
    (tmp_path / "square.txt").write_text("a square\n")
    (tmp_path / "empty_words.txt").write_text("\n\n")
    ed = Pix2PixZero(steps=4, directions="sentences", sentences_dir=str(tmp_path)).bind(tiny_models)
    calls = []
    real = ed.pipe.get_embeds
    ed.pipe.get_embeds = lambda s, *a, **k: calls.append(list(s)) or real(s, *a, **k)
    for _ in range(3):
        ed.direction_embeds(EditRequest(None, SRC, TGT, meta=dict(WORDS)))
        ed.direction_embeds(EditRequest(None, TGT, SRC, meta={"source_word": "square", "target_word": "circle"}))
    assert calls == [["a circle"], ["a square"]]
    with pytest.raises(EditError, match=re.escape(str(tmp_path / "triangle.txt")) + r".*concept 'Triangle'"):
        ed.direction_embeds(EditRequest(None, SRC, TGT, meta={"source_word": "circle", "target_word": "Triangle"}))
    with pytest.raises(EditError, match=re.escape(str(tmp_path / "_empty.txt")) + r".*concept ''"):
        ed.direction_embeds(EditRequest(None, SRC, TGT, meta={"source_word": "", "target_word": "circle"}))
    with pytest.raises(EditError, match="empty_words.txt: no sentences"):
        ed.direction_embeds(EditRequest(None, SRC, TGT, meta={"source_word": "empty words", "target_word": "circle"}))
    with pytest.raises(EditError, match="sample s7 has no edit words"):
        ed.direction_embeds(EditRequest(None, SRC, TGT, id="s7"))
    # PIE-Bench's blended_word is read too
    s, t = ed.direction_embeds(EditRequest(None, SRC, TGT, meta={"blended_word": "square circle"}))
    assert torch.equal(s, ed._concepts["square"]) and torch.equal(t, ed._concepts["circle"])

    pt = tmp_path / "pt"
    pt.mkdir()
    torch.save(torch.zeros(77, 32), pt / "circle.pt")
    torch.save(torch.zeros(1, 77, 768), pt / "square.pt")
    torch.save({"emb": torch.zeros(1, 77, 32)}, pt / "triangle.pt")
    (pt / "red.pt").write_text("not a tensor")
    ed = Pix2PixZero(steps=4, directions="embeddings", embeddings_dir=str(pt)).bind(tiny_models)
    for word, msg in [("circle", r"tensor \(77, 32\).*expected a float tensor \(N, 77, 32\)"),
                      ("square", r"tensor \(1, 77, 768\)"), ("triangle", "holds a dict"),
                      ("red", "not a readable torch file"), ("blue", "no file .*blue.pt for the concept 'blue'")]:
        with pytest.raises(EditError, match=msg):
            ed.concept_embeds(word)


def test_toy_sentence_files_cover_the_toy_world():
    from oig.toy import world
    from oig.toy.tokenizer import WORDS as VOCAB

    concepts = set(world.SHAPES) | set(world.COLORS) | set(world.BACKGROUNDS) | {"striped", EMPTY_CONCEPT}
    files = {p.stem: p for p in TOY_SENTENCES_DIR.glob("*.txt")}
    assert set(files) == concepts
    grammar = re.compile(r"a (striped )?(\w+) (\w+) on a (\w+) background")
    for stem, p in files.items():
        lines = p.read_text().splitlines()
        assert 10 <= len(lines) <= 30 and len(set(lines)) == len(lines), stem
        for ln in lines:
            mt = grammar.fullmatch(ln)
            assert mt, ln
            assert mt.group(2) in world.COLORS and mt.group(3) in world.SHAPES and mt.group(4) in world.BACKGROUNDS
            assert set(ln.split()) <= set(VOCAB)
            if stem == "striped":
                assert mt.group(1)
            elif stem == EMPTY_CONCEPT:
                assert not mt.group(1)
            else:
                assert stem in ln.split()
    # striped and _empty: the same captions but the word, so the direction is the word's alone
    assert [ln.replace("striped ", "") for ln in files["striped"].read_text().splitlines()] == \
        files[EMPTY_CONCEPT].read_text().splitlines()


def test_toy_world_edit_with_sentence_directions(toy_models):
    from oig.data.toyworld import ToyWorld

    ed = Pix2PixZero(steps=3, inversion="official", directions="sentences", sentences_dir="toy").bind(toy_models)
    encoded = []
    real = ed.pipe.get_embeds
    ed.pipe.get_embeds = lambda s, *a, **k: encoded.append(len(s)) or real(s, *a, **k)
    samples = list(ToyWorld(n_per_task=1))
    assert {s.task for s in samples} == {"shape_swap", "color_change", "background_change", "appearance_change"}
    concepts = set()
    for s in samples:
        req = EditRequest.from_sample(s, seed=0)
        sw, tw = req.edit_words()
        concepts |= {concept_stem(sw), concept_stem(tw)}
        r = ed(req)
        assert r.image.size == r.source.size == (64, 64)
        assert r.info["direction"] == f"{concept_stem(sw)}->{concept_stem(tw)}"
        # the direction is mean(target file) - mean(source file), encoded independently here
        lines = [(TOY_SENTENCES_DIR / f"{concept_stem(w)}.txt").read_text().splitlines() for w in (sw, tw)]
        want = ed.core.encode_text(lines[1]).mean(0, keepdim=True) - ed.core.encode_text(lines[0]).mean(0, keepdim=True)
        assert torch.allclose(ed.edit_direction(req), want, atol=1e-5)
        if s.task == "appearance_change":
            assert (sw, tw) == ("", "striped") and r.info["direction"] == "_empty->striped"
    assert len(encoded) == len(concepts)  # each concept file encoded once for the whole run


def test_runner_missing_concept_file_is_an_error_row(tmp_path):
    import shutil

    import pandas as pd
    from hydra import compose, initialize_config_dir

    from oig.run import CONF_DIR, run

    sdir = tmp_path / "sentences"
    sdir.mkdir()
    for p in TOY_SENTENCES_DIR.glob("*.txt"):
        if p.stem != "striped":
            shutil.copy(p, sdir / p.name)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "model=toy", "dataset=toyworld", "dataset.n_per_task=1", "metrics=none", "progress=false",
            f"cache.dir={tmp_path}/cache", "method=pix2pix_zero", "method.steps=3", "method.directions=sentences",
            f"method.sentences_dir={sdir}", "method.inversion=official"])
    summary = run(cfg, output_dir=tmp_path / "run")
    df = pd.read_parquet(tmp_path / "run" / "results.parquet").set_index("id")
    assert summary["samples"] == 4 and summary["errors"] == 1
    from oig.data.toyworld import ToyWorld

    for s in ToyWorld(n_per_task=1):
        row = df.loc[s.id]
        if s.task == "appearance_change":
            assert row.status == "error" and str(sdir / "striped.txt") in row.error and "concept 'striped'" in row.error
        else:
            assert row.status == "ok", row.error
            assert row.direction == f"{s.meta['source_word']}->{s.meta['target_word']}"
    assert (df.hp_directions == "sentences").all() and (df.hp_inversion == "official").all()


# ------------------------------------------------------------------ captions
def _tiny_blip(folder: Path) -> str:
    """A random tiny BLIP captioner with a processor built offline (the approach of tests/test_data_prompts.py)."""
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    folder.mkdir(parents=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "picture", "of", "red", "blue", "circle",
             "square", "on", "gray", "background", "striped"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = BertTokenizer(str(folder / "vocab.txt"), model_max_length=32)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    proc = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok)
    cfg = BlipConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, bos_token_id=tok.bos_token_id,
                         sep_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=32)
    torch.manual_seed(1)
    BlipForConditionalGeneration(cfg).save_pretrained(folder)
    proc.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("inversion", ["diffusers", "official"])
def test_blip_caption_is_inversion_reference_base_and_negative(tiny_models, toy_image, tmp_path, inversion):
    from oig.data.prompts import Captioner

    blip = {"model": _tiny_blip(tmp_path / "blip"), "device": "cpu", "num_beams": 2, "max_length": 12,
            "min_length": 4}
    (tmp_path / "circle.txt").write_text("a red circle\na blue circle\n")
    (tmp_path / "square.txt").write_text("a red square\n")
    common = dict(steps=4, inversion=inversion, xa_guidance=20.0, directions="sentences", sentences_dir=str(tmp_path))
    ed = Pix2PixZero(caption="blip", captioner=blip, **common).bind(tiny_models)
    r = ed(EditRequest(toy_image[0], SRC, TGT, seed=2, meta=dict(WORDS)))
    caption = Captioner(**blip)(r.source)
    assert r.info["caption"] == caption and caption and caption != SRC
    # the same edit with the caption given as the dataset's source prompt: identical
    ref = Pix2PixZero(caption="dataset", **common).bind(tiny_models)
    r2 = ref(EditRequest(toy_image[0], caption, "anything", seed=2, meta=dict(WORDS)))
    assert "caption" not in r2.info and np.array_equal(arr(r.image), arr(r2.image))
    # and not the same as with the dataset's prompt
    r3 = ref(EditRequest(toy_image[0], SRC, TGT, seed=2, meta=dict(WORDS)))
    assert not np.array_equal(arr(r.image), arr(r3.image))


def test_blip_caption_calls_see_the_caption(tiny_models, toy_image, tmp_path):
    """Where each string goes: inversion prompt, pipeline prompt and negative prompt are the caption."""
    ed = Pix2PixZero(steps=4, caption="blip", captioner=lambda img: "a blue square").bind(tiny_models)
    seen = {}

    class Spy:
        def __init__(self, pipe):
            self.pipe = pipe

        def __getattr__(self, name):
            return getattr(self.pipe, name)

        def __call__(self, **kw):
            seen["call"] = kw
            return self.pipe(**kw)

        def invert(self, **kw):
            seen["invert"] = kw
            return self.pipe.invert(**kw)

    ed.pipe = Spy(ed.pipe)
    r = ed(EditRequest(toy_image[0], SRC, TGT, seed=0))
    assert r.info["caption"] == "a blue square"
    assert seen["invert"]["prompt"] == seen["call"]["prompt"] == seen["call"]["negative_prompt"] == "a blue square"
    # directions=prompts stays the dataset's two prompts (PIE-Bench: load_sentence_embeddings([prompt_src]))
    assert torch.equal(seen["call"]["source_embeds"], ed.pipe.get_embeds([SRC]))
    assert torch.equal(seen["call"]["target_embeds"], ed.pipe.get_embeds([TGT]))
    with pytest.raises(EditError, match="empty caption"):
        Pix2PixZero(steps=4, caption="blip", captioner=lambda img: "  ").bind(tiny_models)(
            EditRequest(toy_image[0], SRC, TGT))


# ------------------------------------------------------------------ schedulers and configuration
def test_bind_builds_sd_schedulers(tiny_models, caplog):
    import dataclasses

    from diffusers import DDIMScheduler

    ed = Pix2PixZero(steps=4).bind(tiny_models)
    for s in (ed.pipe.scheduler, ed.pipe.inverse_scheduler):
        assert s.config.clip_sample is False and s.config.set_alpha_to_one is False
    # a scheduler config with diffusers' class defaults (both True) is overridden, with a warning
    cfg = {k: v for k, v in tiny_models.scheduler.config.items() if k not in ("clip_sample", "set_alpha_to_one")}
    bad = dataclasses.replace(tiny_models, scheduler=DDIMScheduler.from_config(cfg))
    assert bad.scheduler.config.clip_sample is True and bad.scheduler.config.set_alpha_to_one is True
    with caplog.at_level(logging.WARNING, logger="baselines.pix2pix_zero"):
        ed = Pix2PixZero(steps=4).bind(bad)
    assert "clip_sample" in caplog.text and "set_alpha_to_one" in caplog.text
    for s in (ed.pipe.scheduler, ed.pipe.inverse_scheduler):
        assert s.config.clip_sample is False and s.config.set_alpha_to_one is False
    assert float(ed.pipe.inverse_scheduler.initial_alpha_cumprod) == float(tiny_models.scheduler.alphas_cumprod[0])
    assert float(ed.pipe.scheduler.final_alpha_cumprod) == float(tiny_models.scheduler.alphas_cumprod[0])


def test_configuration_errors(tmp_path):
    (tmp_path / "a.txt").write_text("a cat\n")
    with pytest.raises(ValueError, match="inversion='ddim': use one of diffusers, official, pie_bench"):
        Pix2PixZero(inversion="ddim")
    with pytest.raises(ValueError, match="steps=2 leaves none"):
        Pix2PixZero(inversion="official", steps=2)
    with pytest.raises(ValueError, match="directions='words'"):
        Pix2PixZero(directions="words")
    with pytest.raises(ValueError, match="directions=sentences needs sentences_dir"):
        Pix2PixZero(directions="sentences")
    with pytest.raises(ValueError, match="directions=embeddings needs embeddings_dir"):
        Pix2PixZero(directions="embeddings", sentences_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"embeddings_dir='/nonexistent/emb': .*folder not found"):
        Pix2PixZero(directions="embeddings", embeddings_dir="/nonexistent/emb")
    with pytest.raises(ValueError, match="directions=files needs source_sentences and target_sentences"):
        Pix2PixZero(directions="files")
    with pytest.raises(ValueError, match="directions='embeddings' does not read them"):
        Pix2PixZero(directions="embeddings", embeddings_dir=str(tmp_path), source_sentences=str(tmp_path / "a.txt"),
                    target_sentences=str(tmp_path / "a.txt"))
    with pytest.raises(ValueError, match="caption='coco'"):
        Pix2PixZero(caption="coco")
    with pytest.raises(ValueError, match="captioner is only used with caption=blip"):
        Pix2PixZero(captioner="Salesforce/blip-image-captioning-base")
    # giving the two global files selects directions=files (the pre-existing configuration keeps working)
    ed = Pix2PixZero(source_sentences=str(tmp_path / "a.txt"), target_sentences=str(tmp_path / "a.txt"))
    assert ed.directions == "files" and ed.hparams()["directions"] == "files"
    assert Pix2PixZero(directions="sentences", sentences_dir="toy")._concept_dir == TOY_SENTENCES_DIR
