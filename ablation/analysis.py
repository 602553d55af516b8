"""Per-layer signal metrics of a measurement (pure tensor math; no files)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from ablation.errors import AblationError
from ablation.refuse import Measurements


def auroc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """P(a random positive scores above a random negative), ties counted half: the
    Mann-Whitney U statistic over n_pos * n_neg."""
    pos, neg = positive.double().flatten(), negative.double().flatten()
    if pos.numel() == 0 or neg.numel() == 0:
        return float("nan")
    both = torch.cat([pos, neg])
    ranks = _average_ranks(both)
    u = ranks[: pos.numel()].sum() - pos.numel() * (pos.numel() + 1) / 2
    return (u / (pos.numel() * neg.numel())).item()


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks, tied values sharing their average rank."""
    order = x.argsort()
    sorted_x = x[order]
    ranks = torch.empty_like(x)
    i, n = 0, x.numel()
    while i < n:
        j = i
        while j + 1 < n and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def cohens_d(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """Difference of means over the pooled standard deviation."""
    pos, neg = positive.double().flatten(), negative.double().flatten()
    if pos.numel() < 2 or neg.numel() < 2:
        return float("nan")
    pooled = (
        ((pos.numel() - 1) * pos.var() + (neg.numel() - 1) * neg.var())
        / (pos.numel() + neg.numel() - 2)
    ).sqrt()
    if pooled == 0:
        return 0.0 if pos.mean() == neg.mean() else float("inf")
    return ((pos.mean() - neg.mean()) / pooled).item()


@dataclass
class LayerMetrics:
    """Signal quality of one measured layer. `score` is the ranking score:
    quality * separation, where quality = SNR * (1 - cosine) * purity and separation =
    max(0, 2 * AUROC - 1) from the stored per-prompt projections (1 when there are none)."""

    layer: int
    cosine: float  # cos(harmful mean, harmless mean)
    harmful_norm: float
    harmless_norm: float
    refuse_norm: float
    snr: float  # |refuse| / max(|harmful|, |harmless|)
    purity: float  # |refuse orthogonal to harmless| / |refuse|
    quality: float  # snr * (1 - cosine) * purity
    rotation_prev: float | None  # degrees between this direction and the previous layer's
    rotation_first: float | None  # ... and the first layer's that has one
    cohens_d: float | None
    auroc: float | None
    score: float

    @property
    def separation(self) -> float:
        return 1.0 if self.auroc is None else max(0.0, 2 * self.auroc - 1)


def _norm(v: torch.Tensor) -> float:
    return v.double().norm().item()


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = _norm(a), _norm(b)
    if na == 0 or nb == 0:
        return 0.0
    return (a.double() @ b.double()).item() / (na * nb)  # [hidden] . [hidden]


def _angle(a: torch.Tensor, b: torch.Tensor) -> float | None:
    if not a.any() or not b.any():
        return None
    return math.degrees(math.acos(max(-1.0, min(1.0, _cos(a, b)))))


def layer_metrics(meas: Measurements) -> list[LayerMetrics]:
    out: list[LayerMetrics] = []
    prev = first = None
    for layer, m in sorted(meas.layers.items()):
        h, l_, r = m.harmful.double(), m.harmless.double(), m.refuse.double()
        hn, ln, rn = _norm(h), _norm(l_), _norm(r)
        cosine = _cos(h, l_)
        snr = rn / max(hn, ln) if max(hn, ln) > 0 else 0.0
        if rn > 0 and ln > 0:
            u = l_ / ln
            purity = _norm(r - (r @ u) * u) / rn  # [hidden] . [hidden] -> scalar
        else:
            purity = 0.0
        quality = snr * (1 - cosine) * purity
        hp, lp = m.extra.get("harmful_proj"), m.extra.get("harmless_proj")
        au = auroc(hp, lp) if hp is not None and lp is not None else None
        d = cohens_d(hp, lp) if hp is not None and lp is not None else None
        direction = m.refusenorm
        metrics = LayerMetrics(
            layer,
            cosine,
            hn,
            ln,
            rn,
            snr,
            purity,
            quality,
            _angle(direction, prev) if prev is not None else None,
            _angle(direction, first) if first is not None else None,
            None if d is None or not math.isfinite(d) else d,
            None if au is None or not math.isfinite(au) else au,
            0.0,
        )
        metrics.score = _finite(quality * metrics.separation)
        out.append(metrics)
        prev = direction
        if first is None and direction.any():
            first = direction
    return out


def _finite(x: float) -> float:
    return x if math.isfinite(x) else 0.0


def ranking(metrics: list[LayerMetrics]) -> list[LayerMetrics]:
    return sorted(metrics, key=lambda m: (-m.score, m.layer))


@dataclass
class Suggestion:
    measurement: int
    layers: tuple[int, int]  # inclusive: the layers whose readers stop reading the direction
    rule: str = "saturation"  # which rule chose it (see suggest_orders)


SATURATION = 0.01  # a layer separates "fully" when its AUROC is within this of the best


@dataclass(frozen=True)
class Candidate:
    """A point the causal check tries: the direction of `measurement` removed from the stream
    entering every layer from `start` on."""

    measurement: int
    start: int


@dataclass(frozen=True)
class Outcome:
    candidate: Candidate
    opener_mass: float  # harmful prompts: mean first-token probability of the refusal openers
    kl: float  # harmless prompts: mean first-token KL(untouched || probed)


@dataclass
class ProbeReport:
    """What the causal check tried (stored in the .refuse file's metadata as JSON)."""

    base_mass: float  # the untouched model's opener mass
    openers: int  # how many tokens the refusal openers are
    outcomes: list[Outcome]

    def to_json(self) -> str:
        return json.dumps(
            {
                "base_mass": self.base_mass,
                "openers": self.openers,
                "outcomes": [
                    [o.candidate.measurement, o.candidate.start, o.opener_mass, o.kl]
                    for o in self.outcomes
                ],
            }
        )

    @classmethod
    def from_json(cls, text: str) -> ProbeReport:
        d = json.loads(text)
        return cls(
            float(d["base_mass"]),
            int(d["openers"]),
            [
                Outcome(Candidate(int(m), int(s)), float(o), float(k))
                for m, s, o, k in d["outcomes"]
            ],
        )


def probe_report(meas: Measurements) -> ProbeReport | None:
    """The causal check's report that measure --probe stored in the file, if any."""
    text = meas.metadata.get("probe")
    if not text:
        return None
    try:
        return ProbeReport.from_json(text)
    except (ValueError, KeyError, TypeError) as exc:
        raise AblationError(f"the .refuse file's probe report is unreadable ({exc})") from exc


PROBE_LEFT = 0.1  # a candidate removes the refusal openers when it leaves this share of their mass


def probe_candidates(metrics: list[LayerMetrics], spread: int = 1) -> list[Candidate]:
    """The points worth a pass: as measurement, the saturation rule's layer and the best-scored
    one (where the direction is read best may lie after where it is first readable); as first
    edited layer, each of them and its neighbours."""
    n = len(metrics)
    centres = sorted({suggest_orders(metrics).measurement, ranking(metrics)[0].layer})
    starts = sorted({c + d for c in centres for d in range(-spread, spread + 1) if 1 <= c + d < n})
    usable = {m.layer for m in metrics if m.refuse_norm > 0}
    return [Candidate(m, s) for m in centres if m in usable for s in starts]


def probe_choice(report: ProbeReport) -> Outcome:
    """The cheapest point that removes the refusal openers: of the candidates that leave at
    most PROBE_LEFT of the untouched model's opener mass, the one editing the fewest layers
    (the latest start), then the smallest KL; where none does, the one leaving the least."""
    if not report.outcomes:
        raise ValueError("the causal check tried no candidates")
    enough = [o for o in report.outcomes if o.opener_mass <= PROBE_LEFT * report.base_mass]
    if enough:
        return min(enough, key=lambda o: (-o.candidate.start, o.kl, o.candidate.measurement))
    return min(report.outcomes, key=lambda o: (o.opener_mass, o.kl))


def suggest_orders(metrics: list[LayerMetrics], probe: ProbeReport | None = None) -> Suggestion:
    """Where the refusal decision becomes readable, and everything after it.

    The measurement is the first layer (away from the first tenth) whose AUROC comes within
    SATURATION of the best: there the direction already separates harmful from harmless
    prompts as well as it ever will, so later layers read the decision from it. The window is
    that layer to the last: their readers stop reading the direction (components `readers`
    and `router`), which is what removing it from the residual stream from that layer on does,
    without touching what earlier layers compute. Measured on the refusing demo model (see
    README, Defaults): earlier measurement layers carry too little of the direction, later
    ones leave the decision made; per-layer directions and writer-only edits did worse.
    Files without per-prompt projections have no AUROC: the best-scoring layer is taken.
    A file with the causal check's report (measure --probe) takes its choice (probe_choice)."""
    n = len(metrics)
    if probe is not None and probe.outcomes:
        c = probe_choice(probe).candidate
        return Suggestion(c.measurement, (c.start, n - 1), "probe")
    margin = max(1, round(0.1 * n))
    inner = [m for m in metrics if margin <= m.layer <= n - 1 - margin] or metrics
    scored = [m for m in inner if m.auroc is not None]
    if scored:
        top = max(m.auroc for m in scored)
        first = min((m for m in scored if m.auroc >= top - SATURATION), key=lambda m: m.layer)
        return Suggestion(first.layer, (first.layer, n - 1), "saturation")
    best = max(inner, key=lambda m: (m.score, -m.layer))
    return Suggestion(best.layer, (best.layer, n - 1), "score")


def energy_along(w: torch.Tensor, d: torch.Tensor, axis: int) -> float:
    """Fraction of a writer's output energy along unit d: sum_j (v_j.d)^2 / sum_j |v_j|^2."""
    v = w.double().movedim(axis, -1).reshape(-1, w.shape[axis])  # [n, hidden]
    total = v.pow(2).sum().item()
    if total == 0:
        return 0.0
    return (v @ d.double()).pow(2).sum().item() / total  # [n, hidden] @ [hidden] -> [n]


def gini(x: torch.Tensor) -> float:
    """Gini coefficient of non-negative values: 0 spread evenly, -> 1 concentrated in few."""
    v = x.double().flatten().abs().sort().values
    n = v.numel()
    if n == 0 or v.sum() == 0:
        return 0.0
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return ((2 * i - n - 1) * v).sum().item() / (n * v.sum().item())


@dataclass
class WriterSignal:
    tensor: str
    role: str
    layer: int
    energy_ratio: float  # energy along r over the expectation for a random direction (1/hidden)
    z: float  # against a seeded random-direction null
    gini: float  # concentration of |v_j . r| over the writer's vectors


def writer_signal(
    name: str,
    role: str,
    layer: int,
    w: torch.Tensor,
    d: torch.Tensor,
    axis: int,
    null_dirs: torch.Tensor,
) -> WriterSignal:
    """null_dirs: [k, hidden] random unit directions."""
    hidden = w.shape[axis]
    e = energy_along(w, d, axis)
    null = torch.tensor([energy_along(w, n, axis) for n in null_dirs])
    std = null.std().item()
    z = (e - null.mean().item()) / std if std > 0 else 0.0
    v = w.double().movedim(axis, -1).reshape(-1, hidden)  # [n, hidden]
    return WriterSignal(name, role, layer, e * hidden, z, gini(v @ d.double()))


def random_directions(k: int, hidden: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(
        torch.randn(k, hidden, generator=g, dtype=torch.float64), dim=1
    )


@dataclass
class ExpertBias:
    expert: int
    ratio: float  # harmful selection frequency over harmless
    harmful: int
    harmless: int


def expert_bias(harmful: torch.Tensor, harmless: torch.Tensor, top: int = 5) -> list[ExpertBias]:
    """Experts most selected on harmful relative to harmless prompts (add-one smoothed)."""
    h, l_ = harmful.double(), harmless.double()
    fh = (h + 1) / (h.sum() + h.numel())
    fl = (l_ + 1) / (l_.sum() + l_.numel())
    ratio = fh / fl
    order = ratio.argsort(descending=True)[:top]
    return [ExpertBias(int(e), ratio[e].item(), int(h[e]), int(l_[e])) for e in order]


def kl_divergence(base_logits: torch.Tensor, other_logits: torch.Tensor) -> torch.Tensor:
    """KL(base || other) of next-token distributions from raw logits over the full vocabulary:
    [n, vocab] x [n, vocab] -> [n], in float64."""
    p_log = torch.log_softmax(base_logits.double(), dim=-1)
    q_log = torch.log_softmax(other_logits.double(), dim=-1)
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def kl_binned(base_logprobs: torch.Tensor, other_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(base || other) over the same bins (the base's top tokens plus one bin for the rest of
    the vocabulary): [..., bins] x [..., bins] -> [...], float64. Merging tokens into a bin
    never raises a KL (data-processing inequality), so this is a lower bound of the full-vocabulary
    KL, and a tight one when the base's top tokens hold almost all of its mass."""
    p_log, q_log = base_logprobs.double(), other_logprobs.double()
    return (p_log.exp() * (p_log - q_log)).sum(-1)


OPENER_MASS = 0.9  # refusal openers are sought among the tokens holding this much harmful mass
OPENER_RATIO = 4.0  # ... that are this many times likelier after harmful than harmless prompts


def refusal_openers(harmful_logits: torch.Tensor, harmless_logits: torch.Tensor) -> torch.Tensor:
    """The first tokens a model opens its refusals with, found without generating: among the
    tokens that hold most of its first-token mass after harmful prompts, those it is at least
    OPENER_RATIO times likelier to say there than after harmless prompts (a model that answers
    both with "Sure" or "Here" has no such token). [n_h, vocab], [n_l, vocab] -> bool [vocab]."""
    ph = torch.softmax(harmful_logits.double(), dim=-1).mean(0)  # [vocab]
    pl = torch.softmax(harmless_logits.double(), dim=-1).mean(0)
    order = ph.argsort(descending=True)
    head = order[: int((ph[order].cumsum(0) < OPENER_MASS).sum()) + 1]
    openers = torch.zeros_like(ph, dtype=torch.bool)
    openers[head] = ph[head] >= OPENER_RATIO * pl[head]
    return openers


def opener_mass(logits: torch.Tensor, openers: torch.Tensor) -> torch.Tensor:
    """Each prompt's first-token probability on the refusal openers: [n, vocab] -> [n]."""
    return torch.softmax(logits.double(), dim=-1)[:, openers].sum(-1)
