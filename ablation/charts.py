"""Per-layer charts of a measurement (matplotlib, an optional extra; never opens a window)."""

from __future__ import annotations

from pathlib import Path

from ablation.analysis import LayerMetrics
from ablation.errors import AblationError


def _nan(x: float | None) -> float:
    return float("nan") if x is None else x


def draw(metrics: list[LayerMetrics], path: Path, title: str = "") -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise AblationError("--chart needs matplotlib: pip install 'ablation[charts]'") from None
    x = [m.layer for m in metrics]
    fig, axes = plt.subplots(5, 1, figsize=(9, 13), sharex=True)
    panels = [
        (
            "norms",
            [
                ("|harmful|", [m.harmful_norm for m in metrics]),
                ("|harmless|", [m.harmless_norm for m in metrics]),
                ("|refuse|", [m.refuse_norm for m in metrics]),
            ],
        ),
        ("cosine(harmful, harmless)", [("cosine", [m.cosine for m in metrics])]),
        (
            "signal",
            [
                ("snr", [m.snr for m in metrics]),
                ("purity", [m.purity for m in metrics]),
                ("quality (scaled)", _scaled([m.quality for m in metrics])),
            ],
        ),
        (
            "separation",
            [
                ("auroc", [_nan(m.auroc) for m in metrics]),
                ("cohen's d / 10", [_nan(m.cohens_d) / 10 for m in metrics]),
            ],
        ),
        (
            "rotation (degrees)",
            [
                ("from previous", [_nan(m.rotation_prev) for m in metrics]),
                ("from first", [_nan(m.rotation_first) for m in metrics]),
            ],
        ),
    ]
    for ax, (name, series) in zip(axes, panels, strict=True):
        for label, ys in series:
            ax.plot(x, ys, marker="o", markersize=3, label=label)
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    best = max(metrics, key=lambda m: m.score)
    for ax in axes:
        ax.axvline(best.layer, color="red", alpha=0.3, linestyle="--")
    axes[-1].set_xlabel("layer (residual stream entering it)")
    fig.suptitle(title or "refusal direction by layer", fontsize=12)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise AblationError(f"{path}: cannot write ({exc.strerror})") from exc
    finally:
        plt.close(fig)


def _scaled(values: list[float]) -> list[float]:
    top = max(values) if values else 0
    return [v / top if top > 0 else 0.0 for v in values]


def front(points, chosen, path: Path, title: str = "") -> None:
    """The search's trials: held-out-free tuning numbers, refusals against damage, the Pareto
    front joined, degeneration as colour, the chosen trial ringed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise AblationError(
            "the front chart needs matplotlib: pip install 'ablation[charts]'"
        ) from None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sc = ax.scatter(
        [p.damage for p in points],
        [p.attrs.get("refusal_rate", p.failure) for p in points],
        c=[p.attrs.get("degenerate_harmful_rate", 0.0) for p in points],
        cmap="viridis",
        vmin=0,
        vmax=1,
        s=25,
    )
    front_ = sorted((p for p in points if p.pareto), key=lambda p: p.damage)
    ax.plot(
        [p.damage for p in front_],
        [p.attrs.get("refusal_rate", p.failure) for p in front_],
        color="tab:red",
        lw=1,
        label="Pareto front",
    )
    if chosen is not None:
        ax.scatter(
            [chosen.damage],
            [chosen.attrs.get("refusal_rate", chosen.failure)],
            s=160,
            facecolors="none",
            edgecolors="tab:red",
            label=f"chosen (trial {chosen.number})",
        )
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("damage: max(first-token KL, answer KL), harmless tuning prompts")
    ax.set_ylabel("refusal rate, harmful tuning prompts")
    fig.colorbar(sc, label="degenerate answers (harmful)")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(f"ablation tune {title}".strip())
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
