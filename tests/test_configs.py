"""The example orders shipped in configs/ are valid."""

from pathlib import Path

import pytest

from ablation import orders

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_orders_validate(path):
    o = orders.load(path)
    assert o.layers and o.norm_preserving and o.projected


def test_there_are_examples():
    assert {p.name for p in CONFIGS} >= {"dense-example.yaml", "moe-example.yaml"}
