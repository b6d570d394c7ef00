"""The protocol cards of ``experiments/README.md`` against the composed configs.

Every row of a card (``<!-- card: PRESET -->`` ... ``<!-- /card -->``) names a method, a config key
and the value the preset must give it, with the source of that value. The test composes
``experiment=PRESET method=METHOD`` exactly as ``oig-run`` does and asserts every row, so a config
change that breaks a protocol fails CI; and it asserts that every method the preset sweeps has a
card with the settings every protocol fixes.
"""

import re
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "experiments" / "README.md"
PRESETS = ("table1", "pie_bench")
#: settings every method of every preset states (plus the method-specific ones in its card)
REQUIRED = ("model.pretrained", "model.steps_offset", "dtype", "method.steps", "method.guidance",
            "method.resize_mode", "group:metrics")


def read_cards() -> dict[str, list[dict]]:
    text = README.read_text(encoding="utf-8")
    cards = {}
    for m in re.finditer(r"<!-- card: (\w+) -->(.*?)<!-- /card -->", text, re.S):
        rows = []
        for line in m.group(2).splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) != 4 or cells[0] in ("method", "") or set(cells[0]) <= {"-"}:
                continue
            method, key, value, source = cells
            rows.append({"method": method, "key": key.strip("`"), "value": value.strip("`"), "source": source})
        cards[m.group(1)] = rows
    return cards


CARDS = read_cards()


def compose_run(preset: str, method: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"experiment={preset}", f"method={method}"], return_hydra_config=True)


def swept_methods(preset: str) -> list[str]:
    exp = OmegaConf.load(ROOT / "conf" / "experiment" / f"{preset}.yaml")
    return str(exp.hydra.sweeper.params.method).split(",")


def lookup(cfg, key: str):
    if key.startswith("group:"):
        return cfg.hydra.runtime.choices[key[len("group:"):]]
    sentinel = object()
    v = OmegaConf.select(cfg, key, default=sentinel)
    if v is sentinel:
        raise KeyError(key)
    return OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v


def test_every_preset_has_a_card_covering_its_methods():
    assert set(PRESETS) <= set(CARDS), f"cards found: {sorted(CARDS)}"
    for preset in PRESETS:
        rows = CARDS[preset]
        methods = {r["method"] for r in rows} - {"*"}
        assert set(swept_methods(preset)) <= methods, f"{preset}: methods without a card: " \
            f"{sorted(set(swept_methods(preset)) - methods)}"
        for method in methods:
            keys = {r["key"] for r in rows if r["method"] == method}
            missing = [k for k in REQUIRED if k not in keys]
            assert not missing, f"{preset}/{method}: the card does not state {missing}"
        for r in rows:
            assert r["source"] and r["source"] not in ("-", "—"), f"{preset}/{r['method']} {r['key']}: no source"


@pytest.mark.parametrize("preset,method", sorted({(p, r["method"]) for p in PRESETS for r in CARDS.get(p, [])
                                                   if r["method"] != "*"}))
def test_composed_config_matches_the_card(preset, method):
    cfg = compose_run(preset, method)
    wrong = []
    for r in CARDS[preset]:
        if r["method"] not in (method, "*"):  # "*": a setting of the preset, the same for every method
            continue
        expected = yaml.safe_load(r["value"])
        try:
            got = lookup(cfg, r["key"])
        except KeyError:
            wrong.append(f"{r['key']}: not in the composed config (card says {expected!r})")
            continue
        if got != expected and not (isinstance(got, float) and isinstance(expected, (int, float))
                                    and abs(got - expected) < 1e-12):
            wrong.append(f"{r['key']}: config {got!r}, card {expected!r} ({r['source']})")
    assert not wrong, f"experiment={preset} method={method} differs from its protocol card:\n" + "\n".join(wrong)


def test_card_reader_sees_rows():
    # guards the parser itself: a card with no readable rows would make the tests above vacuous
    for preset in PRESETS:
        assert len(CARDS[preset]) >= 10 * len(swept_methods(preset)) // 2
