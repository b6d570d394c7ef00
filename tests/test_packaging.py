"""oig installs like a library: the wheel carries the Hydra configs (one copy of each), a plain
wheel install in a fresh virtual environment runs ``oig-run`` and ``oig-report`` from an empty
directory, the editable install finds the same configs from anywhere, and the toy model folder
loads with plain diffusers as its README shows."""

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from oig.run import CONF_DIR

ROOT = Path(__file__).resolve().parent.parent
# what a source copy for building leaves out: local environments, outputs, caches, build debris
SKIP = shutil.ignore_patterns(".venv", ".git", "runs", "multirun", "outputs", ".cache", "build", "dist", "*.egg-info",
                              "__pycache__", ".pytest_cache", "wandb", ".toy_train", ".ipynb_checkpoints")


def _yamls(d: Path) -> list[str]:
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*.yaml"))


def test_one_copy_of_every_config():
    """The configs live in the package; the checkout's conf/ is a link to them, not a copy."""
    import oig

    assert CONF_DIR == Path(oig.__file__).resolve().parent / "conf"
    assert (ROOT / "conf").is_symlink() and (ROOT / "conf").resolve() == CONF_DIR
    names = _yamls(CONF_DIR)
    assert {"config.yaml", "method/oig.yaml", "protocol/table1/oig.yaml", "tasks/pix2pix_zero.yaml"} <= set(names)
    assert _yamls(ROOT / "conf") == names


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel, built (offline: no build isolation, no dependencies) from a copy of the checkout."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=SKIP)
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                        "--no-index", "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    (whl,) = (tmp / "dist").glob("oig-*.whl")
    return whl


@pytest.mark.slow
def test_wheel_carries_the_configs(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    packaged = sorted(n[len("oig/conf/"):] for n in names if n.startswith("oig/conf/") and n.endswith(".yaml"))
    assert packaged == _yamls(CONF_DIR)
    assert [n for n in names if n.endswith(".yaml") and not n.startswith("oig/conf/")] == []  # one copy
    assert "oig/conf/__init__.py" in names and "oig/toy/models/sd/unet/config.json" in names
    assert not any(n.startswith(("conf/", "tests/")) for n in names)


def _fresh_venv(tmp: Path) -> Path:
    """A virtual environment without oig whose dependencies (torch, diffusers, ...) come from this
    environment's site-packages, through a .pth file pointing at a folder of links to every entry
    there except oig's own (its editable finder and metadata): nothing is downloaded and the
    checkout is not importable."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    deps = tmp / "deps"
    deps.mkdir()
    for p in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if p.name.startswith(("__editable__", "oig-", "oig.", "_oig")) or p.suffix == ".pth" or p.name == "oig":
            continue
        (deps / p.name).symlink_to(p)
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip()
    (Path(site) / "_oig_test_deps.pth").write_text(f"{deps}\n")
    return venv


def _pip_install(venv: Path, *args: str):
    p = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet",
                        "--no-deps", "--no-index", *args], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.fixture(scope="module")
def wheel_venv(wheel, tmp_path_factory):
    """A fresh virtual environment with the wheel installed (a plain install, no editable finder)."""
    venv = _fresh_venv(tmp_path_factory.mktemp("venv"))
    _pip_install(venv, str(wheel))
    return venv


def _clean_env():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "OIG_ROOT",
                                                           "OIG_CACHE")}
    return {**env, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.mark.slow
def test_installed_wheel_runs_and_reports_from_an_empty_directory(wheel_venv, tmp_path):
    work = tmp_path / "empty"
    work.mkdir()
    env, bin_ = _clean_env(), wheel_venv / "bin"
    code = ("import importlib.util, json, sys, oig; "
            "print(json.dumps([oig.__file__, importlib.util.find_spec('oig.conf').origin, sys.path]))")
    where = subprocess.run([str(bin_ / "python"), "-c", code], cwd=work, env=env, capture_output=True, text=True,
                           timeout=300)
    assert where.returncode == 0, where.stderr
    oig_file, conf_init, path = json.loads(where.stdout)
    assert Path(oig_file).is_relative_to(wheel_venv) and Path(conf_init).is_relative_to(wheel_venv)
    assert not any(str(ROOT) == p or p.startswith(str(ROOT) + os.sep) for p in path if p), path

    run = subprocess.run([str(bin_ / "oig-run"), "method=ddim_word_swap", "method.steps=2", "dataset.limit=2",
                          "progress=false", "hydra.run.dir=run"], cwd=work, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    out = work / "run"
    for f in ("config.yaml", "results.parquet", "summary.json", "grid.png", ".hydra/config.yaml",
              ".hydra/overrides.yaml"):
        assert (out / f).is_file(), f
    rows = [json.loads(f.read_text()) for f in sorted((out / "rows").glob("*.json"))]
    assert [(r["id"], r["status"], r["method"], r["hp_steps"]) for r in rows] == [
        ("toy_color_change_0000", "ok", "ddim_word_swap", 2), ("toy_shape_swap_0000", "ok", "ddim_word_swap", 2)]
    assert all(0.0 <= r["toy_edit_success"] <= 1.0 and r["clip_score"] == r["clip_score"] for r in rows)
    for r in rows:
        assert sorted(p.name for p in (out / "images" / r["id"]).iterdir()) == ["edit.png", "source.png", "target.png"]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["samples"], summary["errors"], summary["method"]) == (2, 0, "ddim_word_swap")
    assert (work / ".cache" / "oig").is_dir()  # paths.root_dir is the working directory
    loaded = [x for x in (out / "run.log").read_text().splitlines() if "oig.models" in x and " loaded " in x]
    assert loaded and f"loaded {wheel_venv}" in loaded[0] and "/oig/toy/models/sd on cpu" in loaded[0], loaded

    rep = subprocess.run([str(bin_ / "oig-report"), "run", "--out", "report"], cwd=work, env=env, capture_output=True,
                         text=True, timeout=600)
    assert rep.returncode == 0, (rep.stdout + rep.stderr)[-3000:]
    made = {p.name for p in (work / "report").iterdir()}
    assert {"report.csv", "report_rows.csv", "report.md", "report_grid.png"} <= made, made
    assert "ddim_word_swap" in (work / "report" / "report.md").read_text()


@pytest.mark.slow
def test_fresh_editable_install_finds_the_configs_from_anywhere(tmp_path):
    """``pip install -e`` of a checkout (a copy) into a fresh environment: oig-run composes the
    packaged configs from an empty directory, and the code comes from that checkout."""
    src = tmp_path / "checkout"
    shutil.copytree(ROOT, src, symlinks=True, ignore=SKIP)
    venv = _fresh_venv(tmp_path)
    _pip_install(venv, "--no-build-isolation", "-e", str(src))
    work = tmp_path / "empty"
    work.mkdir()
    code = "import json, oig.run; print(json.dumps([oig.run.__file__, str(oig.run.CONF_DIR)]))"
    where = subprocess.run([str(venv / "bin" / "python"), "-c", code], cwd=work, env=_clean_env(), capture_output=True,
                           text=True, timeout=300)
    assert where.returncode == 0, where.stderr[-3000:]
    assert json.loads(where.stdout) == [str(src / "oig" / "run.py"), str(src / "oig" / "conf")]
    p = subprocess.run([str(venv / "bin" / "oig-run"), "--cfg", "job", "method=pnp"], cwd=work, env=_clean_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "_target_: baselines.pnp.PnP" in p.stdout and "retry_errors: true" in p.stdout
    assert list(work.iterdir()) == []


def test_editable_install_finds_the_configs_from_anywhere(tmp_path):
    """The development install (this environment) composes the packaged configs outside the checkout."""
    p = subprocess.run([sys.executable, "-m", "oig.run", "--cfg", "job", "method=sdedit"], cwd=tmp_path,
                       env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "_target_: baselines.sdedit.SDEdit" in p.stdout and "retry_errors: true" in p.stdout
    assert list(tmp_path.iterdir()) == []  # --cfg job writes nothing


def test_toy_models_readme_snippet_runs_as_written(monkeypatch):
    text = (ROOT / "oig" / "toy" / "models" / "README.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", text, re.S)
    assert 'from_pretrained("oig/toy/models/sd", torch_dtype=torch.float32)' in code
    monkeypatch.chdir(ROOT)  # the README's path is relative to the checkout's root
    ns: dict = {}
    exec(compile(code, "oig/toy/models/README.md", "exec"), ns)
    image = ns["image"]
    assert image.size == (64, 64) and image.mode == "RGB"
    import numpy as np

    assert np.asarray(image).std() > 0
