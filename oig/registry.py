"""Name -> class registries for editors, metrics and datasets: built in, or added by plugins.

Hydra configs reach the same classes with ``_target_``; the registry lets code and the command
line find them by short name (``oig.registry.get_editor("oig")``, ``get_metric("clip")``,
``get_dataset("toyworld")``).

**Plugins.** A package installed next to ``oig`` adds names without touching this repository, by
Python entry points in its ``pyproject.toml``::

    [project.entry-points."oig.editors"]
    masked_swap = "my_plugin.editor:MaskedSwap"         # name = "module:Class"
    [project.entry-points."oig.metrics"]
    outside_change = "my_plugin.metric:OutsideChange"
    [project.entry-points."oig.datasets"]
    my_data = "my_plugin.data:MyDataset"
    [project.entry-points."oig.configs"]
    my_plugin = "my_plugin.conf"                        # a package holding method/, metrics/, dataset/ yamls

An entry point may also name a module whose import registers its classes with the decorators
below. Entry points are read the first time a name is not found among the built-ins, or when a
list is asked for. A built-in name always wins over a plugin's (with a warning); a plugin that
fails to import is reported by a warning, and asking for its name raises an ``ImportError``
naming the package and the original error.

``oig.configs`` packages are appended to Hydra's config search path of ``oig-run`` (after oig's
own ``pkg://oig.conf``, so they add configs and never replace oig's) by :func:`use_plugin_configs`;
``oig-run 'hydra.searchpath=[pkg://my_plugin.conf]'`` does the same by hand.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

log = logging.getLogger(__name__)

EDITORS: dict[str, type] = {}
METRICS: dict[str, type] = {}
DATASETS: dict[str, type] = {}

# modules that register built-in editors / metrics when imported
_BUILTIN_EDITOR_MODULES = (
    "baselines.ddim",
    "baselines.sdedit",
    "oig.oig_editor",
    "baselines.diffedit",
    "baselines.pix2pix_zero",
    "baselines.instruct_pix2pix",
    "baselines.pnp",
    "baselines.masactrl",
    "baselines.null_text_p2p",
)
_BUILTIN_METRIC_MODULES = ("eval.clip", "eval.structure", "eval.background", "eval.toy")
# built-in datasets by name (the names of conf/dataset/*.yaml), imported only when asked for
_BUILTIN_DATASETS = {
    "toyworld": "oig.data.toyworld:ToyWorld",
    "folder": "oig.data.folder:FolderDataset",
    "pie_bench": "oig.data.pie_bench:PIEBench",
    "laion": "oig.data.laion:LaionTasks",
    "synthetic": "oig.data.synthetic:SyntheticDataset",
}

#: entry-point groups read by this module
EDITOR_GROUP, METRIC_GROUP, DATASET_GROUP, CONFIG_GROUP = "oig.editors", "oig.metrics", "oig.datasets", "oig.configs"


@dataclass
class _Kind:
    what: str
    table: dict[str, type]
    group: str
    builtins_loaded: bool = False
    plugins_loaded: bool = False
    broken: dict[str, str] = field(default_factory=dict)  # plugin name -> why it could not be loaded
    plugin_of: dict[str, str] = field(default_factory=dict)  # name -> distribution that added it


_EDITOR = _Kind("editor", EDITORS, EDITOR_GROUP)
_METRIC = _Kind("metric", METRICS, METRIC_GROUP)
_DATASET = _Kind("dataset", DATASETS, DATASET_GROUP)


def _register(kind: _Kind, name: str, cls: type) -> type:
    if name in kind.table and kind.table[name] is not cls:
        raise ValueError(f"{kind.what} name {name!r} is already registered to {kind.table[name].__qualname__}")
    kind.table[name] = cls
    cls.name = name
    return cls


def register_editor(name: str):
    return lambda cls: _register(_EDITOR, name, cls)


def register_metric(name: str):
    return lambda cls: _register(_METRIC, name, cls)


def register_dataset(name: str):
    return lambda cls: _register(_DATASET, name, cls)


def _import_builtins(mods):
    for m in mods:
        try:
            importlib.import_module(m)
        except ModuleNotFoundError as e:  # a module of this list that does not exist yet
            if e.name != m:
                raise


def _load_builtins(kind: _Kind):
    if kind.builtins_loaded:
        return
    if kind is _EDITOR:
        _import_builtins(_BUILTIN_EDITOR_MODULES)
    elif kind is _METRIC:
        _import_builtins(_BUILTIN_METRIC_MODULES)
    else:
        for name, ref in _BUILTIN_DATASETS.items():
            mod, cls = ref.split(":")
            DATASETS.setdefault(name, getattr(importlib.import_module(mod), cls))
    kind.builtins_loaded = True


def _entry_points(group: str) -> list[EntryPoint]:
    """The installed distributions' entry points of ``group`` (one place, so tests can swap it)."""
    return list(entry_points(group=group))


def _dist(ep: EntryPoint) -> str:
    d = getattr(ep, "dist", None)
    return f"{d.metadata['Name']} {d.version}" if d is not None else "an unknown distribution"


def _load_plugins(kind: _Kind):
    if kind.plugins_loaded:
        return
    _load_builtins(kind)  # built-in names win over plugins'
    kind.plugins_loaded = True
    for ep in _entry_points(kind.group):
        where = f"entry point {ep.name} = {ep.value!r} (group {kind.group}) of {_dist(ep)}"
        try:
            obj = ep.load()
        except Exception as e:
            kind.broken[ep.name] = f"{where} failed to import: {type(e).__name__}: {e}"
            log.warning("%s", kind.broken[ep.name])
            continue
        if inspect.isclass(obj):
            had = kind.table.get(ep.name)
            if had is not None and had is not obj:
                log.warning("%s: %s %r is already registered to %s.%s (built in or registered earlier); the plugin's "
                            "is ignored (rename the entry point)", where, kind.what, ep.name, had.__module__,
                            had.__qualname__)
                continue
            _register(kind, ep.name, obj)
        elif not inspect.ismodule(obj) or ep.name not in kind.table:
            got = f"module {obj.__name__}, which does not" if inspect.ismodule(obj) else type(obj).__name__
            kind.broken[ep.name] = (f"{where}: expected a class, or a module that registers {ep.name!r} with "
                                    f"oig.registry.register_{kind.what}; got {got}")
            log.warning("%s", kind.broken[ep.name])
            continue
        kind.plugin_of[ep.name] = _dist(ep)


def _get(kind: _Kind, name: str) -> type:
    if name not in kind.table:
        _load_builtins(kind)
    if name not in kind.table:
        _load_plugins(kind)
    if name in kind.broken and name not in kind.table:
        raise ImportError(f"{kind.what} {name!r}: {kind.broken[name]}")
    if name not in kind.table:
        raise KeyError(f"unknown {kind.what} {name!r}; registered: {sorted(kind.table)} (a plugin package adds "
                       f"names through the entry-point group {kind.group!r})")
    return kind.table[name]


def _list(kind: _Kind) -> list[str]:
    _load_plugins(kind)
    return sorted(kind.table)


def get_editor(name: str) -> type:
    return _get(_EDITOR, name)


def get_metric(name: str) -> type:
    return _get(_METRIC, name)


def get_dataset(name: str) -> type:
    return _get(_DATASET, name)


def list_editors() -> list[str]:
    """Every editor name: the built-ins and those of installed plugins."""
    return _list(_EDITOR)


def list_metrics() -> list[str]:
    return _list(_METRIC)


def list_datasets() -> list[str]:
    return _list(_DATASET)


def plugin_of(name: str) -> str | None:
    """The distribution (``"name version"``) whose entry point added editor/metric/dataset ``name``, or None."""
    for kind in (_EDITOR, _METRIC, _DATASET):
        if name in kind.plugin_of:
            return kind.plugin_of[name]
    return None


# ---------------------------------------------------------------------------------- Hydra configs

_OIG_CONF = Path(__file__).resolve().parent / "conf"


def plugin_config_packages() -> list[tuple[str, str]]:
    """``(entry point name, package)`` of every installed ``oig.configs`` entry point whose package
    can be found; the others are reported by a warning."""
    out = []
    for ep in _entry_points(CONFIG_GROUP):
        pkg = ep.value.strip()
        if ":" in pkg:
            log.warning("entry point %s = %r (group %s) of %s must name a package (my_plugin.conf), not an "
                        "object; ignored", ep.name, ep.value, CONFIG_GROUP, _dist(ep))
            continue
        try:
            found = importlib.util.find_spec(pkg) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            log.warning("entry point %s = %r (group %s) of %s: package %r not found; its configs are not added",
                        ep.name, ep.value, CONFIG_GROUP, _dist(ep), pkg)
            continue
        out.append((ep.name, pkg))
    return out


def _is_oig_conf(path: str) -> bool:
    """Whether a Hydra search-path entry is oig's own configs (``pkg://oig.conf``, or the folder)."""
    if path == "pkg://oig.conf":
        return True
    if "://" in path and not path.startswith("file://"):
        return False
    try:
        return Path(path.removeprefix("file://")).resolve() == _OIG_CONF
    except OSError:
        return False


_SEARCHPATH_PLUGIN = None


def use_plugin_configs() -> None:
    """Append every ``oig.configs`` package to the config search path of Hydra apps that compose
    oig's configs (``oig-run``, and ``hydra.compose`` on :data:`oig.run.CONF_DIR`). Registers a
    Hydra ``SearchPathPlugin`` once per process; ``oig.run.main`` calls it."""
    global _SEARCHPATH_PLUGIN
    if _SEARCHPATH_PLUGIN is not None:
        return
    from hydra.core.plugins import Plugins
    from hydra.plugins.search_path_plugin import SearchPathPlugin

    class OigPluginConfigs(SearchPathPlugin):
        """Adds installed plugins' config packages after oig's own configs."""

        def manipulate_search_path(self, search_path) -> None:
            paths = [e.path for e in search_path.get_path()]
            if not any(_is_oig_conf(p) for p in paths):
                return  # another Hydra app in the same environment: leave it alone
            for name, pkg in plugin_config_packages():
                if f"pkg://{pkg}" not in paths:
                    search_path.append(provider=f"oig-plugin:{name}", path=f"pkg://{pkg}")

    Plugins.instance().register(OigPluginConfigs)
    _SEARCHPATH_PLUGIN = OigPluginConfigs


def _reset_plugins() -> None:
    """Forget every plugin-added name and the state of entry-point loading (tests)."""
    for kind in (_EDITOR, _METRIC, _DATASET):
        for name in kind.plugin_of:
            kind.table.pop(name, None)
        kind.plugin_of.clear()
        kind.broken.clear()
        kind.plugins_loaded = False
