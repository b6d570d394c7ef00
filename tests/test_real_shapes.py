"""Real-shape tests: every editor and both real metric presets end to end through the runner on the
twin zoo (:mod:`oig.testing.twin`), i.e. random weights in Stable Diffusion's and the metric
models' published architectures, loaded through the same code paths as downloaded weights.

The zoo is built once per module at 128 px, the smallest size that keeps every SD layer
shape (latents 16x16 down to 2x2 at the deepest level; the landscape sample: 16x8 down to
2x1), into a temporary folder removed at the end (``OIG_TWIN_DIR=/path`` keeps and reuses
one). Editors run 2 steps. Each test asserts rows ``ok``, image sizes, finite outputs, and the
layers the editor hooks, named as in SD: OIG's 20 ResNet blocks of the down/up blocks, PnP's
``up_blocks.1.resnets.1`` and decoder self-attention 4-11, MasaCtrl's self-attention from
transformer layer 10 of 16, Prompt-to-Prompt's self-attention at <= half the latent side.

Memory: one SD-shaped model at a time (the model caches are cleared before InstructPix2Pix
and SD 2.x); about 6 GB peak. One OIG edit at 512 px runs on a GPU, or on the CPU with
``OIG_TEST_512=1`` (about 10 CPU-minutes).
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from oig.run import CONF_DIR, run

real_shape = pytest.mark.real_shape

RES = 128
STEPS = "method.steps=2"
SD14_RESNETS = [f"down_blocks.{b}.resnets.{r}" for b in range(4) for r in range(2)] + \
               [f"up_blocks.{b}.resnets.{r}" for b in range(4) for r in range(3)]


def _attn1(*blocks: str) -> set[str]:
    """``<block>.attentions.<i>.transformer_blocks.0.attn1`` names; ``blocks`` like ``up_blocks.2:3``
    (3 attentions) or ``mid_block:1``."""
    out = set()
    for spec in blocks:
        b, n = spec.split(":")
        out |= {f"{b}.attentions.{i}.transformer_blocks.0.attn1" for i in range(int(n))}
    return out


# ------------------------------------------------------------------------------------------ fixtures
def free_models():
    """Drop the memoised SD models and CLIPs so the next model does not sit beside the last one."""
    import oig.clip
    import oig.models

    oig.models.clear_loaded()
    oig.clip._CACHE.clear()
    gc.collect()


@pytest.fixture(scope="module")
def twin_dir(tmp_path_factory):
    from oig.testing import twin

    keep = os.environ.get("OIG_TWIN_DIR")
    d = Path(keep) if keep else tmp_path_factory.mktemp("twin")
    twin.build(d, resolution=RES)
    yield d
    free_models()
    if not keep:
        shutil.rmtree(d, ignore_errors=True)  # a few GB: not left behind in pytest's temp folders


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder dataset: a landscape toy scene (192x128 -> 128x64, latents 16x8) with a mask, and a
    square one (64x64 -> 128x128) without a mask whose source prompt comes from the captioner."""
    import random

    from oig.toy import world

    d = tmp_path_factory.mktemp("real_shape_images")
    s = world.random_scene(random.Random(3), striped=False)
    Image.fromarray(world.render(s)).resize((192, 128), Image.BICUBIC).save(d / "wide.png")
    m = np.zeros((128, 192), np.uint8)
    m[32:96, 48:144] = 255
    Image.fromarray(m).save(d / "wide_mask.png")
    s2 = world.random_scene(random.Random(4), striped=False)
    Image.fromarray(world.render(s2)).save(d / "square.png")
    tgt = s.caption.replace(s.shape, "square" if s.shape != "square" else "circle", 1)
    pd.DataFrame([{"file": "wide.png", "source_prompt": s.caption, "target_prompt": tgt, "mask": "wide_mask.png"}]) \
        .to_csv(d / "wide.csv", index=False)
    pd.DataFrame([{"file": "wide.png", "source_prompt": s.caption, "target_prompt": tgt, "mask": "wide_mask.png"},
                  {"file": "square.png", "source_prompt": "", "target_prompt": "a photo of a blue square",
                   "mask": ""}]).to_csv(d / "both.csv", index=False)
    return d


def _cfg(overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _base(twin_dir, tmp_path, images, table="wide.csv", model="sd14"):
    from oig.testing import twin

    return [f"model={'sd21' if model == 'sd21base' else model}", *twin.overrides(twin_dir, model),
            "dataset=folder", f"dataset.path={images}", f"dataset.prompts_file={images / table}",
            f"cache.dir={tmp_path}/cache", "progress=false", "metrics=none", "device=cpu", "dtype=fp32"]


class Spy:
    """Records the ResNet blocks FeatureHooks hook and the attention layers a controller acts on
    (name, tokens) while the runner runs, without changing what they compute."""

    def __init__(self, monkeypatch):
        from oig.attn_control import ControlProcessor
        from oig.features import FeatureHooks

        self.feature_layers: list[list[str]] = []
        self.attn: dict[str, set[tuple[str, int]]] = {}
        enter, call = FeatureHooks.__enter__, ControlProcessor.__call__
        spy = self

        def spy_enter(self):
            spy.feature_layers.append(list(self.layers))
            return enter(self)

        def spy_call(self, attn, hidden_states, *a, **k):
            if self.controller.active(self.layer):
                tokens = hidden_states.shape[1] if hidden_states.ndim == 3 else math.prod(hidden_states.shape[2:])
                spy.attn.setdefault(type(self.controller).__name__, set()).add((self.layer.name, int(tokens)))
            return call(self, attn, hidden_states, *a, **k)

        monkeypatch.setattr(FeatureHooks, "__enter__", spy_enter)
        monkeypatch.setattr(ControlProcessor, "__call__", spy_call)

    def self_layers(self, controller: str) -> dict[str, int]:
        """Self-attention layers the controller acted on -> their token count."""
        return {n: t for n, t in self.attn.get(controller, set()) if n.endswith("attn1")}


def _run_ok(cfg, out: Path, sizes: dict[str, tuple[int, int]]) -> pd.DataFrame:
    run(cfg, output_dir=out)
    df = pd.read_parquet(out / "results.parquet")
    assert (df.status == "ok").all(), df[["id", "error"]].to_dict("records")
    assert sorted(df.id) == sorted(sizes)
    for i, size in sizes.items():
        for k in ("source", "edit"):
            im = np.asarray(Image.open(out / "images" / i / f"{k}.png"))
            assert im.shape == (size[1], size[0], 3), (i, k, im.shape)
        assert np.asarray(Image.open(out / "images" / i / "edit.png")).std() > 0  # not a blank (NaN-decoded) image
    assert np.isfinite(df.peak_mem_mb).all() and np.isfinite(df.time_total).all()
    return df


WIDE = {"wide.png": (128, 64)}


# ------------------------------------------------------------------------------------------ the zoo itself
@real_shape
def test_clip_tokenizer_rebuilt_from_open_clip_bpe(twin_dir):
    """The rebuilt vocab.json is OpenAI's 49,408-token vocabulary (open_clip's encoder, entry for entry)
    and gives open_clip's token ids; SD 1.x pads with <|endoftext|>, SD 2.x with "!" (id 0), as the hubs'
    tokenizers do."""
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    vocab = json.loads((twin_dir / "sd14" / "tokenizer" / "vocab.json").read_text(encoding="utf-8"))
    ref = SimpleTokenizer().encoder
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    assert len(vocab) == len(ref) == 49408
    assert {rename.get(k, k): v for k, v in ref.items()} == vocab
    oc = open_clip.get_tokenizer("ViT-B-32")
    t1 = CLIPTokenizer.from_pretrained(twin_dir / "sd14" / "tokenizer")
    t2 = CLIPTokenizer.from_pretrained(twin_dir / "sd21base" / "tokenizer")
    prompts = ["a photo of a cat", "A Zebra, grazing in the field!!", "turn the horse into a zebra",
               "can't stop 123 apples", "a cat wearing sunglasses"]
    for p in prompts:
        ids = oc([p])[0].tolist()
        n = ids.index(49407) + 1
        assert t1(p).input_ids == ids[:n]
        assert t1(p, padding="max_length", max_length=77).input_ids == ids[:n] + [49407] * (77 - n)
        if "!" not in p:  # SD 2.x's pad token "!" is a special token for transformers: "!!" splits into pads
            assert t2(p, padding="max_length", max_length=77).input_ids == ids[:n] + [0] * (77 - n)
    assert t1("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert t1.model_max_length == t2.model_max_length == 77


@real_shape
def test_twin_configs_are_the_published_ones(twin_dir):
    """Layouts and the configuration values that decide shapes and code paths."""
    from oig.testing.twin import FOLDERS

    def cfg(*p):
        return json.loads(twin_dir.joinpath(*p).read_text())

    for sd in ("sd14", "sd21base", "sd21", "ip2p"):
        for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            assert (twin_dir / sd / sub).is_dir(), (sd, sub)
        assert cfg(sd, "model_index.json")["unet"] == ["diffusers", "UNet2DConditionModel"]
    u1, u2, u21, ui = (cfg(s, "unet", "config.json") for s in ("sd14", "sd21base", "sd21", "ip2p"))
    assert u1["block_out_channels"] == [320, 640, 1280, 1280] and u1["layers_per_block"] == 2
    assert (u1["cross_attention_dim"], u1["attention_head_dim"], u1["sample_size"]) == (768, 8, RES // 8)
    assert (u2["cross_attention_dim"], u2["attention_head_dim"], u2["use_linear_projection"]) == \
        (1024, [5, 10, 20, 20], True)
    assert (u21["upcast_attention"], u21["sample_size"]) == (True, RES * 3 // 2 // 8)
    assert ui["in_channels"] == 8 and cfg("ip2p", "scheduler", "scheduler_config.json")["_class_name"] == \
        "EulerAncestralDiscreteScheduler"
    assert cfg("sd14", "vae", "config.json")["block_out_channels"] == [128, 256, 512, 512]
    t1, t2 = cfg("sd14", "text_encoder", "config.json"), cfg("sd21base", "text_encoder", "config.json")
    assert (t1["hidden_size"], t1["num_hidden_layers"], t1["hidden_act"]) == (768, 12, "quick_gelu")
    assert (t2["hidden_size"], t2["num_hidden_layers"], t2["hidden_act"]) == (1024, 23, "gelu")
    s1, s21 = cfg("sd14", "scheduler", "scheduler_config.json"), cfg("sd21", "scheduler", "scheduler_config.json")
    assert (s1["steps_offset"], s1["clip_sample"], s1["set_alpha_to_one"]) == (1, False, False)
    assert s21["prediction_type"] == "v_prediction"
    assert cfg(FOLDERS["clip_l14"], "config.json")["vision_config"]["patch_size"] == 14
    assert cfg(FOLDERS["clipseg"], "config.json")["reduce_dim"] == 64
    assert cfg(FOLDERS["blip"], "config.json")["vision_config"]["image_size"] == 384
    for f in ("alexnet-owt-7be5be79.pth", "squeezenet1_1-b8a52dc0.pth"):
        assert (twin_dir / FOLDERS["lpips"] / "hub" / "checkpoints" / f).is_file()


@real_shape
def test_sd14_twin_loads_with_sd_shapes(twin_dir):
    """load_sd reads the twin as it reads CompVis/stable-diffusion-v1-4: the PNDM config becomes SD's DDIM,
    16 transformer layers (6 down, 1 mid, 9 up) and 20 down/up ResNet blocks, 77-token prompts."""
    from oig.attn_control import attention_layers
    from oig.diffusion import Diffusion
    from oig.features import resnet_layers
    from oig.models import load_sd

    m = load_sd(str(twin_dir / "sd14"), device="cpu", dtype="fp32")
    assert (m.resolution, m.pixel_multiple, m.vae_scale_factor) == (RES, 64, 8)
    assert type(m.scheduler).__name__ == "DDIMScheduler" and m.scheduler.config.steps_offset == 1
    assert Diffusion(m).timesteps(50)[:2] == [981, 961]
    layers = attention_layers(m.unet)
    assert max(l.transformer for l in layers) + 1 == 16
    assert [sum(1 for l in layers if l.place == p and not l.is_cross) for p in ("down", "mid", "up")] == [6, 1, 9]
    assert resnet_layers(m.unet, "all") == SD14_RESNETS
    emb = Diffusion(m).encode_text(["a photo of a cat"])
    assert emb.shape == (1, 77, 768) and torch.isfinite(emb).all()


# ------------------------------------------------------------------------------------------ editors on SD-1.x
def _feature_mb(size, steps=2, copies=1):
    """OIG's cached source features: Σ over the 20 ResNet blocks of C·H·W at their level, fp32."""
    w, h = size[0] // 8, size[1] // 8
    per_hw = sum(2 * c / 4**lvl for lvl, c in enumerate((320, 640, 1280, 1280))) + \
        sum(3 * c / 4**lvl for lvl, c in enumerate((320, 640, 1280, 1280)))
    return round(per_hw * w * h * 4 * steps * copies / 2**20, 3)


EDITORS = {
    "oig": ["method=oig"],
    "oig_plus": ["method=oig_plus"],
    "ddim_recon": ["method=ddim_recon"],
    "ddim_word_swap": ["method=ddim_word_swap"],
    "sdedit": ["method=sdedit"],
    "diffedit_paper": ["method=diffedit", "method.num_maps_per_mask=2"],
    "diffedit_diffusers": ["method=diffedit", "method.mode=diffusers", "method.num_maps_per_mask=2"],
    "pix2pix_zero": ["method=pix2pix_zero", "method.num_reg_steps=1", "method.num_auto_corr_rolls=1"],
    "pnp_inversion": ["method=pnp"],
    "pnp_reconstruction": ["method=pnp", "method.source_branch=reconstruction"],
    "masactrl": ["method=masactrl", "method.start_step=1", "method.mask_guided=true"],
    "null_text_p2p": ["method=null_text_p2p", "method.inner_steps=1"],
    "ddim_p2p": ["method=ddim_p2p", "method.blend_words=auto"],
    "null_text": ["method=null_text", "method.inner_steps=1"],
}
P2P_SELF = _attn1("down_blocks.1:2", "down_blocks.2:2", "mid_block:1", "up_blocks.1:3", "up_blocks.2:3")
PNP_SELF = _attn1("up_blocks.1:3", "up_blocks.2:3", "up_blocks.3:3") - _attn1("up_blocks.1:1")
MASACTRL_SELF = _attn1("up_blocks.2:3", "up_blocks.3:3")


@real_shape
@pytest.mark.parametrize("case", list(EDITORS))
def test_editor_end_to_end_at_sd_shapes(case, twin_dir, images, tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    cfg = _cfg(_base(twin_dir, tmp_path, images) + EDITORS[case] + [STEPS])
    df = _run_ok(cfg, tmp_path / "run", WIDE)
    row = df.iloc[0]
    lat = (16, 8)  # latent (w, h) of the 128x64 sample
    if case in ("oig", "oig_plus"):
        assert spy.feature_layers and all(ls == SD14_RESNETS for ls in spy.feature_layers)
        assert row.source_feature_mb == _feature_mb(WIDE["wide.png"])  # one copy: negative = source caption
        assert np.isfinite(row.loss_struct_mean) and np.isfinite(row.loss_clip_mean)
    elif case.startswith("pnp"):
        assert spy.feature_layers == [["up_blocks.1.resnets.1"]]
        got = spy.self_layers("PnPControl")
        assert set(got) == PNP_SELF  # the reference's decoder self-attention blocks 4-11
        assert got["up_blocks.3.attentions.2.transformer_blocks.0.attn1"] == lat[0] * lat[1]
    elif case == "masactrl":
        got = spy.self_layers("MutualSelfAttention")
        assert set(got) == MASACTRL_SELF  # transformer layers 10..15 of 16
    elif case in ("ddim_p2p", "null_text_p2p"):
        got = spy.self_layers("PromptToPrompt")
        assert set(got) == P2P_SELF  # sides <= 1/2 of the latent's: 32x32 of SD's 64x64 latent
        assert max(got.values()) == (lat[0] // 2) * (lat[1] // 2)


@real_shape
def test_batched_oig_sweep_at_sd_shapes(twin_dir, images, tmp_path, monkeypatch):
    """Two λ2 points guided as one batch through SD's U-Net (20 hooked ResNet blocks, batch-2 attention
    at every resolution), the VAE decoder and ViT-B/32; each point's folder has an ok row with the
    sample's size."""
    spy = Spy(monkeypatch)
    out = tmp_path / "sweep"
    summary = run(_cfg(_base(twin_dir, tmp_path, images) + ["method=oig", "method.lambda2=[0,1]", STEPS]),
                  output_dir=out)
    assert summary["points"] == 2 and summary["errors"] == 0
    assert spy.feature_layers and all(ls == SD14_RESNETS for ls in spy.feature_layers)
    for j, v in enumerate((0, 1)):
        df = pd.read_parquet(out / f"{j}_oig_lambda2_{v}" / "results.parquet")
        assert (df.status == "ok").all() and (df.sweep_batch == 2).all() and (df.hp_lambda2 == v).all()
        im = np.asarray(Image.open(out / f"{j}_oig_lambda2_{v}" / "images" / "wide.png" / "edit.png"))
        assert im.shape == (64, 128, 3) and im.std() > 0


# ------------------------------------------------------------------------------------------ metric presets
@real_shape
def test_metric_presets_on_twin_models(twin_dir, images, tmp_path, monkeypatch):
    """metrics=paper (OpenAI ViT-B/32, DINO ViT-B/8, LPIPS AlexNet, CLIPSeg for the sample without a
    mask) and metrics=pie_bench (CLIP ViT-L/14 through transformers, DINO, LPIPS SqueezeNet) on a
    landscape sample with a mask and a square one captioned by the BLIP twin."""
    from eval.masks import TextMasker
    from oig.testing import twin

    for k, v in twin.env(twin_dir).items():
        monkeypatch.setenv(k, v)
    masks = []
    segment = TextMasker.segment

    def spy_segment(self, images, phrases):
        out = segment(self, images, phrases)
        masks.append(np.logical_or.reduce(out))
        return out

    monkeypatch.setattr(TextMasker, "segment", spy_segment)
    base = _base(twin_dir, tmp_path, images, "both.csv") + ["method=ddim_recon", STEPS,
                                                             *twin.overrides(twin_dir, "captioner")]
    sizes = {"wide.png": (128, 64), "square.png": (128, 128)}
    paper = _run_ok(_cfg(base + ["metrics=paper", *twin.overrides(twin_dir, "paper")]), tmp_path / "paper", sizes)
    assert not [c for c in paper.columns if c.startswith("metric_error")], paper.filter(like="metric_error").to_dict()
    cap = paper.set_index("id").loc["square.png", "source_prompt"]
    assert isinstance(cap, str) and cap.strip()  # the BLIP twin's caption
    for col in ("clip_score", "clip_acc", "structure_dist"):
        assert np.isfinite(paper[col]).all(), col
    # square.png has no mask: CLIPSeg segments the edited words once, at the image size; its random-weight
    # mask may leave no background, and then the background metric is NaN by definition
    assert len(masks) == 1 and masks[0].shape == (128, 128) and masks[0].dtype == bool
    lp = paper.set_index("id").bg_lpips
    assert np.isfinite(lp["wide.png"])
    assert np.isnan(lp["square.png"]) if masks[0].all() else np.isfinite(lp["square.png"])
    pie = _run_ok(_cfg(base + ["metrics=pie_bench", *twin.overrides(twin_dir, "pie_bench")]), tmp_path / "pie", sizes)
    assert not [c for c in pie.columns if c.startswith("metric_error")], pie.filter(like="metric_error").to_dict()
    wide = pie.set_index("id").loc["wide.png"]
    for col in ("clip_score", "clip_edit_region", "structure_dist", "bg_psnr", "bg_lpips", "bg_mse", "bg_ssim"):
        assert np.isfinite(wide[col]), col
    assert np.isfinite(pie.set_index("id").loc["square.png", "clip_score"])



@real_shape
def test_instruct_pix2pix_8_channel_unet(twin_dir, images, tmp_path, monkeypatch):
    """The 8-channel twin as the bound model (one SD-shaped model in memory)."""
    free_models()
    ov = _base(twin_dir, tmp_path, images) + ["method=instruct_pix2pix", STEPS, f"model.pretrained={twin_dir / 'ip2p'}",
                                              "method.unet=null", "method.pretrained=null"]
    df = _run_ok(_cfg(ov), tmp_path / "run", WIDE)
    assert df.iloc[0].instruction.startswith("turn the ")  # built from the two prompts
    free_models()


# ------------------------------------------------------------------------------------------ SD 2.x
@real_shape
def test_sd21base_prompt_to_prompt(twin_dir, images, tmp_path, monkeypatch):
    """SD 2.x-base: OpenCLIP-H text tower (1024-d context), linear projections, 5/10/20/20 heads."""
    free_models()
    spy = Spy(monkeypatch)
    ov = _base(twin_dir, tmp_path, images, model="sd21base") + ["method=ddim_p2p", STEPS, "method.blend_words=auto"]
    _run_ok(_cfg(ov), tmp_path / "run", WIDE)
    assert set(spy.self_layers("PromptToPrompt")) == P2P_SELF
    free_models()


# ------------------------------------------------------------------------------------------ preflight
@real_shape
def test_preflight_on_the_twin(twin_dir, images, tmp_path, monkeypatch, capsys):
    """oig-check on the twin: all ready for OIG with the paper's metric models; a folder without its
    U-Net, SD 2.1's v-prediction scheduler and a GELU tower for OpenAI's weights are named, with the
    override that fixes each (or, for v-prediction, the conversion that handles it)."""
    from oig.preflight import MISSING, READY, WRONG, compose, main, preflight
    from oig.testing import twin

    for k, v in twin.env(twin_dir).items():
        monkeypatch.setenv(k, v)
    free_models()
    base = [o for o in _base(twin_dir, tmp_path, images) if o != "metrics=none"]
    assert main([*base, "method=oig", "metrics=paper", *twin.overrides(twin_dir, "paper")]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("all ready"), out[-3000:]
    for name in ("model folder", "scheduler", "tokenizer", "guidance CLIP (oig)", "editor oig", "metric clip",
                 "metric structure", "metric background"):
        assert f"| {name} | ready |" in out, name
    assert "QuickGELU" in out  # the twin's OpenAI ViT-B/32 is declared ViT-B-32-quickgelu

    def rows(overrides, model="sd14"):
        b = _base(twin_dir, tmp_path, images, model=model)  # metrics=none
        return {r.name: r for r in preflight(compose([*b, *overrides]))}

    broken = tmp_path / "sd14_without_unet"
    broken.mkdir()
    for sub in (twin_dir / "sd14").iterdir():
        if sub.name != "unet":
            (broken / sub.name).symlink_to(sub)
    r = rows([f"model.pretrained={broken}"])
    assert r["model folder"].status == MISSING and "no unet/" in r["model folder"].detail
    assert "model.pretrained=" in r["model folder"].fix and "huggingface-cli download" in r["model folder"].fix
    free_models()
    r = rows([], model="sd21")
    assert r["scheduler"].status == READY and "prediction_type=v_prediction (U-Net output converted to ε" in \
        r["scheduler"].detail
    assert r["editor ddim_word_swap"].status == READY
    free_models()
    clip_file = f"{twin_dir / twin.FOLDERS['clip_b32']}/open_clip_model.safetensors"
    r = rows(["method=oig", "model.guidance_clip.name=ViT-B-32", f"model.guidance_clip.pretrained={clip_file}"])
    g = r["guidance CLIP (oig)"]
    assert g.status == WRONG and "named as OpenAI's" in g.detail and g.fix == "model.guidance_clip.name=ViT-B-32-quickgelu"
    free_models()


# ------------------------------------------------------------------------------------------ 512 px
@real_shape
@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("OIG_TEST_512") == "1"),
                    reason="OIG at 512 px: about 10 CPU-minutes; runs on a GPU or with OIG_TEST_512=1")
def test_oig_one_step_at_512(tmp_path_factory, images, tmp_path):
    from oig.testing import twin

    free_models()
    keep = os.environ.get("OIG_TWIN_DIR_512")
    d = Path(keep) if keep else tmp_path_factory.mktemp("twin512")
    twin.build(d, models=("sd14", "clip_b32"), resolution=512)
    try:
        ov = _base(d, tmp_path, images) + ["method=oig", "method.steps=1", "device=auto", "dtype=fp32"]
        _run_ok(_cfg(ov), tmp_path / "run", {"wide.png": (512, 320)})
    finally:
        free_models()
        if not keep:
            shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------------------------------ OIG memory savers
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from oig.testing import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.mark.parametrize("editor", ["oig", "oig_plus"])
def test_memory_savers_leave_the_edit_unchanged(editor, tiny_models, rand_image, tiny_clip, monkeypatch):
    """Gradient checkpointing of the VAE decoder / U-Net and feature offload give bit-identical edits;
    sliced attention (explicit softmax per head slice) equal up to float rounding. Each saver is seen
    at work (checkpointed VAE / U-Net blocks, sliced-attention calls), and the models are left as they
    were (checkpointing off, original attention processors)."""
    import torch.utils.checkpoint as ckpt
    from diffusers.models.attention_processor import SlicedAttnProcessor

    from oig.oig_editor import OIG, OIGPlus
    from oig.types import EditRequest

    seen = {"vae": 0, "unet": 0, "sliced": 0}
    checkpoint, sliced = ckpt.checkpoint, SlicedAttnProcessor.__call__

    def counting_checkpoint(fn, *a, **k):
        owner = getattr(fn, "__self__", None)
        part = "vae" if any(owner is m for m in tiny_models.vae.decoder.modules()) else "unet"
        seen[part] += 1
        return checkpoint(fn, *a, **k)

    def counting_sliced(self, *a, **k):
        seen["sliced"] += 1
        return sliced(self, *a, **k)

    monkeypatch.setattr(ckpt, "checkpoint", counting_checkpoint)
    monkeypatch.setattr(SlicedAttnProcessor, "__call__", counting_sliced)

    cls = OIG if editor == "oig" else OIGPlus
    req = EditRequest(rand_image, "a red circle on a gray background", "a blue square on a gray background", seed=0)
    kw = dict(lambda1=0.5, lambda2=1.0, steps=3, clip_model=tiny_clip)
    procs = {k: type(v) for k, v in tiny_models.unet.attn_processors.items()}

    def edit(**savers):
        r = cls(**kw, **savers).bind(tiny_models)(req)
        assert not tiny_models.unet.is_gradient_checkpointing and not tiny_models.vae.is_gradient_checkpointing
        assert {k: type(v) for k, v in tiny_models.unet.attn_processors.items()} == procs
        return np.asarray(r.image).astype(int), r.info

    ref, info = edit()
    assert info["loss_clip_mean"] > 0 and info["loss_struct_mean"] > 0  # both terms back-propagate
    assert seen == {"vae": 0, "unet": 0, "sliced": 0}
    every = dict(vae_checkpointing=True, unet_checkpointing=True, offload_features=True)
    for savers, parts in ((dict(vae_checkpointing=True), {"vae"}), (dict(unet_checkpointing=True), {"unet"}),
                          (dict(offload_features=True), set()), (every, {"vae", "unet"})):
        seen.update(vae=0, unet=0)
        got, got_info = edit(**savers)
        assert {k for k in ("vae", "unet") if seen[k]} == parts, (savers, seen)
        assert np.array_equal(got, ref), savers
        assert got_info["loss_clip_mean"] == info["loss_clip_mean"], savers
    for size in ("auto", 1):
        seen["sliced"] = 0
        got, _ = edit(attention_slicing=size)
        assert seen["sliced"] > 0 and np.abs(got - ref).max() <= 1, size
    with pytest.raises(ValueError, match="attention_slicing must be"):
        cls(attention_slicing="half")
