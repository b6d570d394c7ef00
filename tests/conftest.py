import os

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(int(os.environ.get("OIG_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory):
    from oig.testing import make_tiny_sd

    return str(make_tiny_sd(tmp_path_factory.mktemp("tiny_sd")))


@pytest.fixture(scope="session")
def tiny_models(tiny_sd_path):
    from oig.models import load_sd

    return load_sd(tiny_sd_path, device="cpu", dtype="fp32")


@pytest.fixture
def toy_image():
    from oig.toy import world
    import random

    s = world.random_scene(random.Random(7), striped=False)
    return Image.fromarray(world.render(s)), s


@pytest.fixture
def rand_image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
