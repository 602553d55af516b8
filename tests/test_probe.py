"""The causal check (measure --probe): what the hooks remove, the same figures streamed and in
memory, the choice rule, and the orders analyze writes from it."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import HARMFUL_TEXT, HARMLESS_TEXT, run_cli

from ablation import activations, analysis, probe, refuse, stream

transformers = pytest.importorskip("transformers")


def _report(base: float, rows: list[tuple[int, int, float, float]]) -> analysis.ProbeReport:
    return analysis.ProbeReport(
        base, 3, [analysis.Outcome(analysis.Candidate(m, s), o, k) for m, s, o, k in rows]
    )


def test_choice_is_the_latest_start_that_removes_the_openers():
    rows = [
        (9, 9, 0.01, 0.50),
        (9, 10, 0.04, 0.20),
        (10, 10, 0.03, 0.10),  # the same start as above, lower KL: picked
        (10, 11, 0.30, 0.05),  # leaves 0.3 of 0.8 > 0.1 x 0.8: does not remove them
    ]
    got = analysis.probe_choice(_report(0.8, rows))
    assert (got.candidate.measurement, got.candidate.start) == (10, 10)
    none_removes = _report(0.8, [(9, 9, 0.5, 0.1), (9, 10, 0.3, 0.9), (10, 10, 0.3, 0.2)])
    got = analysis.probe_choice(none_removes)
    assert (got.candidate.measurement, got.candidate.start, got.kl) == (10, 10, 0.2)
    back = analysis.ProbeReport.from_json(_report(0.8, rows).to_json())
    assert back == _report(0.8, rows)


def test_suggestion_takes_the_probe_pick():
    metrics = [
        analysis.LayerMetrics(
            i, 0.5, 1, 1, 1, 0.1, 1, 0.05, None, None, 1.0, a, 0.1 if i == 3 else 0.05
        )
        for i, a in enumerate([0.6, 0.9, 0.995, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    ]
    assert analysis.suggest_orders(metrics).measurement == 2
    s = analysis.suggest_orders(metrics, _report(0.5, [(3, 5, 0.01, 0.1), (3, 6, 0.2, 0.01)]))
    assert (s.measurement, s.layers, s.rule) == (3, (5, 9), "probe")
    cands = analysis.probe_candidates(metrics)  # saturation 2 and best score 3
    assert [(c.measurement, c.start) for c in cands] == [
        (m, s) for m in (2, 3) for s in (1, 2, 3, 4)
    ]


def test_hooks_leave_nothing_along_r_and_touch_nothing_before(chat_checkpoint):
    model, tok = activations.load_model(str(chat_checkpoint("llama")), "float32")
    _, layers = stream._decoder_layers(model, 3)
    ids, _ = activations.encode(tok, HARMFUL_TEXT)
    g = torch.Generator().manual_seed(0)
    r = {t: torch.nn.functional.normalize(torch.randn(32, generator=g), dim=0) for t in (1, 2)}
    seen: dict[int, torch.Tensor] = {}

    def record(t):
        def pre(_m, args, kwargs):
            seen[t] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

        return pre

    pad = activations.pad_id(tok)
    untouched = activations.next_token_logits(model, ids, pad, 4)
    with probe.hooked(layers, r):  # registered first: the recording hooks see what they leave
        handles = [
            layers[t].register_forward_pre_hook(record(t), with_kwargs=True) for t in range(3)
        ]
        probed = activations.next_token_logits(model, ids, pad, 4)
        for h in handles:
            h.remove()
    for t in (1, 2):
        along = (seen[t].double() @ r[t].double()).abs().max().item()
        assert along < 1e-5 * seen[t].abs().max().item()
    assert (seen[0].double() @ r[1].double()).abs().max() > 1e-3  # layer 0's input untouched
    assert not torch.allclose(untouched, probed)
    assert torch.equal(untouched, activations.next_token_logits(model, ids, pad, 4))  # removed


def _measure_probe(tmp_path, model_dir, name: str, mode: str) -> refuse.Measurements:
    h, l_ = tmp_path / "h.txt", tmp_path / "l.txt"
    h.write_text("\n".join(HARMFUL_TEXT) + "\n")
    l_.write_text("\n".join(HARMLESS_TEXT) + "\n")
    out = tmp_path / f"{name}.refuse"
    args = ["measure", "--model", model_dir, "-o", out, "--harmful", h, "--harmless", l_]
    res = run_cli(*args, "--probe", mode, "--batch-size", "4")
    assert res.exit_code == 0, res.output + res.stderr
    assert "probe pick measurement" in res.output
    return refuse.load(out)


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_streamed_probe_equals_in_memory_and_analyze_writes_its_pick(
    family, chat_checkpoint, tmp_path
):
    model_dir = chat_checkpoint(family)
    a = analysis.probe_report(_measure_probe(tmp_path, model_dir, "memory", "--no-stream-layers"))
    b = analysis.probe_report(_measure_probe(tmp_path, model_dir, "streamed", "--stream-layers"))
    assert a is not None and b is not None and a.outcomes
    assert [o.candidate for o in a.outcomes] == [o.candidate for o in b.outcomes]
    assert b.base_mass == pytest.approx(a.base_mass, rel=1e-4, abs=1e-6)
    for x, y in zip(a.outcomes, b.outcomes, strict=True):
        assert y.opener_mass == pytest.approx(x.opener_mass, rel=1e-3, abs=1e-6)
        assert y.kl == pytest.approx(x.kl, rel=1e-2, abs=1e-11)
    # a random tiny model's first token is near uniform: small KLs, but not zero
    assert all(o.kl > 1e-10 for o in a.outcomes)
    orders_path = tmp_path / "orders.yaml"
    res = run_cli(
        "analyze", tmp_path / "memory.refuse", "--emit-orders", orders_path, "--model", model_dir
    )
    assert res.exit_code == 0, res.output + res.stderr
    pick = analysis.probe_choice(a).candidate
    text = orders_path.read_text()
    body = yaml.safe_load(text)
    assert body["ablate"] == [
        {"layers": f"{pick.start}-2", "measurement": pick.measurement, "scale": 1.0}
    ]
    assert body["components"] == ["readers", "router", "head"]
    assert "causal check's pick" in text and "<- pick" in text
    assert sum(line.startswith("#  ") for line in text.splitlines()) >= len(a.outcomes)
