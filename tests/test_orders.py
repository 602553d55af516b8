from __future__ import annotations

import pytest

from ablation import orders
from ablation.errors import AblationError

BASE = "model: org/M\nmeasurements: m.refuse\noutput: out\n"


def load(tmp_path, text: str, **overrides):
    path = tmp_path / "o.yaml"
    path.write_text(text)
    return orders.load(path, overrides)


def test_ranges_overrides_and_global_scale(tmp_path):
    o = load(
        tmp_path,
        BASE + "scale: 0.5\nablate:\n  - layers: 2-4\n    measurement: 3\n"
        "    scale: 2\n  - layer: 7\n  - layers: [9, '11-12']\n    sparsity: 0.25\n",
    )
    assert [x.layer for x in o.layers] == [2, 3, 4, 7, 9, 11, 12]
    assert [x.measurement for x in o.layers] == [3, 3, 3, 7, 9, 11, 12]
    assert [x.scale for x in o.layers] == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5]
    assert o.layers[-1].sparsity == 0.25
    assert o.method == "norm-preserving" and o.projected is True
    assert o.components == ("attn_out", "mlp_out", "experts", "shared_experts", "router")


def test_older_form_loads_as_is(tmp_path):
    o = load(
        tmp_path,
        BASE + "ablate:\n  - layer: 18\n    measurement: 23\n    scale: 1.2\n"
        "    sparsity: 0.0\n  - layer: 19\n    measurement: 23\n    scale: 1.0\n"
        "    sparsity: 0.0\n",
    )
    assert [(x.layer, x.measurement, x.scale) for x in o.layers] == [(18, 23, 1.2), (19, 23, 1.0)]


def test_cli_overrides_replace_file_values(tmp_path):
    o = load(
        tmp_path,
        BASE + "method: standard\nablate:\n  - layer: 1\n",
        output="elsewhere",
        method="norm-preserving",
    )
    assert str(o.output) == "elsewhere" and o.norm_preserving


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (BASE + "ablate:\n  - layer: 1\n    scael: 2\n", r"o.yaml:6: ablate.0.scael: unknown key"),
        (BASE + "methd: standard\nablate:\n  - layer: 1\n", r"o.yaml:4: methd: unknown key"),
        (
            BASE + "ablate:\n  - layer: 1\n  - layers: 0-3\n",
            r"o.yaml:6: layer 1 is ordered twice for attn_out \(also at line 5\)",
        ),
        (BASE + "ablate:\n  - layer: 1\n    sparsity: 1.5\n", r"o.yaml:6: ablate.0.sparsity"),
        (BASE + "scale: .nan\nablate:\n  - layer: 1\n", r"o.yaml:4: scale"),
        (
            BASE + "ablate:\n  - layer: 1\n    layers: 2-3\n",
            r"exactly one of 'layer', 'layers' or 'kernel'",
        ),
        (BASE + "ablate:\n  - layers: 5-2\n", r"bad layer range '5-2'"),
        (BASE + "method: fancy\nablate:\n  - layer: 1\n", r"o.yaml:4: method"),
        (BASE + "components: [attn_out, mlp]\nablate:\n  - layer: 1\n", r"o.yaml:4: components.1"),
        ("measurements: m.refuse\noutput: out\nablate:\n  - layer: 1\n", r"o.yaml:1: model"),
        (BASE + "ablate: []\n", r"ablate"),
        (BASE + "ablate:\n  - layer: 1\n   bad-indent: 2\n", r"o.yaml:\d+: not valid YAML"),
        ("- just\n- a list\n", "must be a YAML mapping"),
    ],
)
def test_bad_orders_name_key_and_line(tmp_path, text, message):
    with pytest.raises(AblationError, match=message):
        load(tmp_path, text)
