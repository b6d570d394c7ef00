"""CLIP metrics against their references: torchmetrics' CLIPScore (same HF model) and a direct
open_clip computation (same open_clip model, open_clip's own preprocessing)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from eval.base import MetricInput
from eval.clip import CLIPMetrics

PROMPTS = [
    ("a red circle on a gray background", "a blue circle on a gray background"),
    ("a green square on a beige background", "a green triangle on a beige background"),
    ("a yellow triangle on a pink background", "a striped yellow triangle on a pink background"),
]


def _img(seed, size=(80, 72)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _batch(with_masks=True):
    out = []
    for i, (sp, tp) in enumerate(PROMPTS):
        mask = None
        if with_masks:
            mask = np.zeros((72, 80), bool)
            mask[10 + i : 40 + i, 20:60] = True
        out.append(MetricInput(_img(i), _img(10 + i), sp, tp, mask=mask))
    return out


@pytest.fixture(scope="module")
def tiny_hf_clip(tmp_path_factory):
    """A random tiny transformers CLIPModel + CLIPProcessor saved to a local folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from oig.toy.tokenizer import save_tokenizer

    folder = tmp_path_factory.mktemp("hf_clip")
    save_tokenizer(folder, model_max_length=32)
    tok = CLIPTokenizer.from_pretrained(folder)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(cfg)
    with torch.no_grad():  # give image and text embeddings a shared direction so that scores are > 0 (clamp inactive)
        model.vision_model.post_layernorm.bias.fill_(1.0)
        model.text_model.final_layer_norm.bias.fill_(1.0)
        model.visual_projection.weight[0] += 0.5
        model.text_projection.weight[0] += 0.5
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from oig.testing import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


class _UnwrapFeatures(torch.nn.Module):
    """torchmetrics 1.9 expects get_*_features to return tensors; transformers 5 returns an output
    object whose pooler_output is the projected embedding. This shim only unwraps it."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.config = model.config

    def get_image_features(self, *a, **k):
        out = self.inner.get_image_features(*a, **k)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_text_features(self, *a, **k):
        out = self.inner.get_text_features(*a, **k)
        return out if isinstance(out, torch.Tensor) else out.pooler_output


def test_clip_score_equals_torchmetrics_clipscore(tiny_hf_clip):
    from torchmetrics.multimodal import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    ref = CLIPScore(model_name_or_path=lambda: (_UnwrapFeatures(CLIPModel.from_pretrained(tiny_hf_clip)),
                                                CLIPProcessor.from_pretrained(tiny_hf_clip)))
    m = CLIPMetrics(model=tiny_hf_clip, backend="hf", keys=["clip_score", "clip_edit_region"])
    m.setup("cpu")
    batch = _batch()
    ours = m(batch)
    for s, o in zip(batch, ours):
        ref.reset()
        want = float(ref(torch.from_numpy(np.array(s.edit)).permute(2, 0, 1), s.target_prompt).detach())
        assert o["clip_score"] == pytest.approx(want, abs=1e-4)
        # PIE-Bench's edited-region score: torchmetrics on edit * mask (uint8)
        ref.reset()
        region = np.uint8(np.asarray(s.edit) * s.mask[..., None])
        want = float(ref(torch.from_numpy(region).permute(2, 0, 1), s.target_prompt).detach())
        assert o["clip_edit_region"] == pytest.approx(want, abs=1e-4)
    # not a degenerate comparison: scores are positive (unclamped) and differ between samples
    assert all(o["clip_score"] > 0 and o["clip_edit_region"] > 0 for o in ours)
    assert len({round(o["clip_score"], 3) for o in ours}) == len(ours)


def test_open_clip_metrics_equal_direct_computation(tiny_clip):
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(tiny_clip)
    model.eval()
    tok = open_clip.get_tokenizer(tiny_clip)
    batch = _batch()
    m = CLIPMetrics(model=tiny_clip)  # all keys
    m.setup("cpu")
    ours = m(batch)
    with torch.no_grad():
        enc_i = lambda ims: F.normalize(model.encode_image(torch.stack([preprocess(i) for i in ims])), dim=-1)
        enc_t = lambda ts: F.normalize(model.encode_text(tok(ts)), dim=-1)
        e_edit, e_src = enc_i([s.edit for s in batch]), enc_i([s.source for s in batch])
        t_tgt, t_src = enc_t([s.target_prompt for s in batch]), enc_t([s.source_prompt for s in batch])
        e_reg = enc_i([Image.fromarray(np.uint8(np.asarray(s.edit) * s.mask[..., None])) for s in batch])
    for i, o in enumerate(ours):
        cos_t, cos_s = float(e_edit[i] @ t_tgt[i]), float(e_edit[i] @ t_src[i])
        assert o["clip_score"] == pytest.approx(max(100 * cos_t, 0.0), abs=1e-4)
        assert o["clip_acc"] == (1.0 if cos_t > cos_s else 0.0)
        assert o["clip_margin"] == pytest.approx(100 * (cos_t - cos_s), abs=1e-4)
        want_dir = float(F.cosine_similarity(e_edit[i] - e_src[i], t_tgt[i] - t_src[i], dim=0))
        assert o["clip_dir"] == pytest.approx(want_dir, abs=1e-5)
        assert o["clip_img_sim"] == pytest.approx(float(e_src[i] @ e_edit[i]), abs=1e-5)
        assert o["clip_edit_region"] == pytest.approx(max(100 * float(e_reg[i] @ t_tgt[i]), 0.0), abs=1e-4)
    # accuracy both ways on this random model is not forced: check it is a 0/1 indicator per sample
    assert {o["clip_acc"] for o in ours} <= {0.0, 1.0}


def test_clip_accuracy_known_answer(tiny_clip):
    """Swapping the prompts flips the accuracy of every sample without a tie and negates the margin."""
    m = CLIPMetrics(model=tiny_clip, keys=["clip_acc", "clip_margin", "clip_dir"])
    batch = _batch(with_masks=False)
    fwd = m(batch)
    rev = m([MetricInput(s.source, s.edit, s.target_prompt, s.source_prompt) for s in batch])
    for a, b in zip(fwd, rev):
        assert a["clip_acc"] + b["clip_acc"] == 1.0
        assert a["clip_margin"] == pytest.approx(-b["clip_margin"], abs=1e-4) and a["clip_margin"] != 0
    # identical source and edit: no image direction, cosine similarity 0 (torch's convention)
    same = m([MetricInput(batch[0].source, batch[0].source, batch[0].source_prompt, batch[0].target_prompt)])
    assert same[0]["clip_dir"] == 0.0


def test_edit_region_nan_rules(tiny_clip):
    s = _batch()[0]
    empty = np.zeros((72, 80), bool)
    plain = CLIPMetrics(model=tiny_clip, keys=["clip_edit_region"])
    pie = CLIPMetrics(model=tiny_clip, keys=["clip_edit_region"], region_convention="pie_bench")
    no_mask = MetricInput(s.source, s.edit, s.source_prompt, s.target_prompt)
    empty_mask = MetricInput(s.source, s.edit, s.source_prompt, s.target_prompt, mask=empty)
    assert math.isnan(plain([no_mask])[0]["clip_edit_region"])
    assert math.isnan(plain([empty_mask])[0]["clip_edit_region"])
    # PIE-Bench's border makes an empty mask non-empty, as in its evaluation code
    assert not math.isnan(pie([empty_mask])[0]["clip_edit_region"])
    assert set(plain([s])[0]) == {"clip_edit_region"}


def test_batched_equals_one_by_one(tiny_clip):
    m = CLIPMetrics(model=tiny_clip, batch_size=2)
    batch = _batch()
    together = m(batch)
    alone = [m([s])[0] for s in batch]
    for a, b in zip(together, alone):
        for k in a:
            assert a[k] == pytest.approx(b[k], abs=1e-4)


def test_bad_config_and_offline_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown keys"):
        CLIPMetrics(keys=["clip_nope"])
    with pytest.raises(ValueError, match="backend"):
        CLIPMetrics(backend="jax")
    m = CLIPMetrics(model=str(tmp_path / "no_such_clip"), backend="hf")
    with pytest.raises(RuntimeError, match="save_pretrained"):
        m.setup("cpu")
