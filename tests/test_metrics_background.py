"""Background metrics against the lpips package and torchmetrics, with LPIPS backbone weights
saved locally under the exact file names torchvision loads (random weights, real loading code)."""

import math

import numpy as np
import pytest
import torch

from eval.base import PSNR_CAP_DB, MetricInput
from eval.background import BackgroundMetrics, lpips_backbone_file

H, W = 48, 64


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory):
    """$TORCH_HOME with randomly initialised AlexNet and SqueezeNet 1.1 ImageNet checkpoints."""
    import torchvision

    home = tmp_path_factory.mktemp("torch_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(home))
        ckpt = home / "hub" / "checkpoints"
        ckpt.mkdir(parents=True)
        torch.manual_seed(0)
        for net, ctor in (("alex", torchvision.models.alexnet), ("squeeze", torchvision.models.squeezenet1_1)):
            path, _ = lpips_backbone_file(net)
            assert path.parent == ckpt
            torch.save(ctor().state_dict(), path)
        yield home


def _arr(seed):
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _pil(a):
    from PIL import Image

    return Image.fromarray(a)


def _t01(a):
    return torch.from_numpy(a.astype(np.float32) / 255.0).permute(2, 0, 1)[None].contiguous()


def _mask():
    m = np.zeros((H, W), bool)
    m[10:30, 20:50] = True
    return m


def _pair(seed=0):
    src = _arr(seed)
    edt = np.clip(src.astype(int) + np.random.default_rng(seed + 100).integers(-40, 41, src.shape), 0, 255).astype(np.uint8)
    return src, edt


@pytest.mark.filterwarnings("ignore::UserWarning")  # torchvision's 'pretrained=' deprecation inside lpips
def test_full_frame_values_equal_lpips_package_and_torchmetrics(torch_home):
    """All-False mask = everything is background: every value equals the plain full-frame reference."""
    import lpips
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
    from torchmetrics.functional.regression import mean_squared_error
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    src, edt = _pair()
    x, y = _t01(src), _t01(edt)
    m = BackgroundMetrics(lpips_net="alex")
    m.setup("cpu")
    got = m([MetricInput(_pil(src), _pil(edt), "", "", mask=np.zeros((H, W), bool))])[0]
    with torch.no_grad():
        ref_lpips = float(lpips.LPIPS(net="alex", verbose=False).eval()(x * 2 - 1, y * 2 - 1))
        tm_lpips = float(LearnedPerceptualImagePatchSimilarity(net_type="alex")(y * 2 - 1, x * 2 - 1))
    assert ref_lpips > 0
    assert got["bg_lpips"] == pytest.approx(ref_lpips, abs=1e-6)
    assert got["bg_lpips"] == pytest.approx(tm_lpips, abs=1e-5)  # torchmetrics' own LPIPS copy agrees
    assert got["bg_psnr"] == pytest.approx(float(peak_signal_noise_ratio(y, x, data_range=1.0)), abs=1e-4)
    assert got["bg_ssim"] == pytest.approx(float(structural_similarity_index_measure(y, x, data_range=1.0)), abs=1e-6)
    assert got["bg_mse"] == pytest.approx(float(mean_squared_error(y, x)), rel=1e-5)


def test_outside_convention_psnr_mse_on_background_pixels(torch_home):
    from torchmetrics.functional.image import peak_signal_noise_ratio
    from torchmetrics.functional.regression import mean_squared_error

    src, edt = _pair(1)
    mask = _mask()
    got = BackgroundMetrics(metrics=["psnr", "mse"])([MetricInput(_pil(src), _pil(edt), "", "", mask=mask)])[0]
    bg = torch.from_numpy(~mask)[None, None].expand(1, 3, H, W)
    x, y = _t01(src)[bg], _t01(edt)[bg]
    assert got["bg_psnr"] == pytest.approx(float(peak_signal_noise_ratio(y, x, data_range=1.0)), abs=1e-4)
    assert got["bg_mse"] == pytest.approx(float(mean_squared_error(y, x)), rel=1e-5)
    assert set(got) == {"bg_psnr", "bg_mse"}


def test_outside_convention_ignores_the_edited_region(torch_home):
    """Changing only the pixels inside the mask changes no background value; identical backgrounds
    give LPIPS 0, SSIM 1, MSE 0 and the PSNR cap."""
    src, edt = _pair(2)
    mask = _mask()
    scribble = edt.copy()
    scribble[mask] = np.random.default_rng(9).integers(0, 256, (mask.sum(), 3))
    only_inside = src.copy()
    only_inside[mask] = scribble[mask]
    m = BackgroundMetrics(lpips_net="squeeze")
    a, b, c = m([MetricInput(_pil(src), _pil(edt), "", "", mask=mask),
                 MetricInput(_pil(src), _pil(scribble), "", "", mask=mask),
                 MetricInput(_pil(src), _pil(only_inside), "", "", mask=mask)])
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=1e-6), k
    assert a["bg_lpips"] > 0 and a["bg_mse"] > 0
    assert c == {"bg_lpips": 0.0, "bg_psnr": PSNR_CAP_DB, "bg_ssim": pytest.approx(1.0, abs=1e-6), "bg_mse": 0.0}


def test_pie_bench_convention_equals_pie_bench_recipe(torch_home):
    """PIE-Bench's code: border forced to edited, both images times the unedited mask, torchmetrics
    PSNR / LPIPS(squeeze) on [-1, 1] / MSE / SSIM on the full frame."""
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
    from torchmetrics.regression import MeanSquaredError

    src, edt = _pair(3)
    mask = _mask()
    m = BackgroundMetrics(lpips_net="squeeze", convention="pie_bench")
    got = m([MetricInput(_pil(src), _pil(edt), "", "", mask=mask)])[0]

    edited = mask.astype(np.float32)
    edited[0, :] = edited[-1, :] = edited[:, 0] = edited[:, -1] = 1
    keep = (1 - edited)[..., None]
    a = torch.from_numpy(src.astype(np.float32) / 255 * keep).permute(2, 0, 1)[None]
    b = torch.from_numpy(edt.astype(np.float32) / 255 * keep).permute(2, 0, 1)[None]
    with torch.no_grad():
        want = {
            "bg_psnr": float(PeakSignalNoiseRatio(data_range=1.0)(a, b)),
            "bg_lpips": float(LearnedPerceptualImagePatchSimilarity(net_type="squeeze")(a * 2 - 1, b * 2 - 1)),
            "bg_mse": float(MeanSquaredError()(a[0].contiguous(), b[0].contiguous())),
            "bg_ssim": float(StructuralSimilarityIndexMeasure(data_range=1.0)(a, b)),
        }
    assert got["bg_psnr"] == pytest.approx(want["bg_psnr"], abs=1e-4)
    assert got["bg_lpips"] == pytest.approx(want["bg_lpips"], abs=1e-5)
    assert got["bg_mse"] == pytest.approx(want["bg_mse"], rel=1e-5)
    assert got["bg_ssim"] == pytest.approx(want["bg_ssim"], abs=1e-5)
    # the two conventions really differ
    out = BackgroundMetrics(lpips_net="squeeze")([MetricInput(_pil(src), _pil(edt), "", "", mask=mask)])[0]
    assert abs(out["bg_mse"] - got["bg_mse"]) > 1e-4


def test_nan_rules_and_psnr_cap(torch_home):
    src, edt = _pair(4)
    m = BackgroundMetrics(metrics=["psnr", "ssim", "mse"])
    pie = BackgroundMetrics(metrics=["psnr", "ssim", "mse"], convention="pie_bench")
    no_mask = MetricInput(_pil(src), _pil(edt), "", "")
    all_edit = MetricInput(_pil(src), _pil(edt), "", "", mask=np.ones((H, W), bool))
    for metric in (m, pie):
        for s in (no_mask, all_edit):
            assert all(math.isnan(v) for v in metric([s])[0].values())
    same = m([MetricInput(_pil(src), _pil(src), "", "", mask=_mask())])[0]
    assert same["bg_psnr"] == PSNR_CAP_DB and same["bg_mse"] == 0.0
    # a mask at another size is resized (nearest) to the image
    small = np.zeros((H // 2, W // 2), bool)
    small[5:15, 10:25] = True
    assert m([MetricInput(_pil(src), _pil(edt), "", "", mask=small)])[0]["bg_mse"] > 0


def test_missing_backbone_weights_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    m = BackgroundMetrics(lpips_net="alex")
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth"):
        m.setup("cpu")
    # without LPIPS nothing needs weights
    BackgroundMetrics(metrics=["psnr"]).setup("cpu")


def test_bad_config():
    with pytest.raises(ValueError, match="unknown metrics"):
        BackgroundMetrics(metrics=["fid"])
    with pytest.raises(ValueError, match="convention"):
        BackgroundMetrics(convention="inside")
    with pytest.raises(ValueError, match="lpips_net"):
        BackgroundMetrics(lpips_net="resnet")
    src, edt = _pair(5)
    with pytest.raises(ValueError, match="same size"):
        BackgroundMetrics(metrics=["mse"])([MetricInput(_pil(src), _pil(edt[:, :32]), "", "", mask=_mask())])
