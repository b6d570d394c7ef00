"""Text-prompted masks (CLIPSeg through transformers) on a tiny random CLIPSeg saved locally."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from eval.background import BackgroundMetrics
from eval.base import MetricInput
from eval.masks import TextMasker, edited_words


@pytest.fixture(scope="module")
def tiny_clipseg(tmp_path_factory):
    from transformers import (CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, CLIPTokenizer,
                              ViTImageProcessor)

    from oig.toy.tokenizer import save_tokenizer

    folder = tmp_path_factory.mktemp("clipseg")
    save_tokenizer(folder, model_max_length=32)
    tok = CLIPTokenizer.from_pretrained(folder)
    cfg = CLIPSegConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16, reduce_dim=16, extract_layers=[1], decoder_num_attention_heads=2, decoder_intermediate_size=32)
    torch.manual_seed(0)
    CLIPSegForImageSegmentation(cfg).save_pretrained(folder)
    CLIPSegProcessor(image_processor=ViTImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok).save_pretrained(folder)
    return str(folder)


def _img(seed, w=40, h=30):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_edited_words():
    assert edited_words("a cat sitting on a mat", "a dog sitting on a mat") == (["cat"], ["dog"])
    assert edited_words("a red circle on a gray background", "a striped red circle on a gray background") == ([], ["striped"])
    assert edited_words("A photo of a Horse.", "a photo of a zebra") == (["horse"], ["zebra"])
    assert edited_words("a cat", "a cat") == ([], [])


def test_segment_shapes_and_threshold(tiny_clipseg):
    imgs = [_img(0), _img(1, 24, 36)]
    m = TextMasker(tiny_clipseg, threshold=0.5)
    masks = m.segment(imgs, ["circle", "red square"])
    assert [x.shape for x in masks] == [(30, 40), (36, 24)] and all(x.dtype == bool for x in masks)
    # the masks are the sigmoid heat map thresholded: 0 keeps everything, 1 nothing
    assert all(x.all() for x in TextMasker(tiny_clipseg, threshold=0.0).segment(imgs, ["circle", "square"]))
    assert not any(x.any() for x in TextMasker(tiny_clipseg, threshold=1.0).segment(imgs, ["circle", "square"]))
    # deterministic, and a batch equals single calls
    again = [m.segment([im], [p])[0] for im, p in zip(imgs, ["circle", "red square"])]
    assert all(np.array_equal(a, b) for a, b in zip(masks, again))
    # dilation only grows the mask
    dil = TextMasker(tiny_clipseg, threshold=0.5, dilate=2).segment(imgs, ["circle", "red square"])
    assert all((d | x).sum() == d.sum() and d.sum() >= x.sum() for d, x in zip(dil, masks))


def test_edit_mask_union_and_no_words(tiny_clipseg):
    m = TextMasker(tiny_clipseg, threshold=0.5)
    src, edt = _img(2), _img(3)
    union = m.edit_mask(src, edt, "a red circle", "a blue circle")
    a = m.segment([src], ["red"])[0]
    b = m.segment([edt], ["blue"])[0]
    assert np.array_equal(union, a | b)
    assert m.edit_mask(src, edt, "a red circle", "a red circle") is None


def test_background_metrics_use_text_masks(tiny_clipseg):
    src, edt = _img(4), _img(5)
    s = MetricInput(src, edt, "a red circle", "a blue circle")
    everything = BackgroundMetrics(metrics=["mse"], mask_from_text={"model": tiny_clipseg, "threshold": 0.0})
    nothing = BackgroundMetrics(metrics=["mse"], mask_from_text={"model": tiny_clipseg, "threshold": 1.0})
    assert math.isnan(everything([s])[0]["bg_mse"])  # the whole frame is "edited"
    full = ((np.asarray(src, np.float64) - np.asarray(edt, np.float64)) / 255.0) ** 2
    assert nothing([s])[0]["bg_mse"] == pytest.approx(full.mean(), rel=1e-5)
    # a sample's own mask wins over the text mask
    own = np.zeros((30, 40), bool)
    own[:, :20] = True
    assert nothing([MetricInput(src, edt, "a red circle", "a blue circle", mask=own)])[0]["bg_mse"] == pytest.approx(
        full[:, 20:].mean(), rel=1e-5)


def test_missing_model_error(tmp_path):
    m = TextMasker(str(tmp_path / "no_clipseg"))  # arguments only: the network loads on first use
    assert not m.loaded
    with pytest.raises(RuntimeError, match="mask_from_text.model"):
        m.load()
    with pytest.raises(RuntimeError, match="needed for samples without a mask"):  # same error, no second attempt
        m.segment([_img(0)], ["circle"])
    with pytest.raises(ValueError, match="threshold"):
        TextMasker(str(tmp_path / "no_clipseg"), threshold=2.0)
    with pytest.raises(ValueError, match="dilate"):
        TextMasker(str(tmp_path / "no_clipseg"), dilate=-1)


def test_clipseg_is_loaded_only_for_samples_without_a_mask(tmp_path, tiny_clipseg):
    """metrics=paper with every sample carrying its own mask runs without the CLIPSeg weights."""
    src, edt = _img(6), _img(7)
    own = np.zeros((30, 40), bool)
    own[:10] = True
    with_mask = MetricInput(src, edt, "a red circle", "a blue circle", mask=own)
    without = MetricInput(src, edt, "a red circle", "a blue circle")
    bg = BackgroundMetrics(metrics=["mse"], mask_from_text={"model": str(tmp_path / "no_clipseg")})
    bg.setup("cpu")
    full = ((np.asarray(src, np.float64) - np.asarray(edt, np.float64)) / 255.0) ** 2
    assert bg([with_mask, with_mask])[0]["bg_mse"] == pytest.approx(full[10:].mean(), rel=1e-5)
    assert not bg.masker.loaded
    with pytest.raises(RuntimeError, match="mask_from_text.model"):
        bg([without])
    ok = BackgroundMetrics(metrics=["mse"], mask_from_text={"model": tiny_clipseg, "threshold": 1.0})
    ok.setup("cpu")
    ok([with_mask])
    assert not ok.masker.loaded
    ok([without])
    assert ok.masker.loaded
