"""Per-layer signal metrics of a measurement (pure tensor math; no files)."""

from __future__ import annotations

import torch


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
