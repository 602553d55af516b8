"""measure: batching changes nothing, directions are unit and biprojected, the file is complete."""

from __future__ import annotations

import pytest
import torch
from conftest import HARMFUL_TEXT, HARMLESS_TEXT, run_cli, tiny_tokenizer

from ablation import activations, measure, prompts, refuse

transformers = pytest.importorskip("transformers")


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def run_measure(tmp_path, model_dir, **kw):
    opts = measure.MeasureOptions(
        model=str(model_dir),
        output=tmp_path / "m.refuse",
        harmful=write_lines(tmp_path / "harmful.txt", HARMFUL_TEXT),
        harmless=write_lines(tmp_path / "harmless.txt", HARMLESS_TEXT),
        **kw,
    )
    return measure.run(opts)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen3_moe"])
@pytest.mark.parametrize("position", ["last-prompt", "first-generated"])
def test_batched_equals_one_at_a_time(family, position, chat_checkpoint, tmp_path):
    model_dir = chat_checkpoint(family)
    model, tok = activations.load_model(str(model_dir), "float32")
    ids, templated = activations.encode(tok, HARMFUL_TEXT + HARMLESS_TEXT)
    assert templated
    batched = activations.collect(model, ids, tok.pad_token_id, batch_size=5, position=position)
    single = [activations.collect(model, [s], tok.pad_token_id, 1, position) for s in ids]
    ref_sum = sum(c.sums for c in single)
    assert torch.allclose(batched.sums, ref_sum, rtol=1e-4, atol=1e-4 * ref_sum.abs().max())
    ref_states = torch.cat([c.states for c in single])
    assert torch.allclose(batched.states, ref_states, rtol=1e-4, atol=1e-4 * ref_states.abs().max())
    assert batched.states.shape == (len(ids), model.config.num_hidden_layers, 32)


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_refuse_file_directions(family, chat_checkpoint, tmp_path):
    _meas, summary = run_measure(tmp_path, chat_checkpoint(family))
    back = refuse.load(tmp_path / "m.refuse")
    assert sorted(back.layers) == list(range(3))
    for m in back.layers.values():
        assert torch.allclose(m.refuse, m.harmful - m.harmless, atol=1e-5)
        n = m.refusenorm.double().norm().item()
        assert n == 0 or abs(n - 1) < 1e-6
        h = torch.nn.functional.normalize(m.harmless.double(), dim=0)
        assert abs(m.refusenorm.double() @ h) < 1e-6
        assert m.extra["harmful_proj"].shape == (len(HARMFUL_TEXT),)
        assert m.extra["harmless_proj"].shape == (len(HARMLESS_TEXT),)
    md = back.metadata
    assert md["n_harmful"] == str(len(HARMFUL_TEXT)) and md["projected"] == "true"
    assert md["num_layers"] == "3" and md["hidden_size"] == "32"
    assert md["position"] == "last-prompt" and md["chat_template"] == "true"
    assert set(summary.auroc) == {0, 1, 2}
    if family == "qwen3_moe":  # MoE layers 1 and 2 record expert selections
        for layer in (1, 2):
            counts = back.layers[layer].extra["experts_harmful"]
            assert counts.shape == (4,) and counts.sum() > 0
            assert counts.sum() % 2 == 0  # top-2 routing: two experts per token
        assert "experts_harmful" not in back.layers[0].extra


def test_no_projections_and_raw_direction(chat_checkpoint, tmp_path):
    run_measure(tmp_path, chat_checkpoint("llama"), keep_projections=False, projected=False)
    back = refuse.load(tmp_path / "m.refuse")
    m = back.layers[2]
    assert "harmful_proj" not in m.extra
    assert torch.allclose(m.refusenorm, m.refuse / m.refuse.norm(), atol=1e-6)


def test_single_bos_with_a_template_that_writes_one():
    tok = tiny_tokenizer(["hello"])
    assert tok("hello").input_ids[0] == tok.bos_token_id  # the tokenizer adds one ...
    assert tok.apply_chat_template(
        [{"role": "user", "content": "hello"}], tokenize=False
    ).startswith("<bos>")  # ... and so does the template
    ids, _ = activations.encode(tok, ["hello"])
    assert ids[0].count(tok.bos_token_id) == 1 and ids[0][0] == tok.bos_token_id
    plain = tiny_tokenizer(["hello"], chat_template=False)
    ids, templated = activations.encode(plain, ["hello"])
    assert not templated and ids[0] == [plain.bos_token_id, plain.convert_tokens_to_ids("hello")]


def test_response_prefix_and_system():
    tok = tiny_tokenizer(["hello", "think"])
    ids, _ = activations.encode(tok, ["hello"], system="think", response_prefix=" think")
    text = tok.decode(ids[0])
    assert text.count("<bos>") == 1 and "system think" in text and text.endswith("think")


def test_builtin_sets():
    for kind in prompts.KINDS:
        measure_part, eval_part = prompts.builtin(kind, "measure"), prompts.builtin(kind, "eval")
        assert len(measure_part) + len(eval_part) >= 300
        assert not set(measure_part) & set(eval_part)
        assert len(set(measure_part)) == len(measure_part)


def test_prompt_files(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo\n")
    (tmp_path / "a.json").write_text('["one", {"text": "two"}]')
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    (tmp_path / "a.csv").write_text("id,text\n1,one\n2,two\n")
    for suffix in ("txt", "json", "jsonl", "csv"):
        got, source = prompts.load(str(tmp_path / f"a.{suffix}"), "harmful")
        assert got == ["one", "two"] and source.endswith(f"a.{suffix}")
    many = [f"p{i}" for i in range(100)]
    a, b = prompts.sample(many, 10, seed=3), prompts.sample(many, 10, seed=3)
    assert a == b and len(a) == 10 and a == sorted(a, key=many.index)
    assert prompts.sample(many, 10, seed=4) != a


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        (
            lambda d: (d / "empty.txt").write_text("\n\n"),
            ["--harmful", "{d}/empty.txt"],
            "empty.txt: no prompts",
        ),
        (
            lambda d: (d / "p.xlsx").write_text("x"),
            ["--harmful", "{d}/p.xlsx"],
            "unsupported prompt file type '.xlsx'",
        ),
        (lambda d: None, ["--harmful", "{d}/missing.txt"], "missing.txt: prompt file not found"),
        (lambda d: None, ["-o", "{d}/no/such/dir/m.refuse"], "does not exist"),
        (
            lambda d: (d / "p.jsonl").write_text('{"prompt": "x"}\n'),
            ["--harmful", "{d}/p.jsonl"],
            "an entry has no string 'text' field",
        ),
    ],
)
def test_bad_inputs(setup, args, message, chat_checkpoint, tmp_path):
    setup(tmp_path)
    base = ["measure", "--model", chat_checkpoint("llama"), "-o", tmp_path / "m.refuse"]
    res = run_cli(*base, *[a.format(d=tmp_path) for a in args])
    assert res.exit_code == 2, res.output + res.stderr
    assert message in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "m.refuse").exists()


def test_require_template(chat_checkpoint, tmp_path):
    res = run_cli(
        "measure",
        "--model",
        chat_checkpoint("llama", chat_template=False),
        "-o",
        tmp_path / "m.refuse",
        "--require-template",
        "--max-prompts",
        "4",
    )
    assert res.exit_code == 2 and "has no chat template (--require-template)" in res.stderr


def test_model_not_found(tmp_path):
    res = run_cli("measure", "--model", str(tmp_path / "nothing"), "-o", tmp_path / "m.refuse")
    assert res.exit_code == 2 and "neither a local directory nor a Hub repo id" in res.stderr
