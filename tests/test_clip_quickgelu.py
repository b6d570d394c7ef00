"""QuickGELU by declaration (oig.clip.clip_activation / load_clip): the architecture name, a folder's
config, open_clip's registry for pretrained tags or an explicit ``quick_gelu`` decide it, never a file
name; GELU for weights declared OpenAI's is refused with the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from oig.clip import CLIPActivationError, clip_activation, load_clip, quick_gelu_name
from oig.testing import make_tiny_clip


@pytest.mark.parametrize("name,pretrained,quick_gelu,want", [
    ("ViT-B-32", "openai", None, True),                         # the tag: open_clip's registry says QuickGELU
    ("ViT-B-32", "metaclip_400m", None, True),                  # ... not only OpenAI's tags
    ("ViT-B-32", "laion2b_s34b_b79k", None, False),
    ("ViT-B-32-quickgelu", "/w/open_clip_pytorch_model.bin", None, True),  # OpenAI weights as a local file
    ("ViT-B-32-quickgelu", "openai", None, True),
    ("ViT-B-32", "/w/open_clip_pytorch_model.bin", None, False),  # nothing declares QuickGELU
    ("ViT-B-32", "/w/ViT-B-32-openai.bin", True, True),
    ("ViT-B-32", "/w/ViT-B-32-openai.bin", False, False),        # declared GELU: the file name decides nothing
    ("toy", None, None, False),
])
def test_activation_follows_the_declaration(name, pretrained, quick_gelu, want):
    assert clip_activation(name, pretrained, quick_gelu).quick_gelu is want


@pytest.mark.parametrize("name,pretrained,quick_gelu,match", [
    ("ViT-B-32", "openai", False, "trained with QuickGELU"),
    ("ViT-B-32-quickgelu", "/w/x.bin", False, "contradicts the architecture"),
    ("ViT-B-32", "/w/ViT-B-32-openai.bin", None, r"named as OpenAI's.*'ViT-B-32-quickgelu'.*quick_gelu=true"),
    ("ViT-L-14", "/w/openai/ViT-L-14.pt", None, r"'ViT-L-14-quickgelu'.*model.guidance_clip.name.*metrics.clip.model"),
])
def test_gelu_for_openai_weights_is_refused(name, pretrained, quick_gelu, match):
    with pytest.raises(CLIPActivationError, match=match):
        clip_activation(name, pretrained, quick_gelu)
    with pytest.raises(CLIPActivationError):  # the loader refuses before building anything
        load_clip(name, pretrained, quick_gelu=quick_gelu)


def test_quick_gelu_twin_names():
    assert quick_gelu_name("ViT-B-32") == "ViT-B-32-quickgelu"
    assert quick_gelu_name("ViT-B-32-quickgelu") is None
    assert quick_gelu_name("local-dir:/w/clip") is None


def _text_features(clip):
    return clip.encode_text(["a red circle on a gray background"])


def _is_quick(clip) -> bool:
    from open_clip.transformer import QuickGELU

    return any(isinstance(m, QuickGELU) for m in clip.model.modules())


@pytest.fixture(scope="module")
def tiny_builtin(tmp_path_factory):
    """The tiny random CLIP registered as open_clip built-in names ``oig-qg-tiny`` (GELU) and
    ``oig-qg-tiny-quickgelu``, with its weights as a plain file (not a folder)."""
    import open_clip

    root = tmp_path_factory.mktemp("qg")
    folder = Path(make_tiny_clip(root / "clip").split(":", 1)[1])
    cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
    cfg["text_cfg"]["hf_tokenizer_name"] = str(folder)
    (root / "cfgs").mkdir()
    (root / "cfgs" / "oig-qg-tiny.json").write_text(json.dumps(cfg))
    (root / "cfgs" / "oig-qg-tiny-quickgelu.json").write_text(json.dumps({**cfg, "quick_gelu": True}))
    open_clip.add_model_config(root / "cfgs")
    weights = root / "weights" / "open_clip_model.safetensors"
    weights.parent.mkdir()
    weights.write_bytes((folder / "open_clip_model.safetensors").read_bytes())
    return str(weights), folder


def test_quickgelu_name_with_a_local_weights_file(tiny_builtin, tmp_path):
    weights, _ = tiny_builtin
    declared = load_clip("oig-qg-tiny-quickgelu", weights)
    forced = load_clip("oig-qg-tiny", weights, quick_gelu=True)
    plain = load_clip("oig-qg-tiny", weights)
    assert _is_quick(declared) and _is_quick(forced) and not _is_quick(plain)
    assert declared.activation.reason == "the architecture 'oig-qg-tiny-quickgelu' declares QuickGELU"
    assert torch.equal(_text_features(declared), _text_features(forced))
    assert not torch.allclose(_text_features(declared), _text_features(plain), atol=1e-3)  # the activation matters
    # the same weights under a name that says OpenAI: refused with the twin name as the fix
    named = tmp_path / "openai-weights.safetensors"
    named.write_bytes(Path(weights).read_bytes())
    with pytest.raises(CLIPActivationError, match="'oig-qg-tiny-quickgelu'"):
        load_clip("oig-qg-tiny", str(named))
    assert _is_quick(load_clip("oig-qg-tiny-quickgelu", str(named)))


def test_local_dir_folders_declare_in_their_config(tiny_builtin, tmp_path):
    _, folder = tiny_builtin
    quick = tmp_path / "clip-quick"
    quick.mkdir()
    for f in folder.iterdir():
        (quick / f.name).write_bytes(f.read_bytes())
    p = quick / "open_clip_config.json"
    cfg = json.loads(p.read_text())
    cfg["model_cfg"]["quick_gelu"] = True
    p.write_text(json.dumps(cfg))
    assert _is_quick(load_clip(f"local-dir:{quick}"))
    openai_named = tmp_path / "clip_openai"
    openai_named.mkdir()
    for f in folder.iterdir():
        (openai_named / f.name).write_bytes(f.read_bytes())
    with pytest.raises(CLIPActivationError, match=r'"quick_gelu": true in model_cfg of .*clip_openai'):
        load_clip(f"local-dir:{openai_named}")
    assert not _is_quick(load_clip(f"local-dir:{openai_named}", quick_gelu=False))  # declared GELU
