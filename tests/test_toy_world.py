"""The toy world: generator, exact edit tasks, oracle, tokenizer."""

import random

import numpy as np
import pytest

from oig.toy import world
from oig.toy.tokenizer import WORDS, save_tokenizer


def test_scenes_are_deterministic_and_varied():
    a = [world.random_scene(random.Random(i)) for i in range(200)]
    b = [world.random_scene(random.Random(i)) for i in range(200)]
    assert a == b
    assert {s.shape for s in a} == set(world.SHAPES) and {s.color for s in a} == set(world.COLORS)
    assert {s.background for s in a} == set(world.BACKGROUNDS) and {True, False} == {s.striped for s in a}
    for s in a:
        img = world.render(s)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        m = world.object_mask(s)
        assert m.any() and (img[m] == world.COLORS[s.color]).all(1).any()
        # the background is not flat: sky above the horizon, darker ground below
        bg = np.array(world.BACKGROUNDS[s.background])
        assert (img[0, 0] == bg).all() and (img[63, 0] == np.round(bg * world.HORIZON_SHADE)).all() or m[0, 0] or m[63, 0]


def test_caption_grammar():
    s = world.Scene("circle", "red", "gray", False, 30, 30, 10, 45)
    assert s.caption == "a red circle on a gray background"
    assert s.replace(striped=True).caption == "a striped red circle on a gray background"


def test_oracle_reads_every_attribute_of_renders():
    o = world.Oracle()
    for i in range(300):
        s = world.random_scene(random.Random(10_000 + i))
        assert all(o.check(world.render(s), s).values()), s
        # and float images in [0, 1]
    s = world.random_scene(random.Random(3))
    assert all(o.check(world.render(s) / 255.0, s).values())


@pytest.mark.parametrize("task", world.TASKS)
def test_edits_change_exactly_the_task_attribute_inside_the_mask(task):
    o = world.Oracle()
    for e in world.benchmark(10, tasks=(task,)):
        changed = (e.source_image != e.target_image).any(-1)
        assert changed.any()
        assert not (changed & ~e.edit_mask).any()  # nothing changes outside the edit mask
        attr = world.TASK_ATTRIBUTE[task]
        src_read, tgt_read = o.check(e.target_image, e.source), o.check(e.target_image, e.target)
        assert all(tgt_read.values())
        assert not src_read[attr] and all(v for k, v in src_read.items() if k != attr)
        assert e.source_prompt == e.source.caption and e.target_prompt == e.target.caption
        assert e.instruction and e.id.startswith(f"toy_{task}_")
        if task == "shape_swap":  # same place, size and colour
            assert (e.source.cx, e.source.cy, e.source.r, e.source.color) == (e.target.cx, e.target.cy, e.target.r, e.target.color)


def test_benchmark_is_held_out_and_interleaved():
    b = world.benchmark(2)
    assert [e.task for e in b[:4]] == list(world.TASKS)
    assert len({e.id for e in b}) == 8
    with pytest.raises(ValueError, match="plain source"):
        world.make_edit(world.random_scene(random.Random(0), striped=True), "appearance_change", random.Random(0))
    with pytest.raises(ValueError, match="unknown toy task"):
        world.make_edit(world.random_scene(random.Random(0)), "rotate", random.Random(0))


def test_word_level_tokenizer(tmp_path):
    from transformers import CLIPTokenizer

    save_tokenizer(tmp_path)
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    for w in WORDS:
        ids = tok(w).input_ids
        assert len(ids) == 3, (w, tok.convert_ids_to_tokens(ids))  # BOS, the word, EOS
    # unknown words still tokenize, into several known pieces
    ids = tok("zebra").input_ids
    assert len(ids) > 3 and tok.unk_token_id not in ids[1:-1]
    assert tok("A Red circle!").input_ids[1:4] == tok("a red circle !").input_ids[1:4]
