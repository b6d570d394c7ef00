"""Target prompts by word swap (with the CLIP fallback), the task table, and the BLIP captioner."""

from pathlib import Path

import pytest
from PIL import Image

from oig.data.prompts import Captioner, CaptionerUnavailable, has_word, swap_details, word_swap
from oig.data.tasks import PIX2PIX_ZERO_TASKS, Task, get_task, get_tasks, load_tasks_file

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.mark.parametrize("caption,src,tgt,expected", [
    ("a cat on a sofa", "cat", "dog", "a dog on a sofa"),
    ("Cats sleeping in the sun", "cat", "dog", "Dogs sleeping in the sun"),
    ("two cats.", "cat", "dog", "two dogs."),
    ("CAT!!! (cute)", "cat", "dog", "CAT!!! (cute)".replace("CAT", "DOG")),
    ("my cat's toy, and another cat", "cat", "dog", "my dog's toy, and another dog"),
    ("a catalog of bobcat photos", "cat", "dog", None),  # substrings are not words
    ("a horse, grazing", "horse", "zebra", "a zebra, grazing"),
    ("three horses  in a field", "horse", "zebra", "three zebras  in a field"),
    ("wild foxes at night", "fox", "cat", "wild cats at night"),
    ("two puppies playing", "puppy", "kitten", "two kittens playing"),
    ("a cat on a mat", "cat", "cat wearing glasses", "a cat wearing glasses on a mat"),
    ("Cats on a mat", "cat", "cat wearing glasses", "Cats wearing glasses on a mat"),
    ("Trees by the lake", "tree", "tree in fall", "Trees in fall by the lake"),
    ("dogs", "dog", "fox", "foxes"),
])
def test_word_swap_exact(caption, src, tgt, expected):
    if expected is None:
        with pytest.raises(ValueError, match="does not occur.*no CLIP text encoder"):
            word_swap(caption, src, tgt)
        assert not has_word(caption, src)
        return
    assert word_swap(caption, src, tgt) == expected
    assert swap_details(caption, src, tgt).method == "exact"


def test_word_swap_fallback_with_stub_similarity():
    seen = []

    def sim(words, src):  # the most similar word is "kitten."'s core, then "bobcat"
        seen.append((list(words), src))
        return [{"kitten": 0.9, "bobcat": 0.5}.get(w, 0.1) for w in words]

    s = swap_details("A small kitten. on a (red) rug", "cat", "dog", similarity=sim)
    assert s.prompt == "A small dog. on a (red) rug" and s.method == "clip" and s.word == "kitten"
    assert seen[0] == (["A", "small", "kitten", "on", "a", "red", "rug"], "cat")  # punctuation stripped
    # the source word is a substring of the most similar word: only the substring is replaced
    assert word_swap("a Bobcat in snow", "cat", "dog", similarity=lambda ws, s: [w == "Bobcat" for w in ws]) == \
        "a Bobdog in snow"
    assert word_swap("Kitten, sleeping", "cat", "dog", similarity=lambda ws, s: [w == "Kitten" for w in ws]) == \
        "Dog, sleeping"  # capitalisation of the replaced word kept
    # ties go to the first word
    assert word_swap("x y", "cat", "dog", similarity=lambda ws, s: [1.0, 1.0]) == "dog y"
    with pytest.raises(ValueError, match="scores"):
        word_swap("x y", "cat", "dog", similarity=lambda ws, s: [1.0])
    with pytest.raises(ValueError, match="non-empty caption"):
        word_swap("  ", "cat", "dog")


def test_word_swap_fallback_with_tiny_clip(tmp_path):
    from oig.clip import load_clip
    from oig.testing import make_tiny_clip

    clip = load_clip(make_tiny_clip(tmp_path / "clip"))
    caption = "a red kitten sitting on a gray background"
    s1 = swap_details(caption, "cat", "dog", text_encoder=clip)
    s2 = swap_details(caption, "cat", "dog", text_encoder=clip)
    assert s1 == s2 and s1.method == "clip"
    before, after = caption.split(), s1.prompt.split()
    changed = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
    assert len(before) == len(after) and len(changed) == 1 and after[changed[0]] == "dog"
    # the chosen word is the one whose CLIP text feature is the most similar to "cat"
    import torch

    with torch.no_grad():
        f = clip.encode_text(before + ["cat"])
    sims = (f[:-1] @ f[-1]).tolist()
    assert changed[0] == max(range(len(sims)), key=lambda i: sims[i])
    # an exact match never consults the encoder
    assert swap_details("a red cat", "cat", "dog", text_encoder=clip).method == "exact"


def test_task_table_and_yaml_agree():
    from_yaml = load_tasks_file(CONF / "tasks" / "pix2pix_zero.yaml")
    assert [t.to_dict() for t in from_yaml] == [t.to_dict() for t in PIX2PIX_ZERO_TASKS.values()]
    assert {"cat2dog", "dog2cat", "horse2zebra", "zebra2horse", "cat2cat_glasses", "tree2fall"} == set(PIX2PIX_ZERO_TASKS)
    assert get_task("apple2orange") == Task("apple2orange", "apple", "orange")
    assert get_task({"source": "cat", "target": "tiger"}).name == "cat2tiger"
    assert get_tasks(["cat2dog", "dog2cat"])[1].source == "dog"
    assert Task("t", "cat", "owl").instruction_text() == "turn the cat into an owl"
    with pytest.raises(ValueError, match="unknown task"):
        get_task("catdog")
    with pytest.raises(ValueError, match="duplicate"):
        get_tasks(["cat2dog", "cat2dog"])
    with pytest.raises(ValueError, match="unknown keys"):
        get_task({"source": "cat", "target": "dog", "colour": "red"})


def _tiny_blip(folder: Path) -> str:
    """A random tiny BLIP captioner saved with a processor built offline (word-level BERT vocab)."""
    import torch
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    folder.mkdir(parents=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "picture", "of", "cat", "dog", "on",
             "the", "grass", "red", "sitting"]
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
    torch.manual_seed(0)
    BlipForConditionalGeneration(cfg).save_pretrained(folder)
    proc.save_pretrained(folder)
    return str(folder)


def test_captioner_tiny_blip_and_folder_dataset(tmp_path):
    from oig.data.folder import FolderDataset

    path = _tiny_blip(tmp_path / "blip")
    cap = Captioner(path, device="cpu", num_beams=2, max_length=12, min_length=4, cache_file=str(tmp_path / "caps.json"))
    img = Image.new("RGB", (40, 30), (120, 30, 30))
    c1 = cap(img)
    assert isinstance(c1, str) and c1 and not c1.lower().startswith("a picture of")
    assert set(c1.split()) <= {"a", "picture", "of", "cat", "dog", "on", "the", "grass", "red", "sitting"}
    # deterministic, memoised, persisted
    assert Captioner(path, device="cpu", num_beams=2, max_length=12, min_length=4)(img) == c1
    assert (tmp_path / "caps.json").exists()
    with pytest.raises(CaptionerUnavailable, match="/nonexistent/model: captioner folder not found"):
        Captioner("/nonexistent/model")(img)

    # a folder without prompts: captioner + word swap by the task (CLIP fallback from the toy-world tiny CLIP)
    from oig.testing import make_tiny_clip

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    img.save(imgs / "p1.png")
    Image.new("RGB", (8, 8)).save(imgs / "p2.png")
    ds = FolderDataset(str(imgs), captioner=cap, task="cat2dog", swap_clip=make_tiny_clip(tmp_path / "clip"))
    s1, s2 = list(ds)
    assert s1.error is None and s1.source_prompt == c1 and s1.task == "cat2dog"
    assert s1.target_prompt != s1.source_prompt and s1.meta["swap"] in ("exact", "clip")
    assert len(s1.target_prompt.split()) == len(c1.split())
    assert s2.image is None and "too small" in s2.error


def test_captioner_offline_hub_id_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cap = Captioner("Salesforce/blip-image-captioning-base")
    with pytest.raises(CaptionerUnavailable, match="(?s)could not load the captioner.*huggingface-cli download "
                                                   "Salesforce/blip-image-captioning-base --local-dir DIR"):
        cap(Image.new("RGB", (32, 32)))
