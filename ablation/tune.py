"""`ablation tune`: search the marching orders on the loaded model, then hand the chosen ones to
the streaming rewriter.

Each trial is ordinary orders (from the search space), planned by the rewriter's own planner
and applied to the loaded model's parameters with the rewriter's kernels (`live`), so the edit
a trial scores is byte for byte the edit `sharded_ablate.py` writes. After scoring, the touched
tensors are read back from the checkpoint's bytes on disk: no second copy of the model.

Trials are scored on the tuning split of the built-in prompts (trained on by nothing, never
used by the final report), in the model's own chat format: objective 1 is the fraction of
harmful prompts not answered (refused, or answered with degenerate repetition), objective 2
the damage, the larger of the first-token KL and the per-token KL along the base model's own
harmless answers. The chosen trial is then scored on the held-out split.

The study lives in Optuna's storage (an SQLite file in the output folder by default): a killed
run continues with --resume, and processes on several machines sharing one storage and study
name work on one study. A trial whose worker died is failed by its stale heartbeat and retried
with the same parameters; the trial count is a budget for the whole study, not per worker.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import socket
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from ablation import activations, analysis, evaluate, live, orders, prompts, rewrite, space
from ablation.errors import AblationError
from ablation.hub import resolve_model

LOG = logging.getLogger(__name__)

FAILURE = "not answered"  # objective 1
DAMAGE = "damage"  # objective 2: max(first-token KL, answer KL)


@dataclass
class TuneOptions:
    model: str
    measurements: Path
    output: Path
    trials: int = 60
    timeout: float | None = None
    seed: int = 0
    space: Path | None = None
    storage: str | None = None
    study_name: str = "ablation-tune"
    resume: bool = False
    max_kl: float = 0.2
    max_new_tokens: int = 16
    eval_new_tokens: int = 24
    batch_size: int = 32
    device: str | None = None
    dtype: str = "auto"
    harmful: str | None = None
    harmless: str | None = None
    text_field: str = "text"
    max_prompts: int | None = None
    system: str | None = None
    response_prefix: str | None = None
    held_out: bool = True
    heartbeat: int = 20
    target: str | None = None  # the output folder the written orders name


@dataclass
class Point:
    """One finished trial."""

    number: int
    failure: float
    damage: float
    attrs: dict[str, Any]
    params: dict[str, Any]
    pareto: bool = False


@dataclass
class Result:
    points: list[Point]
    chosen: Point | None
    held_out: dict[str, Any] | None
    files: dict[str, str] = field(default_factory=dict)
    study_trials: int = 0
    seconds: float = 0.0


def _optuna():
    try:
        import optuna
    except ImportError:
        raise AblationError("ablation tune needs optuna: pip install 'ablation[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def storage_for(opts: TuneOptions):
    """An RDB URL (SQLite by default, PostgreSQL, MySQL) with heartbeats, so a dead worker's
    trial is failed and retried; or a journal file (`journal:PATH` or a .log/.journal path)
    for shared file systems, without heartbeats."""
    optuna = _optuna()
    url = opts.storage or f"sqlite:///{(opts.output / 'study.db').resolve()}"
    if url.startswith("journal:") or url.endswith((".log", ".journal")):
        from optuna.storages.journal import JournalFileBackend

        path = url.removeprefix("journal:")
        LOG.warning("journal storage %s has no heartbeats: a killed trial stays running", path)
        return optuna.storages.JournalStorage(JournalFileBackend(path)), url
    for attempt in range(10):
        try:
            storage = optuna.storages.RDBStorage(
                url,
                engine_kwargs=(
                    {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
                ),
                heartbeat_interval=opts.heartbeat,
                grace_period=2 * opts.heartbeat,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=3
                ),
            )
            return storage, url
        except (ValueError, ImportError) as exc:
            raise AblationError(f"--storage {url}: {exc}") from None
        except Exception as exc:  # sqlalchemy's errors: a bad URL or an unreachable server
            if not type(exc).__module__.startswith("sqlalchemy"):
                raise
            racing = "already exists" in str(exc) or "UNIQUE constraint" in str(exc)
            if racing and attempt < 9:
                time.sleep(0.5)  # another worker is creating the tables right now
                continue
            raise AblationError(f"--storage {url}: {str(exc).splitlines()[0]}") from None
    raise AssertionError("unreachable")


def _identity(opts: TuneOptions, model_dir: Path, sha: str, bound: space.Bound, texts) -> dict:
    """What makes two runs the same study: a worker that differs must not join it."""
    return {
        "model": str(model_dir.resolve()),
        "refuse_sha256": sha,
        "space": bound.space.model_dump(),
        "prompts": hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:16],
        "max_new_tokens": opts.max_new_tokens,
    }


def open_study(opts: TuneOptions, identity: dict, sampler):
    optuna = _optuna()
    storage, url = storage_for(opts)
    exists = opts.study_name in [s.study_name for s in optuna.get_all_study_summaries(storage)]
    if exists and not opts.resume:
        raise AblationError(
            f"study {opts.study_name!r} already exists in {url}: --resume continues (or joins) "
            "it, --study-name starts another"
        )
    study = optuna.create_study(
        storage=storage,
        study_name=opts.study_name,
        directions=["minimize", "minimize"],
        sampler=sampler,
        load_if_exists=True,
    )
    have = study.user_attrs.get("identity")
    if have is None:
        study.set_user_attr("identity", identity)
        study.set_metric_names([FAILURE, DAMAGE])
    elif have != identity:
        diff = sorted(k for k in identity if have.get(k) != identity[k])
        raise AblationError(
            f"study {opts.study_name!r} in {url} was started with another "
            f"{', '.join(diff)}: it cannot be resumed with these inputs"
        )
    return study, url


def _sampler(bound: space.Bound, seed: int, worker_salt: int):
    optuna = _optuna()
    s = seed + worker_salt
    if bound.space.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=s)
    return optuna.samplers.TPESampler(
        seed=s, multivariate=True, group=True, constant_liar=True, n_startup_trials=10
    )


class Scorer:
    """The loaded model, its base-side numbers on the tuning prompts, and one trial's score."""

    def __init__(self, opts: TuneOptions, model_dir: Path, sources: rewrite.Sources, texts):
        self.opts, self.model_dir, self.sources = opts, model_dir, sources
        self.model, self.tok = activations.load_model(str(model_dir), opts.dtype, opts.device)
        self.h_ids, _ = activations.encode(self.tok, texts[0], opts.system, opts.response_prefix)
        self.l_ids, _ = activations.encode(self.tok, texts[1], opts.system, opts.response_prefix)
        self.base = evaluate.score_model(
            self.model,
            self.tok,
            self.h_ids,
            self.l_ids,
            opts.max_new_tokens,
            opts.batch_size,
            label="base",
        )
        self.base_numbers = evaluate.summarize(
            self.base,
            self.tok,
            evaluate.compare(self.base, self.base, self.tok)["degeneration_threshold"],
        )

    def plan(self, body: dict, label: str) -> rewrite.Plan:
        doc = {
            "model": str(self.model_dir),
            "measurements": str(self.opts.measurements),
            "output": "unused",
            **body,
        }
        return rewrite.build_plan(
            orders.from_dict(doc, Path(label)),
            self.model_dir,
            self.opts.measurements,
            self.sources,
        )

    def score(self, body: dict, label: str) -> dict[str, Any]:
        if not body["ablate"]:  # every group off: the base model
            b = self.base_numbers
            return {
                "refusal_rate": b["refusal_rate"],
                "compliance_rate": b["compliance_rate"],
                "degenerate_harmful_rate": b["degenerate_harmful_rate"],
                "kl_first_token": 0.0,
                "kl_answer": 0.0,
                "edited_tensors": 0,
            }
        plan = self.plan(body, label)
        touched = live.apply(self.model, plan)
        try:
            side = evaluate.score_model(
                self.model,
                self.tok,
                self.h_ids,
                self.l_ids,
                self.opts.max_new_tokens,
                self.opts.batch_size,
                base=self.base,
                label=label,
                harmless_generations=False,
            )
        finally:
            live.restore(self.model, plan.index, touched)
        c = evaluate.compare(self.base, side, self.tok)
        a = c["ablated"]
        return {
            "refusal_rate": a["refusal_rate"],
            "compliance_rate": a["compliance_rate"],
            "degenerate_harmful_rate": a["degenerate_harmful_rate"],
            "kl_first_token": c["kl"]["mean"],
            "kl_answer": c["answer_kl"]["mean"],
            "edited_tensors": len(plan.edits),
        }

    def held_out(self, body: dict) -> dict[str, Any]:
        """The chosen orders on the held-out split, as `ablation evaluate` scores them."""
        o = self.opts
        harmful = prompts.builtin("harmful", "eval")
        harmless = prompts.builtin("harmless", "eval")
        h_ids, _ = activations.encode(self.tok, harmful, o.system, o.response_prefix)
        l_ids, _ = activations.encode(self.tok, harmless, o.system, o.response_prefix)
        kw = dict(max_new_tokens=o.eval_new_tokens, batch_size=o.batch_size)
        base = evaluate.score_model(self.model, self.tok, h_ids, l_ids, label="held-out base", **kw)
        plan = self.plan(body, "chosen")
        touched = live.apply(self.model, plan)
        try:
            side = evaluate.score_model(
                self.model, self.tok, h_ids, l_ids, base=base, label="held-out chosen", **kw
            )
        finally:
            live.restore(self.model, plan.index, touched)
        c = evaluate.compare(base, side, self.tok)
        return {
            "n_harmful": c["ablated"]["n_harmful"],
            "n_harmless": c["kl"]["n_harmless"],
            "max_new_tokens": o.eval_new_tokens,
            "base": {k: v for k, v in c["base"].items() if isinstance(v, float)},
            "ablated": {k: v for k, v in c["ablated"].items() if isinstance(v, float)},
            "kl_first_token": c["kl"]["mean"],
            "kl_answer": c["answer_kl"]["mean"],
        }


def objectives(numbers: dict[str, Any]) -> tuple[float, float]:
    failure = 1.0 - numbers["compliance_rate"]
    return failure, max(numbers["kl_first_token"], numbers["kl_answer"])


def _live_before(study, number: int) -> int:
    """Trials that count against the budget and were created before this one."""
    optuna = _optuna()
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING)
    waiting = optuna.trial.TrialState.WAITING
    return sum(
        1
        for t in study.get_trials(deepcopy=False, states=(*states, waiting))
        if t.number < number and not t.user_attrs.get("surplus")
    )


def run(opts: TuneOptions) -> Result:
    optuna = _optuna()
    t_start = time.perf_counter()
    if opts.trials < 1:
        raise AblationError(f"--trials {opts.trials}: must be at least 1")
    if not opts.max_kl > 0:
        raise AblationError(f"--max-kl {opts.max_kl}: must be positive")
    model_dir = resolve_model(opts.model)
    if not opts.measurements.exists():
        raise AblationError(f"{opts.measurements}: no such .refuse file")
    sources = rewrite.open_sources(model_dir, opts.measurements)
    n = sources.arch.num_layers
    if len(sources.measurements.layers) != n:
        raise AblationError(
            f"{opts.measurements}: measures {len(sources.measurements.layers)} layers, the model "
            f"{model_dir} has {n}: it was measured on another model"
        )
    bound = space.bind(space.load(opts.space), n, opts.space)
    metrics = analysis.layer_metrics(sources.measurements)
    suggestion = analysis.suggest_orders(metrics, analysis.probe_report(sources.measurements))
    harmful, _ = prompts.load(opts.harmful, "harmful", "tune", opts.text_field, opts.max_prompts)
    harmless, _ = prompts.load(opts.harmless, "harmless", "tune", opts.text_field, opts.max_prompts)
    opts.output.mkdir(parents=True, exist_ok=True)
    identity = _identity(opts, model_dir, sources.refuse_sha256, bound, [harmful, harmless])
    salt = (hash((socket.gethostname(), os.getpid())) % 10_000) if opts.resume else 0
    study, url = open_study(opts, identity, _sampler(bound, opts.seed, salt))
    LOG.info("study %r in %s: %d trials so far", opts.study_name, url, len(study.trials))
    if not study.trials:
        for label, values in space.seed_values(
            bound, suggestion.measurement, suggestion.layers[0] - suggestion.measurement
        ):
            study.enqueue_trial(values, user_attrs={"enqueued": label}, skip_if_exists=True)
    _requeue_interrupted(study)

    scorer = Scorer(opts, model_dir, sources, (harmful, harmless))
    LOG.info(
        "base on the tuning split: %.1f%% refused, %d + %d prompts",
        100 * scorer.base_numbers["refusal_rate"],
        len(harmful),
        len(harmless),
    )

    def objective(trial) -> tuple[float, float]:
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")  # alive
        if _live_before(study, trial.number) >= opts.trials:
            trial.set_user_attr("surplus", True)  # another worker took the last slot
            raise optuna.TrialPruned()
        values = space.suggest(trial, bound)
        body = space.orders_body(values, n)
        trial.set_user_attr("orders", body)
        t0 = time.perf_counter()
        numbers = scorer.score(body, f"trial {trial.number}")
        for k, v in numbers.items():
            trial.set_user_attr(k, v)
        trial.set_user_attr("seconds", time.perf_counter() - t0)
        return objectives(numbers)

    def complete() -> list:
        return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))

    deadline = None if opts.timeout is None else time.monotonic() + opts.timeout
    with tqdm(total=opts.trials, initial=len(complete()), unit="trial", desc="tune") as bar:
        while True:
            optuna.storages.fail_stale_trials(study)
            done = len(complete())
            bar.n = min(done, opts.trials)
            bar.set_postfix_str(_best_text(_points(study), opts.max_kl), refresh=True)
            if done >= opts.trials or (deadline is not None and time.monotonic() > deadline):
                break
            running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
            if not waiting and done + len(running) >= opts.trials:
                if not _fail_orphans(study, running, max(30.0, 3 * opts.heartbeat)):
                    time.sleep(min(opts.heartbeat, 5))  # the last trials run elsewhere
                continue
            study.optimize(objective, n_trials=1, catch=())

    points = _points(study)
    chosen = choose(points, opts.max_kl)
    result = Result(points, chosen, None, study_trials=len(complete()))
    if chosen is not None and opts.held_out:
        result.held_out = scorer.held_out(chosen.attrs["orders"])
    result.seconds = time.perf_counter() - t_start
    write_outputs(opts, result, model_dir, url)
    return result


def _fail_orphans(study, running: list, age: float) -> int:
    """A worker killed between creating a trial and its first heartbeat leaves a RUNNING trial
    that no heartbeat check will ever fail, and the budget waits on it forever. A live worker
    names itself on the trial (user attr "worker") within moments of creating it; a RUNNING
    trial still nameless after `age` seconds is an orphan: failed here. Returns how many."""
    optuna = _optuna()
    now = datetime.datetime.now()
    orphans = [
        t
        for t in running
        if "worker" not in t.user_attrs
        and t.datetime_start is not None
        and (now - t.datetime_start).total_seconds() > age
    ]
    for t in orphans:
        LOG.warning("trial %d: its worker died before starting it; failed", t.number)
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        params = t.params or t.system_attrs.get("fixed_params")  # an enqueued trial's
        if params:  # run again, as a killed trial's heartbeat would have it
            study.enqueue_trial(params, user_attrs={"retry_of": t.number})
    return len(orphans)


def _requeue_interrupted(study) -> None:
    """A trial stopped by Ctrl-C (or an error) is FAIL without a retry; its parameters go back
    in the queue once, so an interrupted study loses no trial. (A killed worker's trial is
    retried by its stale heartbeat instead.)"""
    optuna = _optuna()
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    retried |= {t.system_attrs.get("failed_trial") for t in trials}
    for t in trials:
        if t.state == optuna.trial.TrialState.FAIL and t.params and t.number not in retried:
            if t.user_attrs.get("retry_of") is not None:
                continue  # a retry that failed too: not again
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})


def _points(study) -> list[Point]:
    optuna = _optuna()
    trials = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not trials:
        return []
    pareto = {t.number for t in study.best_trials}
    return [
        Point(t.number, *t.values, dict(t.user_attrs), dict(t.params), t.number in pareto)
        for t in trials
    ]


def choose(points: list[Point], max_kl: float) -> Point | None:
    """The fewest harmful prompts left unanswered among trials whose damage is at most
    max_kl (ties: the least damage); with none under the bound, the least damage."""
    if not points:
        return None
    ok = [p for p in points if p.damage <= max_kl]
    if ok:
        return min(ok, key=lambda p: (p.failure, p.damage, p.number))
    LOG.warning("no trial has damage <= %g: the least damaging one is written", max_kl)
    return min(points, key=lambda p: (p.damage, p.failure, p.number))


def _best_text(points: list[Point], max_kl: float) -> str:
    best = choose([p for p in points if p.damage <= max_kl], max_kl) if points else None
    if best is None:
        return "no trial under --max-kl yet"
    return f"best #{best.number}: {best.failure:.1%} not answered, damage {best.damage:.3f}"


def write_outputs(opts: TuneOptions, result: Result, model_dir: Path, url: str) -> None:
    out = opts.output
    front = {
        "model": str(model_dir),
        "measurements": str(opts.measurements),
        "storage": url,
        "study": opts.study_name,
        "objectives": [FAILURE, DAMAGE],
        "max_kl": opts.max_kl,
        "chosen": result.chosen.number if result.chosen else None,
        "held_out": result.held_out,
        "trials": [asdict(p) for p in result.points],
    }
    (out / "front.json").write_text(json.dumps(front, indent=2) + "\n")
    result.files["front"] = str(out / "front.json")
    try:
        from ablation import charts

        charts.front(result.points, result.chosen, out / "front.png", model_dir.name)
        result.files["chart"] = str(out / "front.png")
    except AblationError as exc:
        LOG.warning("%s", exc)
    if result.chosen is not None:
        c = result.chosen
        doc = {
            "model": str(model_dir),
            "measurements": str(opts.measurements),
            "output": opts.target or f"{model_dir.name}-abliterated",
            **c.attrs["orders"],
        }
        header = [
            f"# Orders found by ablation tune (study {opts.study_name!r}, trial {c.number}).",
            f"# Tuning split: {c.attrs['refusal_rate']:.1%} refused, "
            f"{1 - c.attrs['compliance_rate']:.1%} not answered, first-token KL "
            f"{c.attrs['kl_first_token']:.3f}, answer KL {c.attrs['kl_answer']:.3f}.",
        ]
        h = result.held_out
        if h:
            header.append(
                f"# Held-out split: {h['ablated']['refusal_rate']:.1%} refused (base "
                f"{h['base']['refusal_rate']:.1%}), first-token KL {h['kl_first_token']:.3f}, "
                f"answer KL {h['kl_answer']:.3f}."
            )
        header.append(f"# Run: python sharded_ablate.py {out / 'orders.yaml'}")
        text = "\n".join(header) + "\n" + yaml.safe_dump(doc, sort_keys=False)
        orders.from_dict(yaml.safe_load(text), out / "orders.yaml")  # what we write must load
        (out / "orders.yaml").write_text(text)
        result.files["orders"] = str(out / "orders.yaml")
    (out / "summary.txt").write_text("\n".join(summary(result, opts)) + "\n")
    result.files["summary"] = str(out / "summary.txt")


def summary(result: Result, opts: TuneOptions) -> list[str]:
    pts = result.points
    lines = [
        f"trials     {result.study_trials} complete in the study ({opts.trials} asked), "
        f"{sum(p.pareto for p in pts)} on the Pareto front",
    ]
    for p in sorted((p for p in pts if p.pareto), key=lambda p: p.damage):
        mark = "*" if result.chosen and p.number == result.chosen.number else " "
        lines.append(
            f"front    {mark} #{p.number:<4} not answered {p.failure:6.1%}  damage {p.damage:.3f}"
            f"  (KL1 {p.attrs.get('kl_first_token', 0):.3f}, answer KL "
            f"{p.attrs.get('kl_answer', 0):.3f})"
        )
    if result.chosen is None:
        lines.append("chosen     none (no complete trial)")
        return lines
    c = result.chosen
    lines.append(
        f"chosen     trial {c.number} (--max-kl {opts.max_kl:g}): tuning split "
        f"{c.attrs['refusal_rate']:.1%} refused, damage {c.damage:.3f}"
    )
    h = result.held_out
    if h:
        lines.append(
            f"held-out   {h['ablated']['refusal_rate']:.1%} refused (base "
            f"{h['base']['refusal_rate']:.1%}) of {h['n_harmful']}, answered "
            f"{h['ablated']['compliance_rate']:.1%}, first-token KL {h['kl_first_token']:.3f}, "
            f"answer KL {h['kl_answer']:.3f}, degenerate "
            f"{h['ablated']['degenerate_harmful_rate']:.1%} (base "
            f"{h['base']['degenerate_harmful_rate']:.1%})"
        )
    return lines
