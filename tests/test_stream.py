"""Layer streaming: the model run one decoder layer at a time gives the in-memory states."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    FAMILIES,
    HARMFUL_TEXT,
    HARMLESS_TEXT,
    PROMPT_WORDS,
    build_model,
    save_sharded,
    tiny_tokenizer,
)

from ablation import activations, stream

transformers = pytest.importorskip("transformers")

# float32 models: streamed and in-memory runs do the same operations on the same batches, so
# they agree to float32 rounding (differences of a few ulps from kernel choices)
RTOL = 1e-5


def _chat_model(tmp_path, family: str, **overrides):
    root = tmp_path / family
    save_sharded(build_model(family, **overrides), root)
    tok = tiny_tokenizer(PROMPT_WORDS)
    tok.save_pretrained(root)
    return root, tok


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    scale = b.abs().max().item()
    err = (a - b).abs().max().item()
    assert err <= RTOL * max(scale, 1.0), (err, scale)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("position", ["last-prompt", "first-generated"])
def test_streamed_states_equal_in_memory(family, position, tmp_path):
    root, tok = _chat_model(tmp_path, family)
    ids_h, _ = activations.encode(tok, HARMFUL_TEXT)
    ids_l, _ = activations.encode(tok, HARMLESS_TEXT)
    model, _ = activations.load_model(str(root), "float32", "cpu")
    experts, top_k = activations.moe_shape(model.config)
    kw = dict(position=position, num_experts=experts, top_k=top_k)
    want = [activations.collect(model, s, tok.pad_token_id, 3, **kw) for s in (ids_h, ids_l)]
    streamer = stream.Streamer(root, "float32", "cpu")
    try:
        got = stream.collect(streamer, [ids_h, ids_l], tok.pad_token_id, 3, **kw)
    finally:
        streamer.close()
    for g, w in zip(got, want, strict=True):
        assert g.states.shape == w.states.shape
        _close(g.states, w.states)
        _close(g.sums, w.sums)
        assert g.count == w.count and g.tokens == w.tokens
        assert sorted(g.expert_counts) == sorted(w.expert_counts)
        for layer, c in w.expert_counts.items():
            assert torch.equal(g.expert_counts[layer], c), layer
    # the streamer never held more than one decoder layer's weights
    assert streamer.stats.bytes_read > 0
    assert all(p.device.type == "meta" for layer in streamer.layers for p in layer.parameters())


def _states(root, tok, position="last-prompt", streamed=True):
    ids = [activations.encode(tok, t)[0] for t in (HARMFUL_TEXT, HARMLESS_TEXT)]
    if not streamed:
        model, _ = activations.load_model(str(root), "float32", "cpu")
        return [activations.collect(model, s, tok.pad_token_id, 3, position) for s in ids]
    streamer = stream.Streamer(root, "float32", "cpu")
    try:
        return stream.collect(streamer, ids, tok.pad_token_id, 3, position)
    finally:
        streamer.close()


@pytest.mark.parametrize("fmt", ["fp8", "mxfp4"])
def test_quantized_checkpoint_streams_its_values(fmt, tmp_path):
    """A quantized checkpoint (DeepSeek-V3 FP8 blocks; gpt-oss MXFP4 experts, stored
    transposed, the down projection square) runs streamed as the float model its codes and
    scales stand for runs in memory."""
    from test_packed import GPT_OSS, make_dense_mxfp4, make_mxfp4
    from test_quant import make_dequantized, make_fp8

    if fmt == "fp8":
        src, tok = _chat_model(tmp_path, "deepseek_v3")
        model = make_fp8(src, tmp_path / "q", (16, 16))
        dense = make_dequantized(model, tmp_path / "dense", (16, 16))
    else:
        src, tok = _chat_model(tmp_path, "gpt_oss", **GPT_OSS)
        model = make_mxfp4(src, tmp_path / "q")
        dense = make_dense_mxfp4(model, tmp_path / "dense")
    got = _states(model, tok)
    want = _states(dense, tok, streamed=False)
    for g, w in zip(got, want, strict=True):
        _close(g.states, w.states)
    # and it is not the float model before quantization (the codes were really decoded)
    before = _states(src, tok, streamed=False)
    assert (got[0].states - before[0].states).abs().max() > 1e-4


def _measure(tmp_path, root, name, *extra):
    from conftest import run_cli

    (tmp_path / "h.txt").write_text("\n".join(HARMFUL_TEXT) + "\n")
    (tmp_path / "l.txt").write_text("\n".join(HARMLESS_TEXT) + "\n")
    out = tmp_path / f"{name}.refuse"
    res = run_cli(
        "measure", "--model", str(root), "-o", str(out), "--harmful", str(tmp_path / "h.txt"),
        "--harmless", str(tmp_path / "l.txt"), "--dtype", "float32", "--device", "cpu",
        "--batch-size", "3", *extra,
    )  # fmt: skip
    assert res.exit_code == 0, res.output + res.stderr
    return out, res


def test_measure_cli_streamed_file_equals_in_memory(tmp_path):
    from ablation import refuse

    root, _ = _chat_model(tmp_path, "qwen3_moe")
    a, res = _measure(tmp_path, root, "streamed", "--stream-layers")
    assert "streamed   1 pass(es) over 3 layer loads" in res.output
    b, _ = _measure(tmp_path, root, "memory", "--no-stream-layers")
    sa, sb = refuse.load(a), refuse.load(b)
    assert sorted(sa.layers) == sorted(sb.layers) == [0, 1, 2]
    for layer, m in sb.layers.items():
        n = sa.layers[layer]
        assert sorted(n.extra) == sorted(m.extra)
        for x, y in [(n.harmful, m.harmful), (n.harmless, m.harmless), (n.refuse, m.refuse)]:
            _close(x, y)
        # a unit direction from a difference of means: float32 noise relative to that difference
        assert (n.refusenorm - m.refusenorm).abs().max() < 1e-4
        for key in m.extra:
            if key.startswith("experts_"):
                assert torch.equal(n.extra[key], m.extra[key])
    ma, mb = dict(sa.metadata), dict(sb.metadata)
    assert ma.pop("mode") == "streamed" and mb.pop("mode") == "in-memory"
    ma.pop("created"), mb.pop("created")
    assert ma == mb


def test_measure_streams_when_the_model_does_not_fit(tmp_path, monkeypatch, caplog):
    from ablation import refuse

    root, _ = _chat_model(tmp_path, "llama")
    monkeypatch.setattr(stream, "fits", lambda *_: False)
    out, res = _measure(tmp_path, root, "auto")
    assert refuse.load(out).metadata["mode"] == "streamed"
    assert "does not fit in memory: measuring it one decoder layer at a time" in res.stderr


def _first_token_in_memory(base, ablated, tok, sets):
    from ablation import evaluate

    logits = []
    for root in (base, ablated):
        model, _ = activations.load_model(str(root), "float32", "cpu")
        logits += [activations.next_token_logits(model, s, tok.pad_token_id, 3) for s in sets]
    return evaluate.first_token(*logits)


def check_streamed_evaluate(base, ablated, tok, harmful, harmless, tmp_path, tol):
    """`evaluate --stream-layers` gives the first-token scores of the in-memory models."""
    from ablation import evaluate

    sets = [activations.encode(tok, t)[0] for t in (harmful, harmless)]
    want = _first_token_in_memory(base, ablated, tok, sets)
    opts = evaluate.EvalOptions(
        base=str(base),
        ablated=str(ablated),
        harmful=_lines(tmp_path / "h.txt", harmful),
        harmless=_lines(tmp_path / "l.txt", harmless),
        batch_size=3,
        device="cpu",
        dtype="float32",
        output=tmp_path / "eval.json",
        stream_layers=True,
    )
    got = evaluate.run(opts)["first_token"]
    assert got["refusal_score"]["openers"] == want["refusal_score"]["openers"]
    for a, b in [
        (got["kl"]["mean"], want["kl"]["mean"]),
        (got["kl"]["max"], want["kl"]["max"]),
        (got["refusal_score"]["base"], want["refusal_score"]["base"]),
        (got["refusal_score"]["ablated"], want["refusal_score"]["ablated"]),
    ]:
        assert abs(a - b) <= tol * max(abs(b), 1e-3), (a, b)
    return got


def _lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_streamed_evaluate_equals_in_memory(tmp_path):
    base, tok = _chat_model(tmp_path, "qwen3_moe")
    other = tmp_path / "other"
    save_sharded(build_model("qwen3_moe", seed=1), other)
    tok.save_pretrained(other)
    got = check_streamed_evaluate(base, other, tok, HARMFUL_TEXT, HARMLESS_TEXT, tmp_path, 1e-4)
    assert got["kl"]["mean"] > 0.01  # two different models: the KL sees it
    from conftest import run_cli

    res = run_cli(
        "evaluate", "--base", str(base), "--ablated", str(other), "--stream-layers",
        "--harmful", str(tmp_path / "h.txt"), "--harmless", str(tmp_path / "l.txt"),
        "--dtype", "float32", "--device", "cpu", "-o", str(tmp_path / "cli.json"),
    )  # fmt: skip
    assert res.exit_code == 0, res.output + res.stderr
    assert "refusal openers, 1st token" in res.output and "streamed:" in res.output


def test_refusal_openers_are_the_harmful_only_first_tokens():
    from ablation import analysis

    vocab = 10
    harmful = torch.full((4, vocab), -20.0)
    harmless = torch.full((4, vocab), -20.0)
    harmful[:, 3] = 5.0  # "I" (refusal opener), only after harmful prompts
    harmful[:2, 7] = 5.0  # "Sure": both sets
    harmless[:, 7] = 5.0
    openers = analysis.refusal_openers(harmful, harmless)
    assert openers.nonzero().flatten().tolist() == [3]
    mass = analysis.opener_mass(harmful, openers)
    assert torch.allclose(mass, torch.tensor([0.5, 0.5, 1.0, 1.0], dtype=torch.float64), atol=1e-6)


def test_a_missing_tensor_is_one_line(tmp_path):
    """A checkpoint that lacks a tensor of the model is refused before anything runs (the
    in-memory path would initialize it at random)."""
    import json

    from conftest import assert_one_error, run_cli
    from safetensors.torch import load_file, save_file

    root, _ = _chat_model(tmp_path, "llama")
    index = json.loads((root / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.down_proj.weight"
    shard = root / index["weight_map"].pop(name)
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard, metadata={"format": "pt"})
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "p.txt").write_text("\n".join(HARMFUL_TEXT) + "\n")
    res = run_cli(
        "measure", "--model", str(root), "-o", str(tmp_path / "m.refuse"), "--stream-layers",
        "--harmful", str(tmp_path / "p.txt"), "--harmless", str(tmp_path / "p.txt"),
    )  # fmt: skip
    assert_one_error(res, f"the checkpoint has no tensor for {name}; cannot run it layer by layer")
    assert not (tmp_path / "m.refuse").exists()
