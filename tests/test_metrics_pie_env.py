"""PIE-Bench's evaluation environment switch (``pie_bench_env``: published | current).

``published`` = the 2023 environment of PIE-Bench's Table 1: the edit is read back from the JPEG
panel its runners saved (PIL defaults, quality 75), the SSIM map is averaged without its 5-pixel
border (torchmetrics <= 1.4.1), the structure resize does not antialias (torchvision 0.13).
``current`` = the same code on today's libraries. Checked against direct references: files
written and read by PIL the way PnPInversion's scripts do, torchmetrics' full SSIM map, and
torchvision's tensor resize."""

import io

import hydra
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from PIL import Image

from eval.background import BackgroundMetrics, lpips_backbone_file, ssim_mean
from eval.base import PIE_BENCH_ENVS, Metric, MetricInput, jpeg_round_trip
from eval.clip import CLIPMetrics
from eval.structure import IMAGENET_MEAN, IMAGENET_STD, StructureDistance
from oig.run import CONF_DIR

H, W = 64, 80
TINY_VIT = dict(embed_dim=64, depth=2, num_heads=4, img_size=32)


def _photo(seed, h=H, w=W):
    """A smooth random image with some texture (JPEG changes it, but not beyond recognition)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
    a = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC)).astype(int)
    a = a + rng.integers(-12, 13, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _mask(h=H, w=W):
    m = np.zeros((h, w), bool)
    m[16:40, 20:56] = True
    return m


def _t01(img):
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None].contiguous()


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory):
    """$TORCH_HOME with a randomly initialised SqueezeNet 1.1 checkpoint under torchvision's file name."""
    import torchvision

    home = tmp_path_factory.mktemp("torch_home_env")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(home))
        path, _ = lpips_backbone_file("squeeze")
        path.parent.mkdir(parents=True)
        torch.manual_seed(0)
        torch.save(torchvision.models.squeezenet1_1().state_dict(), path)
        yield home


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch8_224", pretrained=False, **TINY_VIT)
    path = tmp_path_factory.mktemp("vit_env") / "tiny_vit.pth"
    torch.save(model.state_dict(), path)
    return str(path)


def _structure(vit_file, **kw):
    return StructureDistance(arch="vit_base_patch8_224", weights=vit_file, model_kwargs=TINY_VIT, **kw)


# ------------------------------------------------------------------ the JPEG round trip
def test_jpeg_round_trip_is_what_pie_bench_reads_back(tmp_path):
    """Saving to a .jpg path with PIL's defaults and reading it back (run_editing_*.py + evaluate.py)
    gives exactly jpeg_round_trip; PIL's default is quality 75 with 4:2:0 chroma subsampling."""
    img = _photo(0)
    img.save(tmp_path / "edit.jpg")  # what the runners do: Image.save(path ending in .jpg), no options
    with Image.open(tmp_path / "edit.jpg") as im:
        want = np.asarray(im.convert("RGB"))
    got = np.asarray(jpeg_round_trip(img))
    assert np.array_equal(got, want)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=75, subsampling="4:2:0")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")), want)
    assert np.abs(got.astype(int) - np.asarray(img).astype(int)).mean() > 0.5  # lossy


def test_panel_crop_equals_the_edit_alone_except_its_first_column():
    """PIE-Bench saves [text | source | reconstruction | edit] in one JPEG and crops the right-most
    square back out (evaluate.py:271-273): only the first column's chroma sees the neighbour panel."""
    s = 64  # a multiple of 16, as 512 is: JPEG blocks and 4:2:0 MCUs never straddle two panels
    text, src, rec, edit = (_photo(i, s, s) for i in (1, 2, 3, 4))
    panel = Image.fromarray(np.concatenate([np.asarray(x) for x in (text, src, rec, edit)], axis=1))
    buf = io.BytesIO()
    panel.save(buf, format="JPEG")
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        im = im.convert("RGB")
        crop = np.asarray(im.crop((im.size[0] - s, im.size[1] - s, im.size[0], im.size[1])))
    alone = np.asarray(jpeg_round_trip(edit))
    assert np.array_equal(crop[:, 1:], alone[:, 1:])
    assert np.abs(crop[:, 0].astype(int) - alone[:, 0].astype(int)).max() > 0  # chroma upsampling across the seam


class _Spy(Metric):
    """Records what its compute() receives."""

    def __init__(self, edit_jpeg):
        super().__init__()
        self.edit_jpeg = edit_jpeg
        self.seen = []

    @property
    def output_keys(self):
        return []

    def compute(self, batch):
        self.seen.extend(batch)
        return [{} for _ in batch]


def test_base_metric_round_trips_the_edit_and_only_the_edit():
    src, edit, tgt = _photo(5), _photo(6), _photo(7)
    s = MetricInput(src, edit, "a", "b", mask=_mask(), target_image=tgt, task="t", meta={"k": 1})
    spy = _Spy(True)
    spy([s])
    got = spy.seen[0]
    assert np.array_equal(np.asarray(got.edit), np.asarray(jpeg_round_trip(edit)))
    assert got.source is src and got.target_image is tgt and got.mask is s.mask and got.meta == {"k": 1}
    assert s.edit is edit  # the caller's input (and so the saved PNG) stays lossless
    spy = _Spy(False)
    spy([s])
    assert spy.seen[0].edit is edit


# ------------------------------------------------------------------ the three metrics
def test_every_pie_bench_metric_reads_the_jpeg_edit_when_published(torch_home, vit_file, monkeypatch):
    """With published each metric's compute() gets jpeg_round_trip(edit) and the source as given;
    with current (and unset) the lossless edit."""
    src, edit = _photo(8), _photo(9)
    s = MetricInput(src, edit, "a red circle", "a blue circle", mask=_mask())
    for env, jpeg in (("published", True), ("current", False), (None, False)):
        metrics = [CLIPMetrics(model="toy", keys=["clip_score", "clip_edit_region"], region_convention="pie_bench",
                               pie_bench_env=env),
                   _structure(vit_file, pie_bench_compat=True, pie_bench_env=env),
                   BackgroundMetrics(metrics=["psnr", "ssim"], convention="pie_bench", pie_bench_env=env)]
        for m in metrics:
            seen = []
            orig = type(m).compute
            monkeypatch.setattr(m, "compute", lambda batch, orig=orig, m=m, seen=seen: seen.extend(batch) or orig(m, batch))
            m([s])
            want = jpeg_round_trip(edit) if jpeg else edit
            assert np.array_equal(np.asarray(seen[0].edit), np.asarray(want)), (env, type(m).__name__)
            assert seen[0].source is src, (env, type(m).__name__)


def test_background_published_equals_pie_bench_2023_recipe(torch_home):
    """published: the edit through PIL's JPEG, both images times the unedited mask, SSIM = mean of
    torchmetrics' full SSIM map without 5 pixels on each side (torchmetrics <= 1.4.1's average)."""
    from torchmetrics.functional.image import structural_similarity_index_measure
    from torchmetrics.image import PeakSignalNoiseRatio
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
    from torchmetrics.regression import MeanSquaredError

    src, edit, mask = _photo(10), _photo(11), _mask()
    pub = BackgroundMetrics(lpips_net="squeeze", convention="pie_bench", pie_bench_env="published")
    cur = BackgroundMetrics(lpips_net="squeeze", convention="pie_bench", pie_bench_env="current")
    s = MetricInput(src, edit, "", "", mask=mask)
    got_pub, got_cur = pub([s])[0], cur([s])[0]

    edited = mask.copy()
    edited[0, :] = edited[-1, :] = edited[:, 0] = edited[:, -1] = True
    keep = torch.from_numpy(~edited).float()[None, None]
    for got, edt, border in ((got_pub, jpeg_round_trip(edit), 5), (got_cur, edit, 0)):
        a, b = _t01(src) * keep, _t01(edt) * keep
        _, full = structural_similarity_index_measure(a, b, data_range=1.0, reduction="none", return_full_image=True)
        assert full.shape[-2:] == (H, W)
        ssim = float(full[..., border:H - border, border:W - border].mean())
        with torch.no_grad():
            assert got["bg_ssim"] == pytest.approx(ssim, abs=1e-6)
            assert got["bg_psnr"] == pytest.approx(float(PeakSignalNoiseRatio(data_range=1.0)(a, b)), abs=1e-4)
            assert got["bg_mse"] == pytest.approx(float(MeanSquaredError()(a[0].contiguous(), b[0].contiguous())),
                                                  rel=1e-5)
            lp = LearnedPerceptualImagePatchSimilarity(net_type="squeeze")(a * 2 - 1, b * 2 - 1)
            assert got["bg_lpips"] == pytest.approx(float(lp), abs=1e-5)
    # the border crop alone changes SSIM (here: on the lossless edit)
    a, b = _t01(src) * keep, _t01(edit) * keep
    assert abs(ssim_mean(b, a, 5) - ssim_mean(b, a, 0)) > 1e-4
    assert abs(got_pub["bg_psnr"] - got_cur["bg_psnr"]) > 0.01


def test_current_ssim_is_torchmetrics_own_average():
    """current = full-map mean = torchmetrics' scalar SSIM. This holds from torchmetrics 1.4.2 on
    (Lightning-AI/torchmetrics#2721); on <= 1.4.1 the scalar left out a 5-pixel border."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    a, b = _t01(_photo(12)), _t01(_photo(13))
    want = float(structural_similarity_index_measure(a, b, data_range=1.0))
    assert ssim_mean(a, b, 0) == pytest.approx(want, abs=1e-7)
    assert abs(ssim_mean(a, b, 5) - want) > 1e-4
    with pytest.raises(ValueError, match="5-pixel border"):
        ssim_mean(a[..., :10, :10], b[..., :10, :10], 5)


def test_structure_resize_antialias_follows_the_environment(vit_file):
    """published: torchvision's tensor resize without antialiasing (PIE-Bench's torchvision 0.13);
    current: with it (torchvision >= 0.17's default). Inputs in 0..255 (pie_bench_compat)."""
    from torchvision.transforms import Normalize, Resize

    big = _photo(14, 300, 360)  # downsampled to 224 on the short side: antialiasing matters
    pub = _structure(vit_file, pie_bench_compat=True, pie_bench_env="published")
    cur = _structure(vit_file, pie_bench_compat=True, pie_bench_env="current")
    assert (pub.antialias, cur.antialias) == (False, True)
    for m, aa in ((pub, False), (cur, True)):
        m.setup("cpu")
        x = torch.from_numpy(np.asarray(big, dtype=np.float32)).permute(2, 0, 1)
        want = Normalize(IMAGENET_MEAN, IMAGENET_STD)(Resize(224, max_size=480, antialias=aa)(x))
        want = want[:, : want.shape[1] // 8 * 8, : want.shape[2] // 8 * 8]
        assert torch.allclose(m.extractor.preprocess(big), want, atol=1e-4)
    # published = antialias off on the JPEG'd edit; current = antialias on on the lossless edit
    src, edit = _photo(15, 300, 360), _photo(16, 300, 360)
    d_pub = pub([MetricInput(src, edit, "", "")])[0]["structure_dist"]
    d_cur = cur([MetricInput(src, edit, "", "")])[0]["structure_dist"]
    plain_jpeg = _structure(vit_file, pie_bench_compat=True, antialias=False)([MetricInput(src, jpeg_round_trip(edit), "", "")])
    plain_aa = _structure(vit_file, pie_bench_compat=True, antialias=True)([MetricInput(src, edit, "", "")])
    assert d_pub == pytest.approx(plain_jpeg[0]["structure_dist"], rel=1e-6)
    assert d_cur == pytest.approx(plain_aa[0]["structure_dist"], rel=1e-6)
    assert abs(d_pub - d_cur) > 1e-6 * max(d_pub, d_cur)


def test_clip_published_scores_the_jpeg_edit():
    src, edit, mask = _photo(17), _photo(18), _mask()
    s = MetricInput(src, edit, "a red circle on a gray background", "a blue circle on a gray background", mask=mask)
    kw = dict(model="toy", keys=["clip_score", "clip_edit_region"], region_convention="pie_bench")
    pub = CLIPMetrics(pie_bench_env="published", **kw)([s])[0]
    cur = CLIPMetrics(pie_bench_env="current", **kw)([s])[0]
    by_hand = CLIPMetrics(**kw)([MetricInput(src, jpeg_round_trip(edit), s.source_prompt, s.target_prompt, mask=mask)])[0]
    plain = CLIPMetrics(**kw)([s])[0]
    for k in kw["keys"]:
        assert pub[k] == pytest.approx(by_hand[k], abs=1e-5), k
        assert cur[k] == pytest.approx(plain[k], abs=1e-5), k
    assert any(abs(pub[k] - cur[k]) > 1e-4 for k in kw["keys"])


def test_bad_settings_are_refused_with_the_setting_named(vit_file):
    with pytest.raises(ValueError, match="pie_bench_env must be one of"):
        BackgroundMetrics(convention="pie_bench", pie_bench_env="2023")
    with pytest.raises(ValueError, match="convention='pie_bench' only"):
        BackgroundMetrics(convention="outside", pie_bench_env="published")
    with pytest.raises(ValueError, match="pie_bench_compat=true"):
        _structure(vit_file, pie_bench_env="published")
    with pytest.raises(ValueError, match="contradicts pie_bench_env='published'"):
        _structure(vit_file, pie_bench_compat=True, antialias=True, pie_bench_env="published")
    with pytest.raises(ValueError, match="CLIPMetrics: pie_bench_env"):
        CLIPMetrics(model="toy", pie_bench_env="old")
    assert set(PIE_BENCH_ENVS) == {"published", "current"}
    assert _structure(vit_file).antialias is False  # unset: the reference code's behaviour, as before


# ------------------------------------------------------------------ the one setting
def _envs(metrics_cfg):
    ms = {k: hydra.utils.instantiate(v) for k, v in metrics_cfg.items()}
    return {k: m.pie_bench_env for k, m in ms.items()}, ms


def test_one_setting_switches_all_three_metrics():
    """conf/metrics/pie_bench.yaml reads the top-level `pie_bench_env` (default published) in every metric."""
    path = CONF_DIR / "metrics" / "pie_bench.yaml"
    got, ms = _envs(OmegaConf.load(path))  # alone (no root key): the default
    assert got == {"clip": "published", "structure": "published", "background": "published"}
    assert ms["structure"].antialias is False and ms["background"].ssim_border == 5
    assert all(m.edit_jpeg for m in ms.values())
    root = OmegaConf.create({"pie_bench_env": "current", "metrics": OmegaConf.load(path)})
    got, ms = _envs(root.metrics)
    assert got == {"clip": "current", "structure": "current", "background": "current"}
    assert ms["structure"].antialias is True and ms["background"].ssim_border == 0
    assert not any(m.edit_jpeg for m in ms.values())

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            pb = compose(config_name="config", overrides=["experiment=pie_bench"])
            assert {k: v.pie_bench_env for k, v in pb.metrics.items()} == got.fromkeys(got, "published")
            cur = compose(config_name="config", overrides=["metrics=pie_bench", "+pie_bench_env=current"])
            assert {k: v.pie_bench_env for k, v in cur.metrics.items()} == got
            bad = compose(config_name="config", overrides=["metrics=pie_bench", "+pie_bench_env=2023"])
            with pytest.raises(Exception, match="pie_bench_env must be one of"):
                hydra.utils.instantiate(bad.metrics.background)
    finally:
        GlobalHydra.instance().clear()
