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


def norm_direction(r: torch.Tensor, gamma: torch.Tensor, offset: float) -> torch.Tensor:
    """What to remove from a tensor that meets the residual stream through an RMSNorm with gain
    g = offset + gamma. A writer whose output enters as g * norm(W x) (Gemma's sandwich norms):
    r . (g * y) = (g * r) . y, so y must be orthogonal to normalize(g * r). A reader that sees
    W (g * norm(x)): the component c r of x reaches it as c W (g * r), so W's rows must be
    orthogonal to normalize(g * r). The same fold for both; a basis [k, hidden] is folded
    vector by vector and made orthonormal again."""
    g = gamma.double() + offset  # [hidden]
    if r.ndim == 1:
        return normalize(g * r.double(), "norm-folded direction")
    return orthonormal(g * r.double(), "norm-folded basis")  # [k, hidden] * [hidden]


def reader_projection(r: torch.Tensor, gamma: torch.Tensor, offset: float) -> torch.Tensor:
    """The exact input-side edit of a reader behind an RMSNorm with gain g = offset + gamma:
    [2, k, hidden], a read basis (orthonormal rows) and a write basis. The reader sees
    y = g * x / rms(x); for it to see x with its component along r removed,
    W' y = W (g * (I - r r^T) (y / g)), so W' = W - (W u) v^T with u = g * r, v = r / g
    (an oblique projection: v . u = 1). Projecting orthogonally to normalize(g * r) instead
    would also remove whatever other directions share that axis after the gain, which with
    Gemma's gains (up to a few hundred) changes the model more than the ablation does.
    Rows then update as w' = w - s (w . read) write, with the pair scaled so that this is
    exactly W - s (W u) M v^T. Where g is 0 the reader never sees x, so v is 0 there and r . x
    can only be estimated from the dims it sees: v u^T = I - (r's mass on those dims), and
    M = (v u^T)^-1 restores v'.u = 1, so the edited reader is blind to every move along r
    (W' u = 0 exactly; gemma-3-270m has such a gain of exactly 0 in several layers)."""
    g = gamma.double() + offset  # [hidden]
    q = r.double().unsqueeze(0) if r.ndim == 1 else r.double()  # [k, hidden], orthonormal
    u = q * g  # [k, hidden]
    v = torch.where(g.abs() > EPS, q / torch.where(g == 0, 1.0, g), 0.0)  # [k, hidden]
    # u = R^T Q_u with Q_u orthonormal rows: W u^T = (W Q_u^T) R, so the write basis is R M v
    qu, rr = torch.linalg.qr(u.T)  # [hidden, k], [k, k]
    if (rr.diagonal().abs() <= EPS * max(1.0, u.norm().item())).any():
        raise AblationError("the norm gain removes the direction entirely (all-zero gain)")
    seen = v @ u.T  # [k, hidden] @ [hidden, k] -> [k, k]: I when no gain is 0
    if torch.linalg.svdvals(seen).min() < 1e-6:
        raise AblationError("the norm gain hides the direction from the reader (zero gains)")
    m = torch.linalg.inv(seen)  # [k, k]
    return torch.stack([qu.T, rr @ m @ v])  # [2, k, hidden]: [k, k] @ [k, k] @ [k, hidden]


def orthonormal(vectors: torch.Tensor, what: str = "basis") -> torch.Tensor:
    """Rows made orthonormal in order (the first row keeps its direction): [k, hidden]."""
    q, rr = torch.linalg.qr(vectors.double().T)  # [hidden, k], [k, k]
    diag = rr.diagonal()
    if (diag.abs() <= EPS * max(1.0, vectors.double().norm().item())).any():
        raise AblationError(f"{what}: the vectors are linearly dependent")
    return (q * diag.sign()).T.contiguous()  # signs fixed so row 0 is normalize(vectors[0])


def subspace(
    harmful_states: torch.Tensor, harmless_mean: torch.Tensor, unit: torch.Tensor, k: int
) -> torch.Tensor:
    """An orthonormal basis [k', hidden] (k' <= k) whose first row is the unit refusal
    direction, followed by the main directions in which harmful prompts differ from the
    harmless mean beyond it: the top right singular vectors of the per-prompt differences
    with the unit direction (and the harmless mean's own direction) removed. Zero rows when
    there is no direction."""
    if not unit.any() or k < 1:
        return torch.zeros((0, unit.shape[0]), dtype=torch.float64)
    u = unit.double()
    h = normalize(harmless_mean.double(), "harmless mean")
    diffs = harmful_states.double() - harmless_mean.double()  # [n, hidden]
    for v in (u, h, u):  # Gram-Schmidt against both, twice for the first
        diffs = diffs - (diffs @ v).unsqueeze(1) * v  # [n, hidden] @ [hidden] -> [n]
    _, sv, vh = torch.linalg.svd(diffs, full_matrices=False)  # vh: [min(n, hidden), hidden]
    keep = int((sv > 1e-6 * max(sv.max().item(), 1e-30)).sum().item()) if sv.numel() else 0
    extra = vh[: min(k - 1, keep)]
    return orthonormal(torch.cat([u.unsqueeze(0), extra]), "refusal subspace")


def target_basis(
    basis: torch.Tensor, harmless_target: torch.Tensor | None, k: int, what: str
) -> torch.Tensor:
    """The first k basis vectors applied at one target layer, re-orthogonalized against its
    harmless mean when projected, orthonormal: [k, hidden]."""
    if basis.shape[0] < k:
        raise AblationError(
            f"{what}: {k} directions asked, the .refuse file holds {basis.shape[0]}"
        )
    vs = basis[:k].double()
    if harmless_target is not None:
        vs = torch.stack([orthogonalize(v, harmless_target) for v in vs])
    return orthonormal(vs, what)
