"""Plugins outside the repository: the example package under examples/ is pip-installed into its own
folder and found by entry points (registry) and by its config package (oig-run); the registry's
plugin rules on fake entry points."""

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import oig.registry as reg
from oig.run import CONF_DIR

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "oig_plugin_example"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    """The example plugin installed (pip, no dependencies, no build isolation: offline) into a folder
    of its own, put on PYTHONPATH by the tests that use it; built from a copy so the checkout stays clean."""
    tmp = tmp_path_factory.mktemp("plugin")
    src = tmp / "src"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp / "site"
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "--no-index", "--target", str(target), str(src)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    return target


def _env(plugin_dir=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    if plugin_dir is not None:
        env["PYTHONPATH"] = str(plugin_dir)
    return env


@pytest.mark.slow
def test_registry_lists_the_installed_plugin(plugin_dir, tmp_path):
    code = textwrap.dedent("""
        import json
        from oig.registry import get_editor, get_metric, list_editors, list_metrics, plugin_of, plugin_config_packages
        print(json.dumps({"editors": list_editors(), "metrics": list_metrics(),
                          "editor": get_editor("masked_swap").__module__,
                          "metric": get_metric("outside_change").__module__,
                          "plugin_of": plugin_of("masked_swap"), "configs": plugin_config_packages()}))
    """)
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(plugin_dir), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert {"masked_swap", "oig", "ddim_word_swap", "pnp"} <= set(got["editors"])
    assert {"outside_change", "clip", "toy_oracle"} <= set(got["metrics"])
    assert got["editor"] == "oig_plugin_example.editor" and got["metric"] == "oig_plugin_example.metric"
    assert got["plugin_of"] == "oig-plugin-example 0.1.0"
    assert got["configs"] == [["oig_plugin_example", "oig_plugin_example.conf"]]


@pytest.mark.slow
def test_oig_run_with_the_plugins_editor_and_metric(plugin_dir, tmp_path):
    args = [str(BIN / "oig-run"), "method=masked_swap", "metrics=outside_change", "method.steps=2", "dataset.limit=2",
            "progress=false", f"cache.dir={tmp_path}/cache"]
    p = subprocess.run([*args, "hydra.run.dir=run"], cwd=tmp_path, env=_env(plugin_dir), capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    rows = [json.loads(f.read_text()) for f in sorted((tmp_path / "run" / "rows").glob("*.json"))]
    assert len(rows) == 2 and {r["status"] for r in rows} == {"ok"}, rows
    assert {r["method"] for r in rows} == {"masked_swap"} and {r["hp_steps"] for r in rows} == {2}
    # the editor kept the source outside the mask, and the plugin's metric measured it
    assert [r["outside_change_max"] for r in rows] == [0.0, 0.0]
    assert all(r["inside_change_mean"] > 0 for r in rows)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["outside_change_max"] == 0.0
    # without the plugin (this process) the same configs do not exist
    from hydra.errors import MissingConfigException

    reg.use_plugin_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        with pytest.raises(MissingConfigException, match="method/masked_swap"):
            compose(config_name="config", overrides=["method=masked_swap"])


# ------------------------------------------------------------------ registry rules, fake entry points


@pytest.fixture
def fake_plugins(tmp_path, monkeypatch):
    """``install(group, name, value)`` adds a fake entry point; modules go in a temp folder on sys.path.
    The registry's plugin state is reset before and after."""
    eps: dict[str, list[EntryPoint]] = {}
    monkeypatch.setattr(reg, "_entry_points", lambda group: list(eps.get(group, [])))
    monkeypatch.syspath_prepend(str(tmp_path))
    reg._reset_plugins()

    class Fake:
        path = tmp_path

        @staticmethod
        def module(name, source):
            (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))

        @staticmethod
        def install(group, name, value):
            eps.setdefault(group, []).append(EntryPoint(name, value, group))

    yield Fake
    reg._reset_plugins()
    for name in [m for m in sys.modules if m.startswith("fakeplug_")]:
        del sys.modules[name]


def test_plugin_classes_are_found_by_name(fake_plugins):
    fake_plugins.module("fakeplug_a", """
        from oig.editor import Editor
        from eval.base import Metric
        from oig.data.base import EditDataset

        class Ed(Editor):
            def edit(self, req, src, timer):
                raise NotImplementedError

        class Me(Metric):
            pass

        class Ds(EditDataset):
            pass
    """)
    fake_plugins.install("oig.editors", "fake_editor", "fakeplug_a:Ed")
    fake_plugins.install("oig.metrics", "fake_metric", "fakeplug_a:Me")
    fake_plugins.install("oig.datasets", "fake_data", "fakeplug_a:Ds")
    ed = reg.get_editor("fake_editor")
    assert ed.__module__ == "fakeplug_a" and ed.name == "fake_editor"  # the name in result rows
    assert reg.get_metric("fake_metric").name == "fake_metric"
    assert reg.get_dataset("fake_data").__name__ == "Ds"
    assert "fake_editor" in reg.list_editors() and "oig" in reg.list_editors()
    assert "fake_metric" in reg.list_metrics() and "clip" in reg.list_metrics()
    assert {"fake_data", "toyworld", "folder", "pie_bench", "laion", "synthetic"} <= set(reg.list_datasets())
    assert reg.plugin_of("fake_editor") == "an unknown distribution" and reg.plugin_of("oig") is None


def test_builtin_datasets_by_name():
    from oig.data.folder import FolderDataset
    from oig.data.toyworld import ToyWorld

    assert reg.get_dataset("toyworld") is ToyWorld and reg.get_dataset("folder") is FolderDataset
    with pytest.raises(KeyError, match="unknown dataset 'nope'.*entry-point group 'oig.datasets'"):
        reg.get_dataset("nope")


def test_a_broken_plugin_does_not_hide_the_others(fake_plugins, caplog):
    fake_plugins.module("fakeplug_broken", "import a_module_that_does_not_exist\n")
    fake_plugins.install("oig.editors", "broken", "fakeplug_broken:Editor")
    with caplog.at_level(logging.WARNING, logger="oig.registry"):
        names = reg.list_editors()
    assert "oig" in names and "broken" not in names
    assert "entry point broken = 'fakeplug_broken:Editor' (group oig.editors)" in caplog.text
    with pytest.raises(ImportError, match=r"editor 'broken': .*failed to import: ModuleNotFoundError: "
                                          r"No module named 'a_module_that_does_not_exist'"):
        reg.get_editor("broken")


def test_a_plugin_cannot_replace_a_builtin_name(fake_plugins, caplog):
    fake_plugins.module("fakeplug_clash", """
        from oig.editor import Editor

        class Oig(Editor):
            def edit(self, req, src, timer):
                raise NotImplementedError
    """)
    fake_plugins.install("oig.editors", "oig", "fakeplug_clash:Oig")
    with caplog.at_level(logging.WARNING, logger="oig.registry"):
        names = reg.list_editors()
    from oig.oig_editor import OIG

    assert "oig" in names and reg.get_editor("oig") is OIG
    assert "is already registered to oig.oig_editor.OIG " in caplog.text and "rename the entry point" in caplog.text


def test_a_module_entry_point_must_register_its_name(fake_plugins):
    fake_plugins.module("fakeplug_mod", """
        from oig.editor import Editor
        from oig.registry import register_editor

        @register_editor("fake_decorated")
        class Dec(Editor):
            def edit(self, req, src, timer):
                raise NotImplementedError
    """)
    fake_plugins.install("oig.editors", "fake_decorated", "fakeplug_mod")
    fake_plugins.install("oig.editors", "fake_missing", "fakeplug_mod")
    assert reg.get_editor("fake_decorated").__name__ == "Dec"
    with pytest.raises(ImportError, match="module fakeplug_mod, which does not"):
        reg.get_editor("fake_missing")


def test_plugin_config_packages_join_oigs_search_path(fake_plugins):
    pkg = fake_plugins.path / "fakeplug_conf"
    (pkg / "method").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "method" / "fake_swap.yaml").write_text("_target_: baselines.ddim.DDIMWordSwap\nsteps: 7\n")
    (pkg / "method" / "oig.yaml").write_text("_target_: baselines.ddim.DDIMWordSwap\nsteps: 1\n")  # shadows nothing
    fake_plugins.install("oig.configs", "fakeplug", "fakeplug_conf")
    fake_plugins.install("oig.configs", "gone", "fakeplug_not_installed.conf")
    assert reg.plugin_config_packages() == [("fakeplug", "fakeplug_conf")]
    reg.use_plugin_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["method=fake_swap"])
        assert cfg.method.steps == 7
        assert compose(config_name="config", overrides=["method=oig"]).method._target_ == "oig.oig_editor.OIG"
