"""analyze: metrics against hand-computed values, degenerate layers, outputs, bad inputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import run_cli

from ablation import analysis, orders, refuse
from ablation.refuse import LayerMeasurement, Measurements


def synthetic() -> Measurements:
    """4 layers in 3-D, values chosen so every metric is easy to compute by hand."""
    layers = {}
    # layer 0: identical means -> no direction at all
    same = torch.tensor([1.0, 1.0, 0.0])
    layers[0] = LayerMeasurement(same, same.clone(), torch.zeros(3), torch.zeros(3))
    # layer 1: harmful (3, 4, 0), harmless (3, 0, 0): refuse (0, 4, 0) is orthogonal to harmless
    h, l_ = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([3.0, 0.0, 0.0])
    layers[1] = LayerMeasurement(
        h,
        l_,
        h - l_,
        torch.tensor([0.0, 1.0, 0.0]),
        {
            "harmful_proj": torch.tensor([2.0, 3.0, 4.0]),
            "harmless_proj": torch.tensor([0.0, 1.0, 2.5]),
        },
    )
    # layer 2: harmful (4, 0, 0), harmless (2, 0, 0): refuse lies along harmless -> purity 0,
    # and its biprojected direction is zero
    h, l_ = torch.tensor([4.0, 0.0, 0.0]), torch.tensor([2.0, 0.0, 0.0])
    layers[2] = LayerMeasurement(h, l_, h - l_, torch.zeros(3))
    # layer 3: refuse (0, 3, 4) against harmless (0, 0, 5), direction (0, 1, 0)
    h, l_ = torch.tensor([0.0, 3.0, 9.0]), torch.tensor([0.0, 0.0, 5.0])
    layers[3] = LayerMeasurement(h, l_, h - l_, torch.tensor([0.0, 1.0, 0.0]))
    return Measurements(layers, {"model": "synthetic"})


def test_metrics_by_hand():
    m = {x.layer: x for x in analysis.layer_metrics(synthetic())}
    # layer 1
    assert m[1].cosine == pytest.approx(3 / 5)
    assert (m[1].harmful_norm, m[1].harmless_norm, m[1].refuse_norm) == (5.0, 3.0, 4.0)
    assert m[1].snr == pytest.approx(4 / 5)
    assert m[1].purity == pytest.approx(1.0)
    assert m[1].quality == pytest.approx(0.8 * 0.4 * 1.0)
    # AUROC: pairs (h > l) among 3x3: 2>0,2>1, 3>0,3>1,3>2.5, 4>all -> 8/9
    assert m[1].auroc == pytest.approx(8 / 9)
    pooled = math.sqrt((1.0 + 19 / 12) / 2)  # var([2,3,4]) = 1, var([0,1,2.5]) = 19/12
    assert m[1].cohens_d == pytest.approx((3 - 3.5 / 3) / pooled)
    assert m[1].score == pytest.approx(0.32 * (2 * 8 / 9 - 1))
    # layer 3: snr 5/sqrt(90), cos 9/sqrt(90), purity 3/5
    assert m[3].snr == pytest.approx(5 / math.sqrt(90))
    assert m[3].cosine == pytest.approx(9 / math.sqrt(90))
    assert m[3].purity == pytest.approx(3 / 5)
    assert m[3].auroc is None and m[3].score == pytest.approx(m[3].quality)
    assert m[3].rotation_prev is None  # the previous layer has no direction
    assert m[3].rotation_first == pytest.approx(0.0)


def test_degenerate_layers_do_not_poison_the_ranking():
    metrics = analysis.layer_metrics(synthetic())
    m0, m2 = metrics[0], metrics[2]
    assert m0.cosine == pytest.approx(1.0) and m0.snr == 0 and m0.purity == 0 and m0.score == 0
    assert m2.purity == pytest.approx(0.0) and m2.score == 0
    for x in metrics:
        for v in (x.cosine, x.snr, x.purity, x.quality, x.score):
            assert math.isfinite(v)
    assert [x.layer for x in analysis.ranking(metrics)][:2] == [1, 3]


def test_auroc_ties_and_gini():
    assert analysis.auroc(torch.tensor([1.0, 1.0]), torch.tensor([1.0])) == 0.5
    assert analysis.auroc(torch.tensor([2.0]), torch.tensor([1.0])) == 1.0
    assert analysis.gini(torch.ones(10)) == pytest.approx(0.0)
    one_hot = torch.zeros(10)
    one_hot[3] = 5
    assert analysis.gini(one_hot) == pytest.approx(0.9)


def test_energy_ratio_of_an_aligned_writer():
    d = torch.tensor([1.0, 0.0, 0.0, 0.0])
    w = torch.zeros(4, 6)
    w[0] = 1.0  # every column writes only along d
    assert analysis.energy_along(w, d, 0) == pytest.approx(1.0)
    sig = analysis.writer_signal("w", "mlp_out", 0, w, d, 0, analysis.random_directions(8, 4))
    assert sig.energy_ratio == pytest.approx(4.0) and sig.z > 0


def test_suggestion_avoids_edges():
    metrics = analysis.layer_metrics(synthetic())
    s = analysis.suggest_orders(metrics)
    assert s.measurement in (1, 2) and s.layers[0] <= s.measurement <= s.layers[1]


def test_cli_outputs(tmp_path):
    path = tmp_path / "s.refuse"
    refuse.save(path, synthetic())
    res = run_cli(
        "analyze",
        path,
        "--json",
        tmp_path / "m.json",
        "--csv",
        tmp_path / "m.csv",
        "--emit-orders",
        tmp_path / "o.yaml",
        "--model",
        "org/Model",
    )
    assert res.exit_code == 0, res.output + res.stderr
    assert "    1 " in res.output and " *" in res.output
    data = json.loads((tmp_path / "m.json").read_text())
    assert data["ranking"][0] == 1 and len(data["layers"]) == 4
    assert (tmp_path / "m.csv").read_text().count("\n") == 5
    o = orders.load(tmp_path / "o.yaml")
    assert o.model == "org/Model" and str(o.output) == "Model-abliterated"
    assert (tmp_path / "o.yaml").read_text().startswith("# Starting marching orders")


def test_expert_table(tmp_path):
    meas = synthetic()
    meas.layers[1].extra["experts_harmful"] = torch.tensor([10.0, 0.0, 5.0, 5.0])
    meas.layers[1].extra["experts_harmless"] = torch.tensor([1.0, 9.0, 5.0, 5.0])
    path = tmp_path / "s.refuse"
    refuse.save(path, meas)
    res = run_cli("analyze", path, "--top-experts", "2")
    assert res.exit_code == 0
    row = next(line for line in res.output.splitlines() if line.startswith("    1  0:"))
    assert "(10/1)" in row


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes(b"\x00\x01garbage"), "neither a .refuse"),
        (lambda p: None, "measurements file not found"),
        (
            lambda p: refuse.save(
                p, Measurements({k: v for k, v in synthetic().layers.items() if k != 2}, {})
            ),
            "layers [2] are missing",
        ),
        (
            lambda p: refuse.save(
                p,
                Measurements(
                    {
                        **synthetic().layers,
                        1: LayerMeasurement(
                            torch.full((3,), float("nan")),
                            torch.ones(3),
                            torch.ones(3),
                            torch.ones(3),
                        ),
                    },
                    {},
                ),
            ),
            "harmful_1 holds NaN",
        ),
    ],
)
def test_bad_input(tmp_path, make, message):
    path = tmp_path / "bad.refuse"
    make(path)
    res = run_cli("analyze", path)
    assert res.exit_code == 2 and message in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
