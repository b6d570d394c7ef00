"""Datasets: the base interface (ids, sharding, errors), toy world, folders, PIE-Bench, Hydra configs."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from oig.data.base import EditDataset, sanitize_id
from oig.data.folder import FolderDataset
from oig.data.pie_bench import EDITING_TYPES, PIEBench, decode_rle
from oig.data.toyworld import ToyWorld
from oig.toy import world
from oig.types import Sample

CONF = Path(__file__).resolve().parents[1] / "conf"


def _img(path, size=(32, 24), color=(200, 30, 30)):
    Image.new("RGB", size, color).save(path)
    return path


class _Numbers(EditDataset):
    name = "numbers"

    def __init__(self, n, bad=(), raw_ids=None, **kw):
        super().__init__(**kw)
        self.n, self.bad, self.raw_ids = n, set(bad), raw_ids

    def _list(self):
        ids = self.raw_ids or [f"s{i}" for i in range(self.n)]
        return [(r, i) for i, r in enumerate(ids)]

    def _describe(self, i):
        return {"source_prompt": f"src {i}", "target_prompt": f"tgt {i}", "task": "t"}

    def _load(self, sid, i):
        if i in self.bad:
            raise OSError(f"file{i}.png: disk on fire")
        return Sample(id=sid, image=Image.new("RGB", (16, 16)), **self._describe(i))


# ------------------------------------------------------------------ base


def test_sanitize_id_is_filesystem_safe():
    assert sanitize_id("cat_001.png") == "cat_001.png"
    for raw in ["../../etc/passwd", "a/b\\c", "..", ".hidden", "x" * 300, "猫 photo?.jpg", "a..b", ""]:
        s = sanitize_id(raw)
        assert s and "/" not in s and "\\" not in s and ".." not in s and not s.startswith(".")
        assert len(s) <= 120
        assert set(s) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
    # long ids stay distinct through the hash suffix
    assert sanitize_id("x" * 300 + "a") != sanitize_id("x" * 300 + "b")


def test_sharding_partitions_and_limit_applies_after_sharding():
    full = _Numbers(10).ids()
    shards = [_Numbers(10, shard=k, num_shards=3).ids() for k in range(3)]
    assert shards[0] == ["s0", "s3", "s6", "s9"] and shards[1] == ["s1", "s4", "s7"]
    assert sorted(sum(shards, [])) == sorted(full) and len(set(sum(shards, []))) == 10
    assert _Numbers(10, shard=1, num_shards=3, limit=2).ids() == ["s1", "s4"]
    assert len(_Numbers(10, limit=0)) == 0 and len(_Numbers(10, limit=50)) == 10
    assert [s.id for s in _Numbers(10, shard=2, num_shards=3)] == ["s2", "s5", "s8"]
    for bad in [dict(shard=3, num_shards=3), dict(shard=-1), dict(num_shards=0), dict(limit=-1)]:
        with pytest.raises(ValueError):
            _Numbers(3, **bad)


def test_duplicate_and_unsafe_ids_are_made_unique():
    ds = _Numbers(4, raw_ids=["a/b", "a_b", "a/b", "../x"])
    assert ds.ids() == ["a_b", "a_b-2", "a_b-3", "x"]
    assert [s.id for s in ds] == ds.ids()


def test_read_errors_become_error_samples_and_iteration_goes_on():
    ds = _Numbers(4, bad={1, 2})
    out = list(ds)
    assert [s.id for s in out] == ["s0", "s1", "s2", "s3"]
    assert out[0].error is None and out[0].image is not None
    assert out[1].image is None and "file1.png: disk on fire" in out[1].error and "OSError" in out[1].error
    assert "\n" not in out[1].error
    # error rows keep what is known without the file
    assert out[2].source_prompt == "src 2" and out[2].task == "t"
    # resume: skipped ids are not loaded
    assert [s.id for s in ds.iter_samples(skip={"s0", "s1"})] == ["s2", "s3"]


# ------------------------------------------------------------------ toy world


def test_toyworld_matches_benchmark():
    ds = ToyWorld(n_per_task=2, seed=123)
    ref = world.benchmark(2, 123)
    assert len(ds) == 8 and ds.name == "toyworld"
    samples = list(ds)
    for s, e in zip(samples, ref):
        assert s.id == e.id and s.task == e.task
        assert np.array_equal(np.asarray(s.image), e.source_image)
        assert np.array_equal(np.asarray(s.target_image), e.target_image)
        assert np.array_equal(s.mask, e.edit_mask) and s.mask.dtype == bool
        assert s.source_prompt == e.source.caption and s.target_prompt == e.target.caption
        assert s.instruction == e.instruction
        assert s.meta["source_scene"] == e.source and s.meta["target_scene"] == e.target
    sub = ToyWorld(n_per_task=3, tasks=["color_change"], limit=2)
    assert [s.task for s in sub] == ["color_change", "color_change"]
    with pytest.raises(ValueError, match="unknown toy tasks"):
        ToyWorld(tasks=["cat2dog"])


# ------------------------------------------------------------------ folder


def test_folder_csv_with_masks_and_bad_files(tmp_path):
    _img(tmp_path / "a.png")
    _img(tmp_path / "b.jpg", (40, 40), (10, 200, 10))
    m = np.zeros((24, 32), np.uint8)
    m[4:10, 5:20] = 255
    Image.fromarray(m).save(tmp_path / "a_mask.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    _img(tmp_path / "tiny.png", (8, 8))
    pd.DataFrame([
        {"file": "a.png", "source_prompt": "a red cat", "target_prompt": "a red dog", "mask": "a_mask.png", "task": "cat2dog"},
        {"file": "missing.png", "source_prompt": "x", "target_prompt": "y", "mask": "", "task": ""},
        {"file": "corrupt.png", "source_prompt": "x", "target_prompt": "y", "mask": "", "task": ""},
        {"file": "tiny.png", "source_prompt": "x", "target_prompt": "y", "mask": "", "task": ""},
        {"file": "b.jpg", "source_prompt": "a green cat", "target_prompt": "", "mask": "", "task": "cat2dog"},
    ]).to_csv(tmp_path / "prompts.csv", index=False)
    ds = FolderDataset(str(tmp_path))
    out = {s.id: s for s in ds}
    assert list(out) == ["a.png", "missing.png", "corrupt.png", "tiny.png", "b.jpg"]
    a = out["a.png"]
    assert a.error is None and a.image.size == (32, 24) and a.task == "cat2dog"
    assert a.mask.shape == (24, 32) and a.mask.sum() == 6 * 15 and a.mask[5, 6] and not a.mask[0, 0]
    assert a.instruction == "turn the cat into a dog"
    assert out["missing.png"].image is None and "missing.png: file not found" in out["missing.png"].error
    assert "corrupt.png: corrupt or truncated image" in out["corrupt.png"].error
    assert "tiny.png" in out["tiny.png"].error and "too small (8x8" in out["tiny.png"].error
    assert out["missing.png"].source_prompt == "x"  # error rows keep the prompts
    # empty target prompt -> word swap by the row's task
    assert out["b.jpg"].target_prompt == "a green dog" and out["b.jpg"].meta["swap"] == "exact"


def test_folder_json_and_missing_prompts(tmp_path):
    _img(tmp_path / "one.png")
    _img(tmp_path / "two.png")
    (tmp_path / "prompts.json").write_text(json.dumps({
        "one.png": {"source_prompt": "a photo of a cat", "target_prompt": "a photo of a dog", "instruction": "dogify"},
        "two.png": {"target_prompt": "a dog"},
    }))
    out = list(FolderDataset(str(tmp_path)))
    assert out[0].source_prompt == "a photo of a cat" and out[0].instruction == "dogify" and out[0].error is None
    assert out[1].image is None and "two.png: no source_prompt and no captioner configured" in out[1].error


def test_folder_errors_at_construction(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        FolderDataset(str(tmp_path / "nope"))
    _img(tmp_path / "x.png")
    with pytest.raises(ValueError, match="no prompts.csv or prompts.json"):
        FolderDataset(str(tmp_path))
    (tmp_path / "prompts.csv").write_text("image,source_prompt\nx.png,a cat\n")
    with pytest.raises(ValueError, match="row 1 has no 'file'"):
        FolderDataset(str(tmp_path))


# ------------------------------------------------------------------ PIE-Bench


def test_decode_rle_against_hand_built_mask():
    h, w = 4, 5
    ref = np.zeros((h, w), bool)
    ref[0, 1:3] = True  # flat 1, 2
    ref[1, 4] = True  # flat 9 ...
    ref[2, 0:2] = True  # ... 10, 11 (a run across the row end)
    ref[3, 4] = True  # flat 19, with a length running past the end (clipped)
    m = decode_rle([1, 2, 9, 3, 19, 5], h, w)
    assert m.dtype == bool and np.array_equal(m, ref)
    b = decode_rle([1, 2], h, w, border=True)
    assert b[0].all() and b[-1].all() and b[:, 0].all() and b[:, -1].all() and not b[1:-1, 1:-1].any()
    assert decode_rle([], 3, 3).sum() == 0
    full = decode_rle([0, 512 * 512])
    assert full.shape == (512, 512) and full.all()
    with pytest.raises(ValueError, match="even number"):
        decode_rle([1, 2, 3], h, w)
    with pytest.raises(ValueError, match="outside"):
        decode_rle([25, 2], h, w)


def _pie(root: Path):
    (root / "annotation_images" / "1_change_object_80").mkdir(parents=True)
    (root / "annotation_images" / "8_change_background_80").mkdir(parents=True)
    _img(root / "annotation_images" / "1_change_object_80" / "a.jpg", (512, 512))
    _img(root / "annotation_images" / "8_change_background_80" / "b.jpg", (256, 256))
    mapping = {
        "111000000000": {"image_path": "1_change_object_80/a.jpg", "original_prompt": "a [cat] sitting on a [red] car",
                         "editing_prompt": "a [dog] sitting on a [red] car", "editing_instruction": "make the cat a dog",
                         "editing_type_id": "1", "blended_word": "cat dog", "mask": [512 * 10 + 20, 30]},
        "811000000000": {"image_path": "8_change_background_80/b.jpg", "original_prompt": "a house in [summer]",
                         "editing_prompt": "a house in [winter]", "editing_instruction": "make it winter",
                         "editing_type_id": "8", "blended_word": "", "mask": [0, 512 * 256]},
        "811000000001": {"image_path": "8_change_background_80/missing.jpg", "original_prompt": "a [tree]",
                         "editing_prompt": "a [bush]", "editing_instruction": "", "editing_type_id": "8",
                         "blended_word": "tree bush", "mask": [0, 3, 5]},
    }
    (root / "mapping_file.json").write_text(json.dumps(mapping))


def test_pie_bench_reads_strips_brackets_and_filters(tmp_path):
    _pie(tmp_path)
    ds = PIEBench(str(tmp_path), mask_border=False)
    out = {s.id: s for s in ds}
    assert list(out) == ["111000000000", "811000000000", "811000000001"]
    a = out["111000000000"]
    assert a.source_prompt == "a cat sitting on a red car" and a.target_prompt == "a dog sitting on a red car"
    assert a.instruction == "make the cat a dog" and a.task == EDITING_TYPES["1"] == "change_object"
    assert a.meta["blended_word"] == "cat dog" and a.meta["editing_type_id"] == "1"
    assert a.meta["original_prompt_raw"] == "a [cat] sitting on a [red] car"
    assert a.mask.shape == (512, 512) and a.mask.sum() == 30 and a.mask[10, 20:50].all()
    b = out["811000000000"]
    assert b.image.size == (256, 256) and b.mask.shape == (256, 256)  # resized to the image
    assert b.mask[:128].all() and not b.mask[128:].any()
    assert out["811000000001"].image is None and "missing.jpg: file not found" in out["811000000001"].error
    only8 = PIEBench(str(tmp_path), editing_types=["8"])
    assert only8.ids() == ["811000000000", "811000000001"] and all(s.task == "change_background" for s in only8)
    assert PIEBench(str(tmp_path), editing_types=[1]).ids() == ["111000000000"]
    bordered = next(iter(PIEBench(str(tmp_path), editing_types=["1"])))
    assert bordered.mask[0].all() and bordered.mask.sum() == 30 + 4 * 512 - 4
    with pytest.raises(ValueError, match="unknown PIE-Bench editing types"):
        PIEBench(str(tmp_path), editing_types=["12"])
    with pytest.raises(FileNotFoundError, match="mapping_file.json"):
        PIEBench(str(tmp_path / "nope"))


# ------------------------------------------------------------------ Hydra configs


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(config_name="config", overrides=overrides)


def test_dataset_configs_instantiate_with_hydra(tmp_path):
    from hydra.utils import instantiate

    ds = instantiate(_compose([]).dataset)  # the default
    assert isinstance(ds, ToyWorld) and len(ds) == 16

    folder = tmp_path / "imgs"
    folder.mkdir()
    _img(folder / "a.png")
    (folder / "prompts.csv").write_text("file,source_prompt,target_prompt\na.png,a cat,a dog\n")
    ds = instantiate(_compose(["dataset=folder", f"dataset.path={folder}", "dataset.limit=1"]).dataset)
    assert isinstance(ds, FolderDataset) and [s.target_prompt for s in ds] == ["a dog"]

    _pie(tmp_path / "pie")
    ds = instantiate(_compose(["dataset=pie_bench", f"dataset.root={tmp_path / 'pie'}",
                               "dataset.editing_types=[8]"]).dataset)
    assert isinstance(ds, PIEBench) and len(ds) == 2 and ds.mask_border

    from oig.data.laion import MANIFEST_COLUMNS, LaionTasks

    man = tmp_path / "manifest.parquet"
    pd.DataFrame([{"id": "cat2dog_x", "task": "cat2dog", "url": "http://127.0.0.1:9/x.jpg", "caption": "a cat",
                   "source_prompt": "a cat", "target_prompt": "a dog", "instruction": "i", "width": 600,
                   "height": 600, "source_word": "cat", "target_word": "dog"}], columns=MANIFEST_COLUMNS).to_parquet(man)
    ds = instantiate(_compose(["dataset=laion", f"dataset.manifest={man}",
                               f"dataset.cache_dir={tmp_path / 'cache'}"]).dataset)
    assert isinstance(ds, LaionTasks) and ds.ids() == ["cat2dog_x"]
    s = next(iter(ds))
    assert s.image is None and "not downloaded yet" in s.error and s.target_prompt == "a dog"

    # the synthetic config is composed (model/device interpolation) but generates lazily
    from oig.data.synthetic import SyntheticDataset

    ds = instantiate(_compose(["dataset=synthetic", "device=cpu", "dtype=fp32"]).dataset)
    assert isinstance(ds, SyntheticDataset) and len(ds) == 4 and ds.model == "toy" and ds._core is None
