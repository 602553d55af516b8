"""Refusal directions from measured means (pure tensor math; no files)."""

from __future__ import annotations

import torch

from ablation.errors import AblationError

EPS = 1e-12


def normalize(v: torch.Tensor, what: str = "direction") -> torch.Tensor:
    n = v.norm()
    if not torch.isfinite(n) or n <= EPS:
        raise AblationError(f"{what} is zero or not finite (norm {n.item():.3g})")
    return v / n


def refusal(
    harmful_mean: torch.Tensor, harmless_mean: torch.Tensor, projected: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw difference of means, unit direction), in float64; the unit direction is biprojected
    (the harmless mean's own direction removed) when `projected`. Where the two means agree
    (a layer that sees only template tokens at the read position, say) there is no direction,
    and the unit vector is all zeros rather than noise blown up to unit length."""
    raw = harmful_mean.double() - harmless_mean.double()  # [hidden]
    scale = max(harmful_mean.double().norm().item(), harmless_mean.double().norm().item(), 1.0)
    if not torch.isfinite(raw).all() or raw.norm().item() <= 1e-6 * scale:
        return raw, torch.zeros_like(raw)
    ortho = orthogonalize(raw, harmless_mean) if projected else raw
    if ortho.norm().item() <= 1e-6 * scale:
        return raw, torch.zeros_like(raw)
    return raw, ortho / ortho.norm()


def orthogonalize(v: torch.Tensor, against: torch.Tensor) -> torch.Tensor:
    """Remove the component along `against` (two Gram-Schmidt passes for float residue)."""
    u = normalize(against.double(), "harmless mean")
    out = v.double()
    for _ in range(2):
        out = out - (out @ u) * u  # [hidden] . [hidden] -> scalar
    return out.to(v.dtype)


def biproject(
    refuse: torch.Tensor, harmless: torch.Tensor, what: str = "direction"
) -> torch.Tensor:
    """Unit refusal direction with the harmless mean's own direction removed."""
    return normalize(orthogonalize(refuse, harmless), what)


def sparsify(v: torch.Tensor, fraction: float) -> torch.Tensor:
    """Zero the `fraction` smallest-magnitude components, renormalize."""
    if not 0.0 <= fraction < 1.0:
        raise AblationError(f"sparsity {fraction} is outside [0, 1)")
    k = int(fraction * v.numel())
    if k == 0:
        return v
    out = v.clone()
    out[v.abs().argsort()[:k]] = 0
    return normalize(out, "sparsified direction")


def target_direction(
    refusenorm: torch.Tensor,
    harmless_target: torch.Tensor | None,
    sparsity: float,
    what: str,
) -> torch.Tensor:
    """The unit direction applied at one target layer: measured direction, re-orthogonalized
    against the target layer's harmless mean when projected (the second projection of
    biprojection), then sparsified."""
    r = normalize(refusenorm.double(), what)
    if harmless_target is not None:
        r = biproject(r, harmless_target, what)
    return sparsify(r, sparsity)


def post_norm_direction(r: torch.Tensor, gamma: torch.Tensor, offset: float) -> torch.Tensor:
    """Direction to remove from W's output when the residual gets (offset + gamma) * norm(W x):
    r . (g * y) = (g * r) . y, so y must be orthogonal to normalize(g * r)."""
    g = gamma.double() + offset  # [hidden]
    return normalize(g * r.double(), "post-norm direction")
