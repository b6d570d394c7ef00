"""The README's "Adding your own method" example runs as written."""

import re
from pathlib import Path

import numpy as np
import yaml

from oig.types import EditRequest

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_editor_example_runs(tiny_models, rand_image):
    text = README.read_text()
    code = re.search(r"```python\n(# baselines/negative_swap.py.*?)```", text, re.S).group(1)
    conf = re.search(r"```yaml\n(# conf/method/negative_swap.yaml.*?)```", text, re.S).group(1)
    ns: dict = {}
    exec(compile(code, "README-example", "exec"), ns)
    cls = ns["NegativeSwap"]
    cfg = yaml.safe_load(conf)
    assert cfg.pop("_target_") == "baselines.negative_swap.NegativeSwap"
    ed = cls(**{**cfg, "steps": 3}).bind(tiny_models)
    r = ed(EditRequest(rand_image, "a red circle", "a blue circle"))
    assert r.image.size == r.source.size and np.asarray(r.image).std() > 0
    assert ed.hparams()["boost"] == 1.0 and ed.hparams()["negative"] == "source"
    from oig.registry import EDITORS

    assert EDITORS.pop("negative_swap") is cls  # registered by name (and removed again)
