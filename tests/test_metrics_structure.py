"""Structure distance against a direct re-computation of the keys (Splice's recipe), on a tiny
random timm ViT with DINO ViT-B/8's structure (loaded through timm's local-file path) and on the
tiny open_clip image tower."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from eval.base import MetricInput
from eval.structure import IMAGENET_MEAN, IMAGENET_STD, StructureDistance

TINY_VIT = dict(embed_dim=64, depth=2, num_heads=4, img_size=32)


def _img(seed, w=48, h=40):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch8_224", pretrained=False, **TINY_VIT)
    path = tmp_path_factory.mktemp("vit") / "tiny_vit.pth"
    torch.save(model.state_dict(), path)
    return path, model.eval()


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from oig.testing import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip_s"))


@torch.no_grad()
def _ref_keys_timm(model, x):
    """Splice's recipe, written independently: the last block's input -> norm1 -> qkv linear ->
    reshape (T, 3, heads, d) -> keys per head -> heads concatenated."""
    got = []
    h = model.blocks[-1].register_forward_pre_hook(lambda mod, args: got.append(args[0]))
    with torch.no_grad():
        model.forward_features(x)
    h.remove()
    blk = model.blocks[-1]
    qkv = F.linear(blk.norm1(got[0]), blk.attn.qkv.weight, blk.attn.qkv.bias)[0]  # (T, 3D)
    t = qkv.shape[0]
    heads = blk.attn.num_heads
    k = qkv.reshape(t, 3, heads, -1).permute(1, 2, 0, 3)[1]  # (heads, T, d)
    return k.transpose(0, 1).reshape(t, -1)


def _ref_dist(ka, kb):
    def sim(x):
        n = x.norm(dim=1, keepdim=True)
        return (x @ x.T) / torch.clamp(n @ n.T, min=1e-8)

    return float(F.mse_loss(sim(ka), sim(kb)))


def _ref_input(img, scale, size=224, max_size=480, antialias=False):
    """Splice/PIE-Bench preprocessing: tensor Resize (torchvision < 0.17: no antialias) + ImageNet Normalize."""
    from torchvision import transforms

    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0 * scale).permute(2, 0, 1)
    x = transforms.Resize(size, max_size=max_size, antialias=antialias)(x)
    x = x[:, : x.shape[1] // 8 * 8, : x.shape[2] // 8 * 8]  # DINO's stride-8 patch conv drops the remainder
    return transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)(x)[None]


@pytest.mark.parametrize("compat", [False, True])
def test_timm_structure_distance_equals_recomputation(vit_file, compat):
    path, model = vit_file
    m = StructureDistance(backbone="timm", arch="vit_base_patch8_224", weights=str(path),
                          model_kwargs=TINY_VIT, pie_bench_compat=compat)
    m.setup("cpu")
    # the locally saved weights were loaded through timm's pretrained-file path
    for (k, a), b in zip(m.extractor.model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    pairs = [(_img(0), _img(1)), (_img(2, 30, 100), _img(3, 30, 100))]  # the second is capped by max_size=480
    ours = m([MetricInput(a, b, "", "") for a, b in pairs])
    for (a, b), o in zip(pairs, ours):
        scale = 255.0 if compat else 1.0
        xa, xb = _ref_input(a, scale), _ref_input(b, scale)
        want = _ref_dist(_ref_keys_timm(m.extractor.model, xa), _ref_keys_timm(m.extractor.model, xb))
        assert o["structure_dist"] == pytest.approx(want, rel=1e-4, abs=1e-7)
        assert o["structure_dist"] > 0
    assert _ref_input(pairs[1][0], 1.0).shape[-2:] == (480, 144)  # 100x30 (HxW): long side capped at 480


def test_antialias_switch(vit_file):
    path, _ = vit_file
    a, b = _img(13, 600, 500), _img(14, 600, 500)  # downsampling, where antialiasing matters
    m = StructureDistance(arch="vit_base_patch8_224", weights=str(path), model_kwargs=TINY_VIT, antialias=True)
    got = m([MetricInput(a, b, "", "")])[0]["structure_dist"]
    model = m.extractor.model
    want = _ref_dist(_ref_keys_timm(model, _ref_input(a, 1.0, antialias=True)),
                     _ref_keys_timm(model, _ref_input(b, 1.0, antialias=True)))
    assert got == pytest.approx(want, rel=1e-4, abs=1e-7)
    plain = _ref_dist(_ref_keys_timm(model, _ref_input(a, 1.0)), _ref_keys_timm(model, _ref_input(b, 1.0)))
    assert abs(plain - want) > 1e-4 * want


def test_pie_bench_compat_changes_the_value(vit_file):
    path, _ = vit_file
    a, b = _img(4), _img(5)
    std = StructureDistance(arch="vit_base_patch8_224", weights=str(path), model_kwargs=TINY_VIT)
    pie = StructureDistance(arch="vit_base_patch8_224", weights=str(path), model_kwargs=TINY_VIT, pie_bench_compat=True)
    d_std = std([MetricInput(a, b, "", "")])[0]["structure_dist"]
    d_pie = pie([MetricInput(a, b, "", "")])[0]["structure_dist"]
    assert abs(d_std - d_pie) > 1e-3 * max(d_std, d_pie)


def test_identical_images_give_zero_and_batching_is_consistent(vit_file):
    path, _ = vit_file
    m = StructureDistance(arch="vit_base_patch8_224", weights=str(path), model_kwargs=TINY_VIT, resize=64, batch_size=2)
    batch = [MetricInput(_img(6), _img(6), "", ""), MetricInput(_img(7, 64, 48), _img(8, 64, 48), "", ""),
             MetricInput(_img(9), _img(10), "", "")]
    together = m(batch)
    assert together[0]["structure_dist"] == pytest.approx(0.0, abs=1e-10)
    alone = [m([s])[0]["structure_dist"] for s in batch]
    for t, a in zip(together, alone):
        assert t["structure_dist"] == pytest.approx(a, rel=1e-4, abs=1e-9)


def test_clip_tower_structure_distance_equals_recomputation(tiny_clip):
    import open_clip

    m = StructureDistance(backbone="clip", clip_model=tiny_clip)
    m.setup("cpu")
    model, _, preprocess = open_clip.create_model_and_transforms(tiny_clip)
    model.eval()
    blk = model.visual.transformer.resblocks[-1]

    @torch.no_grad()
    def ref_keys(img):
        got = []
        h = blk.register_forward_pre_hook(lambda mod, args: got.append(args[0]))
        with torch.no_grad():
            model.visual(preprocess(img)[None])
        h.remove()
        x = blk.ln_1(got[0])[0]  # (T, D), batch_first
        d = blk.attn.embed_dim
        q, k, v = F.linear(x, blk.attn.in_proj_weight, blk.attn.in_proj_bias).split(d, dim=-1)
        return k

    a, b = _img(11, 64, 64), _img(12, 80, 72)
    b = b.resize((64, 64))
    got = m([MetricInput(a, b, "", ""), MetricInput(a, a, "", "")])
    assert got[0]["structure_dist"] == pytest.approx(_ref_dist(ref_keys(a), ref_keys(b)), rel=1e-4, abs=1e-8)
    assert got[0]["structure_dist"] > 0
    assert got[1]["structure_dist"] == pytest.approx(0.0, abs=1e-10)
    # 64 patches of 8x8 plus the CLS token
    with torch.no_grad():
        assert m.extractor.keys(m.extractor.preprocess(a)[None]).shape == (1, 65, 64)


def test_errors(tmp_path):
    m = StructureDistance(weights=str(tmp_path / "missing.safetensors"))
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        m.setup("cpu")
    with pytest.raises(ValueError, match="pie_bench_compat"):
        StructureDistance(backbone="clip", pie_bench_compat=True)
    with pytest.raises(ValueError, match="backbone"):
        StructureDistance(backbone="resnet")


def test_size_mismatch_is_an_error(vit_file):
    path, _ = vit_file
    m = StructureDistance(arch="vit_base_patch8_224", weights=str(path), model_kwargs=TINY_VIT)
    with pytest.raises(ValueError, match="same size"):
        m([MetricInput(_img(0), _img(1, 40, 40), "", "", task="t")])
    assert math.isfinite(m([MetricInput(_img(0), _img(1), "", "")])[0]["structure_dist"])
