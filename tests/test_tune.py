"""`ablation tune`: the search space, one math path between a trial and the written checkpoint,
restore from the checkpoint's bytes, resume after kill -9, two workers on one study, bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import transformers
import yaml
from conftest import (
    HARMFUL_TEXT,
    HARMLESS_TEXT,
    HIDDEN,
    make_measurements,
    num_layers_of,
    run_cli,
    write_refuse,
)

from ablation import evaluate, live, orders, rewrite, space

optuna.logging.set_verbosity(optuna.logging.WARNING)


# --- the space ---------------------------------------------------------------------------


def test_window_trial_becomes_orders():
    values = {
        "shape": "window",
        "measurement": 5,
        "start": -1,
        "end": -2,
        "attn_readers": 1.0,
        "mlp_readers": 0.5,
        "writers": 0.01,  # below OFF: writers left out
        "per_layer": False,
        "directions": 1,
        "rows": 1.0,
        "method": "norm-preserving",
    }
    body = space.orders_body(values, 12)
    assert body["ablate"] == [
        {"components": ["attn_in"], "layers": "4-9", "scale": 1.0, "measurement": 5},
        {
            "components": ["mlp_in", "experts_in", "router"],
            "layers": "4-9",
            "scale": 0.5,
            "measurement": 5,
        },
    ]
    body = space.orders_body({**values, "per_layer": True, "start": 9, "end": -8}, 12)
    assert all("measurement" not in e for e in body["ablate"])
    assert body["ablate"][0]["layers"] == "11-11"  # clamped: a window never ends before it starts


def test_kernel_trial_clips_at_the_last_layer(checkpoint, tmp_path):
    model_dir = checkpoint("gemma3_text")
    n = num_layers_of(model_dir)
    meas = write_refuse(tmp_path / "m.refuse", n)
    values = {
        "shape": "kernel",
        "measurement": 1,
        "start": n - 2,  # peak on the last layer
        "attn_readers": 0.0,
        "mlp_readers": 0.0,
        "writers": 1.0,
        "per_layer": False,
        "directions": 1,
        "rows": 1.0,
        "method": "norm-preserving",
        "kernel_width": 2,
        "kernel_min_scale": 0.5,
    }
    body = space.orders_body(values, n)
    doc = {"model": str(model_dir), "measurements": str(meas), "output": "x", **body}
    o = orders.from_dict(doc, Path("trial"))
    assert {x.layer for x in o.layers} == {n - 3, n - 2, n - 1, n, n + 1}
    plan = rewrite.build_plan(o, model_dir, meas)
    assert {e.target.layer for e in plan.edits} == {n - 3, n - 2, n - 1}  # the flank past the end
    scales = {e.target.layer: e.scale for e in plan.edits}
    assert scales[n - 1] == 1.0 and scales[n - 3] == 0.5


def test_suggest_asks_only_what_the_shape_uses():
    bound = space.bind(space.Space(shape=["window", "kernel"]), 18)
    trial = optuna.trial.FixedTrial(
        {
            "shape": "kernel",
            "measurement": 9,
            "start": 0,
            "attn_readers": 1.0,
            "mlp_readers": 1.0,
            "writers": 0.0,
            "per_layer": False,
            "kernel_width": 3,
            "kernel_min_scale": 0.2,
        }
    )
    values = space.suggest(trial, bound)
    assert "end" not in values and values["kernel_width"] == 3 and values["directions"] == 1
    assert bound.space.measurement == [2, 15]  # default: past the first tenth, before the last
    suggestion = {
        "shape": "window",
        "measurement": 10,
        "start": 0,
        "end": 0,
        "attn_readers": 1.0,
        "mlp_readers": 1.0,
        "writers": 0.0,
        "per_layer": False,
    }
    seeds = space.seed_values(bound, 10)
    assert [v for _, v in seeds] == [
        suggestion,
        {**suggestion, "start": 1},
        {**suggestion, "attn_readers": 0.75, "mlp_readers": 0.75},
    ]
    assert seeds[0][0] == "analyze's suggestion"
    # a seed outside the space is left out; one that a fixed parameter makes equal to another too
    narrow = space.bind(space.Space(start=[-2, 0]), 18)
    assert [v["start"] for _, v in space.seed_values(narrow, 10)] == [0, 0]
    fixed = space.bind(space.Space(start=0, attn_readers=1.0, mlp_readers=1.0), 18)
    assert [label for label, _ in space.seed_values(fixed, 10)] == ["analyze's suggestion"]


# --- the command on a tiny chat model ------------------------------------------------------


@pytest.fixture
def setup(chat_checkpoint, tmp_path, request):
    model_dir = chat_checkpoint(getattr(request, "param", "gemma3_text"))
    n = num_layers_of(model_dir)
    refuse_path = write_refuse(tmp_path / "m.refuse", n, seed=3)
    (tmp_path / "harmful.txt").write_text("\n".join(HARMFUL_TEXT) + "\n")
    (tmp_path / "harmless.txt").write_text("\n".join(HARMLESS_TEXT) + "\n")
    return model_dir, refuse_path, n


def _args(tmp_path, model_dir, refuse_path, out: str, trials: int, *extra) -> list[str]:
    return [
        "tune",
        "--model",
        str(model_dir),
        "--measurements",
        str(refuse_path),
        "-o",
        str(tmp_path / out),
        "--trials",
        str(trials),
        "--harmful",
        str(tmp_path / "harmful.txt"),
        "--harmless",
        str(tmp_path / "harmless.txt"),
        "--max-new-tokens",
        "4",
        "--no-held-out",
        "-q",
        *extra,
    ]


@pytest.mark.parametrize("setup", ["gemma3_text", "qwen3_moe"], indirect=True)
def test_trial_edit_is_the_written_checkpoint_and_restore_is_exact(setup, tmp_path, monkeypatch):
    """The tensors a trial scores are byte for byte what sharded_ablate.py writes from that
    trial's orders.yaml, and after each trial the model equals the checkpoint again."""
    model_dir, refuse_path, _ = setup
    on_disk = transformers.AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    seen: dict[str, dict[str, torch.Tensor]] = {}
    restores: list[bool] = []
    score, restore = evaluate.score_model, live.restore

    def spy_score(model, *a, **kw):
        if kw.get("harmless_generations") is False:  # a trial: the model holds its edit
            seen[kw["label"]] = {k: v.clone() for k, v in model.state_dict().items()}
        return score(model, *a, **kw)

    def spy_restore(model, index, names):
        restore(model, index, names)
        restores.append(all(torch.equal(v, on_disk[k]) for k, v in model.state_dict().items()))

    monkeypatch.setattr(evaluate, "score_model", spy_score)
    monkeypatch.setattr(live, "restore", spy_restore)
    target = tmp_path / "ablated"
    res = run_cli(*_args(tmp_path, model_dir, refuse_path, "tune", 4, "--target", str(target)))
    assert res.exit_code == 0, res.output + res.stderr
    assert len(seen) >= 3 and len(restores) == len(seen) and all(restores)

    text = (tmp_path / "tune" / "orders.yaml").read_text()
    number = int(text.split("trial ")[1].split(")")[0])
    res = run_cli("ablate", tmp_path / "tune" / "orders.yaml")
    assert res.exit_code == 0, res.output + res.stderr
    written = transformers.AutoModelForCausalLM.from_pretrained(target).state_dict()
    trial = seen[f"trial {number}"]
    changed = [k for k in written if not torch.equal(written[k], on_disk[k])]
    assert changed, "the chosen orders edit something"
    for k, v in written.items():
        assert torch.equal(v, trial[k]), k

    front = yaml.safe_load((tmp_path / "tune" / "front.json").read_text())
    assert front["chosen"] == number and len(front["trials"]) == 4
    assert any(t["pareto"] for t in front["trials"])
    assert front["trials"][0]["attrs"]["enqueued"] == "analyze's suggestion"


def _study(tmp_path, out: str):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / out / 'study.db'}")
    return optuna.load_study(study_name="ablation-tune", storage=storage)


def _cmd(tmp_path, model_dir, refuse_path, out, trials, *extra) -> list[str]:
    args = _args(tmp_path, model_dir, refuse_path, out, trials, "--batch-size", "1", *extra)
    return [sys.executable, "-m", "ablation", *args]


def _assert_one_study(study, trials: int) -> None:
    states = optuna.trial.TrialState
    done = study.get_trials(states=(states.COMPLETE,))
    assert len(done) == trials
    assert not study.get_trials(states=(states.RUNNING, states.WAITING))
    numbers = [t.number for t in done]
    assert len(set(numbers)) == len(numbers)
    # a trial that did not count (surplus) never ran: it has no orders
    for t in study.get_trials(states=(states.PRUNED,)):
        assert t.user_attrs.get("surplus") and "orders" not in t.user_attrs


def test_kill_and_resume_continue_one_study(setup, tmp_path):
    model_dir, refuse_path, _ = setup
    cmd = _cmd(tmp_path, model_dir, refuse_path, "tune", 8, "--heartbeat", "1")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = tmp_path / "tune" / "study.db"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.2)
        if db.exists():
            try:
                trials = _study(tmp_path, "tune").get_trials(deepcopy=False)
            except Exception:  # the study is being created
                continue
            done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
            if len(done) >= 2:
                break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _study(tmp_path, "tune").get_trials(deepcopy=False)
    assert 2 <= len(before) < 8
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 2 and "--resume" in again.stderr  # a fresh start is refused
    res = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    study = _study(tmp_path, "tune")
    _assert_one_study(study, 8)
    done_before = {
        t.number: t.params for t in before if t.state == optuna.trial.TrialState.COMPLETE
    }
    after = {t.number: t.params for t in study.get_trials(deepcopy=False)}
    assert all(after[k] == v for k, v in done_before.items())  # the same study, continued
    running_before = [t for t in before if t.state == optuna.trial.TrialState.RUNNING]
    for t in running_before:  # the killed trial was failed and its parameters run again
        assert study.trials[t.number].state == optuna.trial.TrialState.FAIL
        retried = [  # by its stale heartbeat, or as an orphan killed before its first one
            u
            for u in study.get_trials(deepcopy=False)
            if t.number in (u.system_attrs.get("failed_trial"), u.user_attrs.get("retry_of"))
        ]
        chosen = t.params or t.system_attrs.get("fixed_params")  # none: nothing to run again
        assert retried or not chosen
        assert all(retried[0].params[k] == v for k, v in (chosen or {}).items())


def test_a_trial_orphaned_before_its_first_heartbeat_is_failed(tmp_path):
    """A worker killed between creating a trial and its first heartbeat leaves a RUNNING trial
    no heartbeat check fails; the budget must not wait on it forever (seen as a hung resume)."""
    from ablation import tune

    storage = optuna.storages.RDBStorage(
        f"sqlite:///{tmp_path / 'study.db'}", heartbeat_interval=1, grace_period=2
    )
    study = optuna.create_study(storage=storage, directions=["minimize", "minimize"])
    orphan = study.ask()  # RUNNING, never heartbeated, never named by a worker
    alive = study.ask()
    alive.set_user_attr("worker", "host:1")
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    assert tune._fail_orphans(study, running, age=60.0) == 0  # too young to call
    assert tune._fail_orphans(study, running, age=0.0) == 1
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    assert states == {
        orphan.number: optuna.trial.TrialState.FAIL,
        alive.number: optuna.trial.TrialState.RUNNING,
    }
    # an orphan that had its parameters (an enqueued trial: analyze's seeds) runs again
    study.enqueue_trial({"x": 0.5})
    seeded = study.ask()  # takes the enqueued parameters, then dies before a heartbeat
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    assert tune._fail_orphans(study, running, age=0.0) == 1
    waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    assert [(w.system_attrs["fixed_params"], w.user_attrs["retry_of"]) for w in waiting] == [
        ({"x": 0.5}, seeded.number)
    ]


def test_two_workers_finish_one_study(setup, tmp_path):
    model_dir, refuse_path, _ = setup
    cmd = _cmd(tmp_path, model_dir, refuse_path, "tune", 8, "--resume")
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    study = _study(tmp_path, "tune")
    _assert_one_study(study, 8)
    workers = {
        t.user_attrs["worker"] for t in study.get_trials(deepcopy=False) if "orders" in t.user_attrs
    }
    assert len(workers) == 2


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("space_text", "message"),
    [
        ("measurement: [2, 4]\nwidth: 3\n", "width: unknown key"),
        ("measurement: [1, 40]\n", "outside the model's layers"),
        ("writers: [1.0, 0.5]\n", "low <= high"),
        ("end: [0, 2]\n", "end"),
    ],
)
def test_bad_space_is_one_line(setup, tmp_path, space_text, message):
    model_dir, refuse_path, _ = setup
    (tmp_path / "space.yaml").write_text(space_text)
    res = run_cli(
        *_args(tmp_path, model_dir, refuse_path, "t", 2, "--space", tmp_path / "space.yaml")
    )
    assert res.exit_code == 2
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_refuse_of_another_model_is_one_line(setup, tmp_path):
    model_dir, _, n = setup
    other = tmp_path / "other.refuse"
    write_refuse(other, n, hidden=HIDDEN * 2)
    res = run_cli(*_args(tmp_path, model_dir, other, "t", 2))
    assert res.exit_code == 2 and "hidden size" in res.stderr
    from ablation import refuse

    refuse.save(tmp_path / "deeper.refuse", make_measurements(n + 3, HIDDEN))
    res = run_cli(*_args(tmp_path, model_dir, tmp_path / "deeper.refuse", "t", 2))
    assert res.exit_code == 2 and "another model" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
