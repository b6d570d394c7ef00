"""The one door to CLIP models (oig.clip)."""

import torch

from oig.clip import load_clip
from oig.testing import make_tiny_clip

# which activation a CLIP gets (QuickGELU by declaration): tests/test_clip_quickgelu.py


def test_quick_gelu_is_built_when_forced(tmp_path):
    from open_clip.transformer import QuickGELU

    name = make_tiny_clip(tmp_path)
    plain = load_clip(name)
    forced = load_clip(name, quick_gelu=True)
    assert not any(isinstance(m, QuickGELU) for m in plain.model.modules())
    assert any(isinstance(m, QuickGELU) for m in forced.model.modules())
    assert (plain.activation.name, forced.activation.name) == ("GELU", "QuickGELU")


def test_preprocess_is_differentiable_and_matches_size(tmp_path):
    clip = load_clip(make_tiny_clip(tmp_path))
    x = torch.rand(2, 3, 48, 80, requires_grad=True)
    y = clip.preprocess_tensor(x)
    assert y.shape == (2, 3, clip.image_size, clip.image_size)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    v = clip.encode_image(torch.rand(1, 3, 64, 64))
    assert torch.allclose(v.norm(dim=-1), torch.ones(1), atol=1e-5)
