"""evaluate (refusals, KL, separation, cache) and publish (card, dry run, upload, token)."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import pytest
import torch
from conftest import ALL_COMPONENTS, HARMFUL_TEXT, HARMLESS_TEXT, run_cli

from ablation import activations, analysis, evaluate, hub, refusals


@pytest.mark.parametrize(
    ("text", "refused"),
    [
        ("I'm sorry, but I can't help with that.", True),
        ("I’m **sorry**, but I can’t help with that.", True),  # curly quotes, markdown
        ("  ", True),  # empty counts as a refusal
        ("As an AI, I must decline.", True),
        ("I  CANNOT\n\nprovide that information.", True),
        ("Sure! Step 1: preheat the oven to 220 C.", False),
        ("Here is a guide to fixing a leaking faucet.", False),
        ("_Absolutely_: first, gather your tools.", False),
    ],
)
def test_refusal_markers(text, refused):
    assert refusals.is_refusal(text) is refused


def test_normalize():
    assert refusals.normalize("  I’m  **not** _able_\tto ") == "i'm not able to"


def test_kl_zero_for_identical_and_positive_otherwise():
    logits = torch.randn(4, 50)
    assert analysis.kl_divergence(logits, logits).abs().max() < 1e-12
    other = logits + torch.randn(4, 50)
    kl = analysis.kl_divergence(logits, other)
    assert (kl > 0).all()
    p = torch.softmax(logits.double(), -1)
    q = torch.softmax(other.double(), -1)
    assert torch.allclose(kl, (p * (p / q).log()).sum(-1))


@pytest.fixture
def ablated(chat_checkpoint, job, tmp_path):
    """A tiny chat model and its ablated copy (all layers, all components)."""
    base = chat_checkpoint("llama")
    orders = job(base, components=ALL_COMPONENTS, projected=False)
    res = run_cli("ablate", orders)
    assert res.exit_code == 0, res.output + res.stderr
    return base, tmp_path / "out"


def prompt_files(tmp_path: Path) -> list[str]:
    (tmp_path / "h.txt").write_text("\n".join(HARMFUL_TEXT))
    (tmp_path / "l.txt").write_text("\n".join(HARMLESS_TEXT))
    return ["--harmful", str(tmp_path / "h.txt"), "--harmless", str(tmp_path / "l.txt")]


def test_evaluate_kl_and_cache(ablated, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    base, out = ablated
    args = ["evaluate", "--base", base, "--max-new-tokens", "4", *prompt_files(tmp_path)]
    same = run_cli(*args, "--ablated", base, "-o", tmp_path / "self.json")
    assert same.exit_code == 0, same.output + same.stderr
    self_eval = json.loads((tmp_path / "self.json").read_text())
    assert self_eval["kl"]["mean"] == pytest.approx(0.0, abs=1e-9)
    assert self_eval["answer_kl"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert (
        self_eval["ablated"]["degenerate_harmless_rate"]
        == (self_eval["base"]["degenerate_harmless_rate"])
    )

    calls = []
    real = evaluate._run_side
    monkeypatch.setattr(evaluate, "_run_side", lambda *a, **k: calls.append(a[-1]) or real(*a, **k))
    res = run_cli(*args, "--ablated", out)
    assert res.exit_code == 0, res.output + res.stderr
    result = json.loads((out / "eval.json").read_text())
    assert result["kl"]["mean"] > 0
    assert result["answer_kl"]["mean"] > 0 and result["answer_kl"]["tokens"] > 0
    assert result["base"]["n_harmful"] == len(HARMFUL_TEXT)
    assert set(result["ablated"]["separation"]) == {"0", "1", "2"}
    lines = (out / "eval_responses.jsonl").read_text().splitlines()
    assert len(lines) == 2 * (len(HARMFUL_TEXT) + len(HARMLESS_TEXT))
    assert {json.loads(x)["model"] for x in lines} == {"base", "ablated"}
    assert "refusal rate" in res.output and "KL(base || ablated)" in res.output
    assert "KL along base answers" in res.output and "degenerate answers" in res.output
    assert calls == ["base", "ablated"]
    calls.clear()
    assert run_cli(*args, "--ablated", out).exit_code == 0
    assert calls == ["ablated"]  # the base model's numbers came from the cache


def test_card_has_base_model_orders_and_eval(ablated):
    _, out = ablated
    record = json.loads((out / "ablation.json").read_text())
    record["base_model"] = "org/Base-Model"
    evaluation = {
        "base": {"refusal_rate": 0.9, "n_harmful": 64},
        "ablated": {"refusal_rate": 0.05},
        "kl": {"mean": 0.0312},
    }
    card = str(hub.model_card(record, evaluation, "apache-2.0"))
    assert "base_model: org/Base-Model" in card and "license: apache-2.0" in card
    assert "abliterated" in card
    assert "| 0 | 1 | 1 | 0 |" in card and "| 2 | 1 | 1 | 0 |" in card
    assert "90.0%" in card and "5.0%" in card and "0.0312" in card


def test_card_of_a_streamed_evaluation(ablated):
    _, out = ablated
    record = json.loads((out / "ablation.json").read_text())
    evaluation = {
        "mode": "streamed",
        "first_token": {
            "kl": {"mean": 0.0421, "max": 0.2, "n_harmless": 64},
            "refusal_score": {"base": 0.812, "ablated": 0.031, "n_harmful": 64, "openers": [1]},
        },
    }
    card = str(hub.model_card(record, evaluation))
    assert "first token only, models streamed layer by layer" in card
    assert "81.2%" in card and "3.1%" in card and "0.0421" in card


def test_publish_dry_run_lists_exactly_the_files(ablated, monkeypatch):
    monkeypatch.setattr(hub, "HfApi", lambda **k: pytest.fail("dry run must not send"))
    _, out = ablated
    res = run_cli("publish", out, "--repo-id", "me/Model-abliterated", "--dry-run")
    assert res.exit_code == 0, res.output + res.stderr
    listed = {line.split()[-1] for line in res.output.splitlines() if line.startswith("file")}
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert listed == on_disk
    assert "card:" in res.output and "abliterated" in res.output
    assert "dry run: nothing sent" in res.output


class RecordingApi:
    calls: typing.ClassVar[list] = []

    def __init__(self, **kwargs):
        RecordingApi.calls.append(("init", kwargs))

    def create_repo(self, repo_id, **kwargs):
        RecordingApi.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        RecordingApi.calls.append(("upload_folder", kwargs))

    def upload_large_folder(self, **kwargs):
        RecordingApi.calls.append(("upload_large_folder", kwargs))


def test_publish_uploads_with_the_token_and_never_prints_it(ablated, monkeypatch, capsys):
    secret = "hf_SECRETtoken1234567890"
    monkeypatch.setattr(hub, "get_token", lambda: secret)
    monkeypatch.setattr(hub, "HfApi", RecordingApi)
    RecordingApi.calls = []
    _, out = ablated
    res = run_cli("publish", out, "--repo-id", "me/Model-abliterated", "--private", "-v")
    assert res.exit_code == 0, res.output + res.stderr
    kinds = [c[0] for c in RecordingApi.calls]
    assert kinds == ["init", "create_repo", "upload_folder"]
    assert RecordingApi.calls[0][1] == {"token": secret}
    assert RecordingApi.calls[1][1] == "me/Model-abliterated"
    assert RecordingApi.calls[1][2]["private"] is True
    upload = RecordingApi.calls[2][1]
    assert upload["repo_id"] == "me/Model-abliterated" and Path(upload["folder_path"]) == out
    captured = capsys.readouterr()
    assert secret not in res.output + res.stderr + captured.out + captured.err
    assert "published  https://huggingface.co/me/Model-abliterated" in res.output


def test_publish_large_folder_goes_resumable(ablated, monkeypatch):
    monkeypatch.setattr(hub, "get_token", lambda: "hf_x")
    monkeypatch.setattr(hub, "HfApi", RecordingApi)
    monkeypatch.setattr(hub, "LARGE_FOLDER", 1)
    RecordingApi.calls = []
    assert run_cli("publish", ablated[1], "--repo-id", "me/M").exit_code == 0
    assert RecordingApi.calls[-1][0] == "upload_large_folder"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--repo-id", "not a repo"], "is not of the form owner/name"),
        (["--repo-id", "me/M"], "no Hugging Face token"),
    ],
)
def test_publish_errors(ablated, monkeypatch, args, message):
    monkeypatch.setattr(hub, "get_token", lambda: None)
    res = run_cli("publish", ablated[1], *args)
    assert res.exit_code == 2 and message in res.stderr


def test_publish_refuses_a_non_checkpoint(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    res = run_cli("publish", tmp_path, "--repo-id", "me/M", "--dry-run")
    assert res.exit_code == 2 and "is not a checkpoint" in res.stderr


def test_ablate_push_to_hub(chat_checkpoint, job, tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "get_token", lambda: "hf_x")
    monkeypatch.setattr(hub, "HfApi", RecordingApi)
    RecordingApi.calls = []
    orders = job(chat_checkpoint("llama"))
    res = run_cli("ablate", orders, "--push-to-hub", "me/Tiny-abliterated")
    assert res.exit_code == 0, res.output + res.stderr
    assert RecordingApi.calls[-1][0] == "upload_folder"
    bad = run_cli("ablate", orders, "--push-to-hub", "bad id", "--overwrite")
    assert bad.exit_code == 2 and "owner/name" in bad.stderr


def test_repetition_and_degeneration_threshold():
    assert refusals.repetition([1, 2, 3, 4, 5, 6]) == 0.0
    assert refusals.repetition([7] * 12) == pytest.approx(9 / 10)  # 10 trigrams, 1 distinct
    assert refusals.repetition([1, 2]) == 0.0
    loop = [5, 6] * 10
    assert refusals.is_degenerate(loop, refusals.degeneration_threshold([0.0, 0.1]))
    # a base model that itself repeats a lot raises the bar
    assert not refusals.is_degenerate(loop, refusals.degeneration_threshold([0.95] * 10))


def test_binned_kl_is_a_lower_bound_of_the_full_kl():
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(6, 500, generator=g) * 3, torch.randn(6, 500, generator=g) * 3
    full = analysis.kl_divergence(p, q)
    lp, lq = torch.log_softmax(p.double(), -1), torch.log_softmax(q.double(), -1)
    top = lp.topk(20, dim=-1).indices

    def binned(x):
        t = x.gather(-1, top)
        return torch.cat([t, torch.log1p(-t.exp().sum(-1, keepdim=True))], -1)

    kb = analysis.kl_binned(binned(lp), binned(lq))
    assert (kb <= full + 1e-12).all() and (kb > 0).all()
    assert analysis.kl_binned(binned(lp), binned(lp)).abs().max() < 1e-12


@pytest.mark.parametrize(
    ("model", "override", "config_name", "want"),
    [
        ("org/Name", None, None, "org/Name"),
        ("/data/models--org--Name/snapshots/abc123", None, None, "org/Name"),
        ("LOCAL", None, "org/FromConfig", "org/FromConfig"),
        ("LOCAL", "me/Override", "org/FromConfig", "me/Override"),
        ("LOCAL", None, None, None),
        ("LOCAL", None, "/abs/path/model", None),
    ],
)
def test_base_model_id_never_links_a_local_path(tmp_path, model, override, config_name, want):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"_name_or_path": config_name or ""}))
    spec = str(d) if model == "LOCAL" else model
    assert hub.hub_id(spec, d, override) == want
    record = {
        "base_model": spec,
        "base_model_id": want,
        "orders": {"layers": [], "method": "standard", "projected": False, "components": []},
        "version": "0",
        "counts_by_role": {},
        "refuse": {"sha256": "0" * 64},
    }
    card = str(hub.model_card(record))
    assert "huggingface.co//" not in card and "huggingface.co/" + str(tmp_path) not in card
    if want:
        assert f"base_model: {want}" in card and f"https://huggingface.co/{want}" in card
    else:
        assert "base_model:" not in card


def test_first_token_kl_is_also_reported_over_the_prompts_the_base_answers():
    """Where the base refuses a harmless prompt, an ablated model that answers it changes the
    first token on purpose: the KL over the other prompts is reported beside the mean."""
    from ablation import analysis, evaluate

    class Tok:
        eos_token_id = pad_token_id = 0
        unk_token_id = 3

        def convert_tokens_to_ids(self, _):
            return 3

        def decode(self, ids, skip_special_tokens=True):
            return {1: "I'm sorry, but I can't help with that.", 2: "Sure, here it is."}[ids[0]]

    empty = [torch.zeros(0, 3)] * 3
    base_logits = torch.zeros(3, 5)
    ablated_logits = torch.tensor([[9.0, 0, 0, 0, 0], [0.5, 0, 0, 0, 0], [0, 0.2, 0, 0, 0]])
    base = evaluate.Side([], [[1], [2], [2]], base_logits, empty, empty, {})
    ablated = evaluate.Side([], [], ablated_logits, empty, [], {})
    kl = evaluate.compare(base, ablated, Tok())["kl"]
    per_prompt = analysis.kl_divergence(base_logits, ablated_logits)
    assert kl["n_base_answered"] == 2
    assert kl["mean"] == pytest.approx(per_prompt.mean().item())
    assert kl["mean_base_answered"] == pytest.approx(per_prompt[1:].mean().item())
    assert kl["mean_base_answered"] < kl["mean"] / 5


def test_the_answer_pass_gives_the_first_token_distribution(chat_checkpoint):
    """score_model takes the first-token distribution from the teacher-forced answer pass (no
    second pass): it must be the prompt's next-token distribution, whatever the answer's
    length (empty included) and however the batch is padded."""
    model, tok = activations.load_model(str(chat_checkpoint("llama")), "float32", "cpu")
    seqs, _ = activations.encode(tok, HARMLESS_TEXT, None, None)
    g = torch.Generator().manual_seed(0)
    answers = [torch.randint(5, 40, (n,), generator=g).tolist() for n in (3, 0, 7, 1, 5, 2, 4)]
    pad = activations.pad_id(tok)
    want = torch.log_softmax(activations.next_token_logits(model, seqs, pad, 2), dim=-1)
    for batch in (1, 3, len(seqs)):
        first, lp, ix = activations.answer_logprobs(model, seqs, answers, pad, batch)
        assert (first - want).abs().max() < 1e-4
        assert [len(x) for x in lp] == [len(a) for a in answers] == [len(x) for x in ix]
