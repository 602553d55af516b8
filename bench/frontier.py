#!/usr/bin/env python3
"""Benchmark: the refusal / damage frontier of the edit options on a refusing model.

Every configuration is ordinary marching orders (a YAML body), planned against the checkpoint
by the rewriter's own planner (`rewrite.build_plan`) and applied to the loaded model in memory
with the rewriter's kernels (`live.apply`), so a point here is the edit `sharded_ablate.py`
writes. Each point is scored with `evaluate`'s functions on the held-out built-in prompts:
refusal rate and "answered" rate (no refusal, not degenerate) on harmful prompts, first-token
KL and per-token KL along the base's own answers on harmless prompts, and degeneration against
the base model's own level. Nothing here trains or tunes on the held-out prompts.

Configurations are placed relative to what `analyze` suggests (its measurement layer m and
window lo-hi), so the grid reads the same on another model.

With --tune FRONT (the front.json of `ablation tune`), the orders of every trial on the
search's Pareto front are scored the same way, on the held-out prompts the search never saw,
so the tuned front and the hand-made points read on one scale.

usage: python bench/frontier.py --model DIR --refuse FILE [--out bench/results_frontier.json]
                                [--max-new-tokens 24] [--only NAME ...] [--plot PNG]
                                [--tune tune/front.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml


def old_suggestion(metrics) -> tuple[int, int, int]:
    """The rule analyze used before reader-side orders (kept here as a baseline): the
    best-scoring layer away from the edges, and the contiguous window around it whose
    separation stays at least half of the best's."""
    n = len(metrics)
    margin = max(1, round(0.1 * n))
    inner = [m for m in metrics if margin <= m.layer <= n - 1 - margin] or metrics
    best = max(inner, key=lambda m: (m.score, -m.layer))
    by_layer = {m.layer: m for m in inner}
    floor = 0.5 * best.separation

    def strong(layer: int) -> bool:
        return layer in by_layer and by_layer[layer].separation >= floor

    lo = hi = best.layer
    while strong(lo - 1):
        lo -= 1
    while strong(hi + 1):
        hi += 1
    return best.layer, lo, hi


def grid(m: int, old: tuple[int, int, int], n: int) -> dict[str, dict]:
    """name -> orders body (everything but model / measurements / output). m: the measurement
    analyze --emit-orders picks now; old: (measurement, lo, hi) of the earlier rule."""
    writers = ["attn_out", "mlp_out", "experts", "shared_experts"]
    om, lo, hi = old
    rd = ["readers", "router"]
    end = n - 1
    return {
        "conventional: 1 direction, all layers, standard": dict(
            method="standard",
            projected=False,
            components=writers,
            ablate=[{"layers": f"1-{end}", "measurement": om}],
        ),
        "earlier default: writers of a window, norm-preserving": dict(
            components=[*writers, "router"], ablate=[{"layers": f"{lo}-{hi}", "measurement": om}]
        ),
        "writers m..end": dict(
            components=[*writers, "router"], ablate=[{"layers": f"{m}-{end}", "measurement": m}]
        ),
        "DEFAULT: readers m..end": dict(
            components=rd, ablate=[{"layers": f"{m}-{end}", "measurement": m}]
        ),
        "readers m-1..end": dict(
            components=rd, ablate=[{"layers": f"{m - 1}-{end}", "measurement": m}]
        ),
        "readers m+1..end": dict(
            components=rd, ablate=[{"layers": f"{m + 1}-{end}", "measurement": m}]
        ),
        "readers m..end, per-layer directions": dict(
            components=rd, ablate=[{"layers": f"{m}-{end}"}]
        ),
        "readers m..end, measured at the old layer": dict(
            components=rd, ablate=[{"layers": f"{m}-{end}", "measurement": om}]
        ),
        "readers + writers m..end": dict(
            components=[*rd, *writers], ablate=[{"layers": f"{m}-{end}", "measurement": m}]
        ),
        "readers m..end, 2 directions": dict(
            components=rd, directions=2, ablate=[{"layers": f"{m}-{end}", "measurement": m}]
        ),
        "readers m..end, rows 0.25": dict(
            components=rd, rows=0.25, ablate=[{"layers": f"{m}-{end}", "measurement": m}]
        ),
        "readers m..end, scale 0.75": dict(
            components=rd, scale=0.75, ablate=[{"layers": f"{m}-{end}", "measurement": m}]
        ),
        "readers, kernel peak m+2 width 3": dict(
            components=rd,
            ablate=[
                {
                    "kernel": {"peak": min(end, m + 2), "width": 3, "min_scale": 0.5},
                    "measurement": m,
                }
            ],
        ),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--refuse", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("bench/results_frontier.json"))
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--only", nargs="*", default=None, help="run only these configurations")
    ap.add_argument("--extra", type=Path, help="YAML mapping name -> orders body, added")
    ap.add_argument("--tune", type=Path, help="front.json of ablation tune: score its front")
    args = ap.parse_args()

    import torch

    from ablation import activations, analysis, evaluate, live, orders, prompts, refuse, rewrite

    torch.manual_seed(0)
    meas = refuse.load(args.refuse)
    metrics = analysis.layer_metrics(meas)
    s = analysis.suggest_orders(metrics)
    n = len(meas.layers)
    old = old_suggestion(metrics)
    configs = grid(s.measurement, old, n)
    if args.extra:
        configs.update(yaml.safe_load(args.extra.read_text()))
    if args.only:
        configs = {k: v for k, v in configs.items() if k in args.only}
    if args.tune:
        front = json.loads(args.tune.read_text())
        for t in front["trials"]:
            if t["pareto"]:
                chosen = " (chosen)" if t["number"] == front["chosen"] else ""
                configs[f"tune: trial {t['number']}{chosen}"] = t["attrs"]["orders"]
    model, tok = activations.load_model(str(args.model), "auto", "cpu")
    harmful = prompts.builtin("harmful", "eval")
    harmless = prompts.builtin("harmless", "eval")
    h_ids, _ = activations.encode(tok, harmful)
    l_ids, _ = activations.encode(tok, harmless)
    kw = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    t0 = time.perf_counter()
    base = evaluate.score_model(model, tok, h_ids, l_ids, label="base", **kw)
    print(f"base scored in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    results = []
    tmp = Path(tempfile.mkdtemp())
    for name, body in configs.items():
        doc = {
            "model": str(args.model),
            "measurements": str(args.refuse),
            "output": str(tmp / "unused"),
            **body,
        }
        path = tmp / "orders.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        plan = rewrite.build_plan(orders.load(path), args.model, args.refuse)
        t = time.perf_counter()
        touched = live.apply(model, plan)
        side = evaluate.score_model(model, tok, h_ids, l_ids, base=base, label=name[:20], **kw)
        live.restore(model, plan.index, touched)
        c = evaluate.compare(base, side, tok)
        a = c["ablated"]
        row = {
            "name": name,
            "orders": body,
            "edited_tensors": len(plan.edits),
            "refusal_rate": a["refusal_rate"],
            "compliance_rate": a["compliance_rate"],
            "kl_first_token": c["kl"]["mean"],
            "kl_answer": c["answer_kl"]["mean"],
            "degenerate_harmless": a["degenerate_harmless_rate"],
            "degenerate_harmful": a["degenerate_harmful_rate"],
            "base_degenerate_harmless": c["base"]["degenerate_harmless_rate"],
            "seconds": time.perf_counter() - t,
            "examples": [r["response"] for r in a["responses"][:3]],
        }
        results.append(row)
        print(
            f"{name:48} refuse {row['refusal_rate']:6.1%} answered {row['compliance_rate']:6.1%} "
            f"KL1 {row['kl_first_token']:.3f} KLans {row['kl_answer']:.3f} "
            f"degen {row['degenerate_harmless']:.1%}/{row['degenerate_harmful']:.1%} "
            f"({row['seconds']:.0f}s)",
            flush=True,
        )
    b = evaluate.summarize(base, tok, evaluate.compare(base, base, tok)["degeneration_threshold"])
    out = {
        "model": str(args.model),
        "refuse": str(args.refuse),
        "suggestion": {"measurement": s.measurement, "window": list(s.layers)},
        "earlier_suggestion": {"measurement": old[0], "window": [old[1], old[2]]},
        "base": {
            k: b[k]
            for k in (
                "refusal_rate",
                "compliance_rate",
                "degenerate_harmless_rate",
                "degenerate_harmful_rate",
            )
        },
        "max_new_tokens": args.max_new_tokens,
        "points": results,
    }
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print("\n".join(markdown(out)))
    if args.plot:
        plot(out, args.plot)
    return 0


def markdown(out: dict) -> list[str]:
    """The frontier as a README table."""
    b = out["base"]
    rows = [
        "| orders | refusals | answered | 1st-token KL | answer KL "
        "| degenerate (harmless / harmful) |",
        "|---|---|---|---|---|---|",
        f"| (base model) | {b['refusal_rate']:.1%} | {b['compliance_rate']:.1%} | - | - | "
        f"{b['degenerate_harmless_rate']:.1%} / {b['degenerate_harmful_rate']:.1%} |",
    ]
    for p in out["points"]:
        rows.append(
            f"| {p['name']} | {p['refusal_rate']:.1%} | {p['compliance_rate']:.1%} | "
            f"{p['kl_first_token']:.3f} | {p['kl_answer']:.3f} | "
            f"{p['degenerate_harmless']:.1%} / {p['degenerate_harmful']:.1%} |"
        )
    return rows


def damage(p: dict) -> float:
    """What the search minimizes: the larger of the two KLs."""
    return max(p["kl_first_token"], p["kl_answer"])


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    tuned = sorted((p for p in out["points"] if p["name"].startswith("tune:")), key=damage)
    if tuned:
        ax.plot(
            [damage(p) for p in tuned],
            [p["refusal_rate"] for p in tuned],
            color="tab:red",
            lw=1,
            marker="s",
            ms=4,
            label="ablation tune: its Pareto front, re-scored held-out",
        )
        ax.legend(loc="upper right", fontsize=7)
    pts = [p for p in out["points"] if not p["name"].startswith("tune:")]
    sc = ax.scatter(
        [damage(p) for p in pts],
        [p["refusal_rate"] for p in pts],
        c=[p["degenerate_harmful"] for p in pts],
        cmap="viridis",
        vmin=0,
        vmax=1,
        s=40,
    )
    for p in pts:
        ax.annotate(p["name"][:34], (damage(p), p["refusal_rate"]), fontsize=6)
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("damage: max(first-token KL, KL per token along the base's answers)")
    ax.set_ylabel("held-out harmful refusal rate")
    fig.colorbar(sc, label="degenerate answers (harmful)")
    ax.set_title(f"refusal / damage frontier, {Path(out['model']).name}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
