"""The cheap causal check of the measurement layer and the first edited layer (`measure
--probe`): remove a candidate direction from the residual stream from a candidate layer on,
with hooks on the running model, and read the first generated token only: how much probability
the refusal openers keep after harmful prompts, and how far the first-token distribution moves
after harmless ones (KL against the untouched model). No generation: one forward pass per
candidate over the measure prompts, in memory or (a model that does not fit) one decoder layer
at a time from the shards.

The default orders (every reader from the first edited layer on stops reading the direction)
do what this removal does, up to the norms' denominators, so the check ranks candidates by what
the edit would do before anything is written; analysis.probe_choice picks from what it found.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from tqdm import tqdm

from ablation import activations, analysis, directions, stream
from ablation.refuse import Measurements

# logits_of(removals or None) -> first-token logits ([n_harmful, vocab], [n_harmless, vocab])
LogitsOf = Callable[[dict[int, torch.Tensor] | None], tuple[torch.Tensor, torch.Tensor]]


def spread(seqs: list[list[int]], most: int) -> list[list[int]]:
    """At most `most` of the prompts, taken at an even stride (the built-in sets are grouped by
    topic: every topic keeps its share)."""
    if most <= 0:
        raise ValueError("the probe needs at least one prompt per set")
    if len(seqs) <= most:
        return seqs
    return [seqs[i * len(seqs) // most] for i in range(most)]


def removals(meas: Measurements, c: analysis.Candidate, num_layers: int) -> dict[int, torch.Tensor]:
    """Decoder layer -> the unit direction [hidden] removed from the stream entering it: the
    candidate measurement's direction, biprojected against each layer's harmless mean, as the
    default orders (projected: true) edit that layer's readers with it."""
    m = meas.layers[c.measurement]
    return {
        t: directions.target_direction(
            m.refusenorm,
            meas.layers[t].harmless,
            0.0,
            f"probe direction {c.measurement} at layer {t}",
        ).float()
        for t in range(c.start, num_layers)
    }


def remove_(h: torch.Tensor, r: torch.Tensor) -> None:
    """In place: h [b, s, hidden] loses its component along unit r [hidden]."""
    r = r.to(device=h.device, dtype=h.dtype)
    h.sub_(
        (h @ r).unsqueeze(-1) * r
    )  # [b, s, hidden] @ [hidden] -> [b, s], outer r -> [b, s, hidden]


@contextmanager
def hooked(layers: torch.nn.ModuleList, r: dict[int, torch.Tensor]):
    """Forward pre-hooks removing r[t] from the hidden state entering decoder layer t."""

    def hook(t: int) -> Callable:
        def pre(_module, args, kwargs):
            if args:
                h = args[0].clone()
                remove_(h, r[t])
                return (h, *args[1:]), kwargs
            h = kwargs["hidden_states"].clone()
            remove_(h, r[t])
            return args, {**kwargs, "hidden_states": h}

        return pre

    handles = [layers[t].register_forward_pre_hook(hook(t), with_kwargs=True) for t in r]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def run(
    logits_of: LogitsOf, meas: Measurements, candidates: list[analysis.Candidate]
) -> analysis.ProbeReport:
    """The untouched model's first tokens (they define the refusal openers), then one pass per
    candidate."""
    n = len(meas.layers)
    base_h, base_l = logits_of(None)
    openers = analysis.refusal_openers(base_h, base_l)
    outcomes = []
    for c in tqdm(candidates, desc="probe", unit="candidate", disable=None):
        h, l_ = logits_of(removals(meas, c, n))
        outcomes.append(
            analysis.Outcome(
                c,
                float(analysis.opener_mass(h, openers).mean()),
                float(analysis.kl_divergence(base_l, l_).mean()),
            )
        )
    return analysis.ProbeReport(
        float(analysis.opener_mass(base_h, openers).mean()), int(openers.sum()), outcomes
    )


def in_memory(
    model, harmful: list[list[int]], harmless: list[list[int]], pad: int, batch: int
) -> LogitsOf:
    """logits_of for a loaded model: its first-token logits with the removals hooked in."""
    _, layers = stream._decoder_layers(model, int(model.config.get_text_config().num_hidden_layers))

    def logits_of(r: dict[int, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        with hooked(layers, r or {}):
            return (
                activations.next_token_logits(model, harmful, pad, batch),
                activations.next_token_logits(model, harmless, pad, batch),
            )

    return logits_of


def streamed(
    streamer: stream.Streamer,
    harmful: list[list[int]],
    harmless: list[list[int]],
    pad: int,
    batch: int,
) -> LogitsOf:
    """logits_of for a model run one decoder layer at a time (one read of the shards per
    call): the removals applied to each batch's state as it enters each layer."""

    def logits_of(r: dict[int, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        r = r or {}

        def visit(layer: int, _batch: int, h: torch.Tensor) -> None:
            if layer in r:
                remove_(h, r[layer])

        got = stream.last_logits(streamer, [harmful, harmless], pad, batch, "probe pass", visit)
        return got[0], got[1]

    return logits_of
