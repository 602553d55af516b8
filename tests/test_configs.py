"""The example orders shipped in configs/ are valid."""

from pathlib import Path

import pytest

from ablation import orders, space

ROOT = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(p for p in ROOT.glob("*.yaml") if not p.name.endswith("-space.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_orders_validate(path):
    o = orders.load(path)
    assert o.layers and o.norm_preserving and o.projected


def test_there_are_examples():
    assert {p.name for p in CONFIGS} >= {"dense-example.yaml", "moe-example.yaml"}


def test_the_example_search_space_is_the_default():
    loaded = space.load(ROOT / "tune-space.yaml")
    assert loaded == space.Space()
    assert space.bind(loaded, 18).space.measurement == [2, 15]
