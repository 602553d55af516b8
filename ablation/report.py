"""Step two's outputs: the ranked table, JSON/CSV, the starting orders YAML, and the weight-side
signal (streamed one tensor at a time from the checkpoint, like the rewriter)."""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import asdict
from pathlib import Path

import yaml
from tqdm import tqdm

from ablation import analysis, orders, quant
from ablation.checkpoint import ShardFiles
from ablation.errors import AblationError
from ablation.refuse import Measurements
from ablation.rewrite import build_plan, open_model

LOG = logging.getLogger(__name__)
WRITER_ROLES = {"attn_out", "mlp_out", "expert_out", "shared_expert_out"}
TOP = 3  # layers marked in the table


def check(meas: Measurements, path: Path) -> None:
    layers = sorted(meas.layers)
    if layers != list(range(layers[0], layers[-1] + 1)):
        missing = sorted(set(range(layers[0], layers[-1] + 1)) - set(layers))
        raise AblationError(f"{path}: layers {missing[:8]} are missing")
    for layer, m in meas.layers.items():
        for kind in ("harmful", "harmless", "refuse", "refusenorm"):
            if not getattr(m, kind).isfinite().all():
                raise AblationError(f"{path}: {kind}_{layer} holds NaN or infinite values")


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def table(metrics: list[analysis.LayerMetrics]) -> list[str]:
    top = {m.layer for m in analysis.ranking(metrics)[:TOP] if m.score > 0}
    head = (
        f"{'layer':>5} {'cos':>7} {'|harm|':>8} {'|harml|':>8} {'|refuse|':>8} {'snr':>7} "
        f"{'purity':>6} {'quality':>9} {'rot°':>5} {'d':>6} {'auroc':>5} {'score':>9}"
    )
    rows = [head]
    for m in metrics:
        rows.append(
            f"{m.layer:>5} {m.cosine:7.4f} {m.harmful_norm:8.2f} {m.harmless_norm:8.2f} "
            f"{m.refuse_norm:8.3f} {m.snr:7.4f} {m.purity:6.3f} {m.quality:9.2e} "
            f"{_fmt(m.rotation_prev, '5.1f'):>5} {_fmt(m.cohens_d, '6.2f'):>6} "
            f"{_fmt(m.auroc, '5.3f'):>5} {m.score:9.2e}" + (" *" if m.layer in top else "")
        )
    rows.append(f"* top {TOP} by score = snr * (1 - cos) * purity * max(0, 2 * auroc - 1)")
    return rows


def write_json(path: Path, metrics, weights=None, experts=None) -> None:
    data = {
        "layers": [asdict(m) for m in metrics],
        "ranking": [m.layer for m in analysis.ranking(metrics)],
    }
    if weights is not None:
        data["weights"] = [asdict(w) for w in weights]
    if experts is not None:
        data["experts"] = {str(k): [asdict(e) for e in v] for k, v in experts.items()}
    _write(path, json.dumps(data, indent=2) + "\n")


def write_csv(path: Path, metrics) -> None:
    fields = [*asdict(metrics[0]).keys()]
    try:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            for m in metrics:
                w.writerow(asdict(m))
    except OSError as exc:
        raise AblationError(f"{path}: cannot write ({exc.strerror})") from exc


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as exc:
        raise AblationError(f"{path}: cannot write ({exc.strerror})") from exc


def emit_orders(
    path: Path,
    metrics,
    measurements: Path,
    model: str,
    output: str,
    scale: float = 1.0,
    method: str = "norm-preserving",
    components: tuple[str, ...] = ("readers", "router"),
    probe_report: analysis.ProbeReport | None = None,
) -> analysis.Suggestion:
    """A commented, valid orders file; it is read back through the validator before returning.
    When the model is a local checkpoint the orders are also planned against it first, so a
    family whose table cannot do them (no readers known, a norm it cannot place) is one line
    naming what to use instead, and no file is written."""
    s = analysis.suggest_orders(metrics, probe_report)
    best = next(m for m in metrics if m.layer == s.measurement)
    if s.rule == "probe" and "readers" in components and "head" not in components:
        # the check removed the direction from the stream itself, which the output head reads
        # too: readers alone leave it the identity path (on the refusing demo model, readers
        # 17-17 alone kept 98% of the refusals; with the head, 0%)
        components = (*components, "head")
    body = {
        "model": model,
        "measurements": str(measurements),
        "output": output,
        "method": method,
        "projected": True,
        "scale": scale,
        "components": list(components),
        "ablate": [
            {
                "layers": f"{s.layers[0]}-{s.layers[1]}",
                "measurement": s.measurement,
                "scale": 1.0,
            }
        ],
    }
    why = {
        "saturation": f"the first layer whose auroc ({_fmt(best.auroc, '.3f')}) is within "
        f"{analysis.SATURATION} of the best, away from the first layers",
        "score": f"the best score ({best.score:.3g}; no per-prompt projections in the file), "
        "away from the first layers",
        "probe": "the causal check's pick (measure --probe; what it tried is listed below)",
    }[s.rule]
    header = (
        f"# Starting marching orders written by analyze.py from {measurements}.\n"
        f"# Measurement layer {s.measurement}: {why}.\n"
        f"# Layers {s.layers[0]}-{s.layers[1]}: from there on, every module that reads the\n"
        "# residual stream (attention q/k/v, MLP and expert gate/up, routers) stops reading the\n"
        "# direction: the weights do what removing it from the stream from that layer on does.\n"
        "# Review, then run:\n"
        f"#   python sharded_ablate.py {path} --dry-run\n"
    )
    if s.rule == "probe" and probe_report is not None:
        header += probe_comment(probe_report)
        if "head" in components:
            header += (
                "# The output head is edited too (components: head): the check removed the\n"
                "# direction from the stream, and the head reads the stream past the last layer.\n"
            )
    _check_plannable(body, path, model, measurements)
    _write(path, header + yaml.safe_dump(body, sort_keys=False))
    orders.load(path)
    return s


def probe_comment(report: analysis.ProbeReport) -> str:
    """Every candidate the causal check tried, in the order it tried them, as comment lines."""
    pick = analysis.probe_choice(report)
    lines = [
        "# Causal check: the direction of layer M removed from the stream entering every layer",
        f"# from S on (hooks, first token only). Untouched: the {report.openers} refusal opener",
        f"# tokens hold {report.base_mass:.3f} of the first token after harmful prompts; a",
        f"# candidate removes them when it leaves <= {analysis.PROBE_LEFT:g} of that; the pick is",
        "# the latest S that does (fewest layers edited), then the lowest harmless KL.",
        "#    M   S  openers  harmless KL",
    ]
    for o in report.outcomes:
        mark = "  <- pick" if o is pick else ""
        c = o.candidate
        lines.append(
            f"#  {c.measurement:3d} {c.start:3d}  {o.opener_mass:7.3f}  {o.kl:11.4f}{mark}"
        )
    return "\n".join(lines) + "\n"


def _check_plannable(body: dict, path: Path, model: str, measurements: Path) -> None:
    model_dir = Path(model)
    if not (model_dir / "config.json").is_file():
        return  # a Hub id: planned when sharded_ablate.py has the files
    try:
        build_plan(orders.from_dict(body, path), model_dir, measurements)
    except AblationError as exc:
        parts = ", ".join(body["components"])
        other = (
            "--components writers (what the table does know)"
            if "writers" not in body["components"]
            else "a family table for it in ablation/architectures"
        )
        raise AblationError(
            f"{model}: orders with components {parts} cannot be applied ({exc}); use {other}"
        ) from None


def weight_signal(
    meas: Measurements, meas_path: Path, model_dir: Path, nulls: int = 16, seed: int = 0
) -> list[analysis.WriterSignal]:
    arch = open_model(model_dir, meas, meas_path)
    null = analysis.random_directions(nulls, arch.hidden_size, seed)
    plan = []
    for layer in sorted(meas.layers):
        d = meas.layers[layer].refusenorm
        if layer >= arch.num_layers or not d.any():
            continue
        plan += [(layer, t) for t in arch.targets(layer) if t.role in WRITER_ROLES]
    out = []
    with ShardFiles(model_dir) as files:
        for layer, t in tqdm(plan, desc="weights", unit="tensor", disable=None):
            w = files.read(t.info)
            if arch.quant is not None and t.scale is not None and t.block is not None:
                w = quant.values(arch.quant, w, files.read(t.scale), t.block)  # its values
            out.append(
                analysis.writer_signal(
                    t.name, t.role, layer, w, meas.layers[layer].refusenorm, t.hidden_axis, null
                )
            )
    return out


def weight_table(signals: list[analysis.WriterSignal]) -> list[str]:
    rows = [f"{'layer':>5} {'role':<18} {'energy/rand':>11} {'z':>7} {'gini':>5}  tensor"]
    for s in signals:
        rows.append(
            f"{s.layer:>5} {s.role:<18} {s.energy_ratio:11.2f} {s.z:7.2f} {s.gini:5.3f}  {s.tensor}"
        )
    return rows


def experts(meas: Measurements, top: int = 5) -> dict[int, list[analysis.ExpertBias]]:
    return {
        layer: analysis.expert_bias(m.extra["experts_harmful"], m.extra["experts_harmless"], top)
        for layer, m in sorted(meas.layers.items())
        if "experts_harmful" in m.extra and "experts_harmless" in m.extra
    }


def expert_table(by_layer: dict[int, list[analysis.ExpertBias]]) -> list[str]:
    rows = ["layer  experts most selected on harmful vs harmless (expert: ratio, counts h/l)"]
    for layer, items in by_layer.items():
        rows.append(
            f"{layer:>5}  "
            + "  ".join(f"{e.expert}: {e.ratio:.2f} ({e.harmful}/{e.harmless})" for e in items)
        )
    return rows
