"""Refusal directions from measured means (pure tensor math; no files)."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class Gain:
    """A norm between a weight and the residual stream, as the math needs it: y = g * x' / d(x)
    (+ bias) with g = offset + gamma and x' = x (RMSNorm) or x - mean(x) (LayerNorm,
    `centred`). Up to the per-token denominator and the bias, the norm is the linear map
    x -> g * C x (C: centring or identity), symmetric in the sense that its transpose is
    v -> C (g * v)."""

    gamma: torch.Tensor  # [hidden], as stored
    offset: float = 0.0
    centred: bool = False

    def _centre(self, v: torch.Tensor) -> torch.Tensor:
        return v - v.mean(dim=-1, keepdim=True) if self.centred else v  # [k, hidden]

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        """What a move along each row of v ([k, hidden]) looks like after this norm."""
        return self._centre(v.double()) * self.g  # [k, hidden] * [hidden]

    def fold(self, v: torch.Tensor) -> torch.Tensor:
        """The transpose: a direction v after the norm pulled back before it, C (g * v)."""
        return self._centre(v.double() * self.g)

    def unapply(self, v: torch.Tensor) -> torch.Tensor:
        """A least-squares inverse of the transpose: w with C (g * w) = C v, 0 where g is 0
        (a dim the norm's output never carries)."""
        g = self.g
        safe = torch.where(g == 0, 1.0, g)
        return torch.where(g.abs() > EPS, self._centre(v.double()) / safe, 0.0)

    @property
    def g(self) -> torch.Tensor:
        return self.gamma.double() + self.offset  # [hidden]


def norm_direction(r: torch.Tensor, gains: list[Gain]) -> torch.Tensor:
    """What to remove from a writer whose output meets the residual stream through norms
    (innermost first; Gemma's sandwich norm, OLMo 2's post-norms, Gemma 4's two): for the
    stream to gain nothing along r, the output y needs r . N_out(... N_in(y)) = 0, and since
    each norm is a per-token scalar times g * (centred) y (plus a constant bias), that is y
    orthogonal to the direction folded back through every norm, outermost first. A basis
    [k, hidden] is folded row by row and made orthonormal again."""
    v = r.double().unsqueeze(0) if r.ndim == 1 else r.double()  # [k, hidden]
    for gain in reversed(gains):
        v = gain.fold(v)
    if r.ndim == 1:
        return normalize(v[0], "norm-folded direction")
    return orthonormal(v, "norm-folded basis")


def reader_pair(r: torch.Tensor, gains: list[Gain]) -> torch.Tensor:
    """The exact input-side edit of a reader that sees the stream through norms (from the
    stream outwards; none: it reads the stream itself): [2, k, hidden], a read basis
    (orthonormal rows) and a write basis. Up to per-token denominators the reader sees
    y = A x (+ constants), A the norms' linear maps in turn, so a move along r reaches it as
    u = A r; W' = W - (W u) M v^T with v^T u = I (M = (v u^T)^-1) is blind to u exactly
    (W' u = 0) and leaves what it reads of the rest. v solves A^T v = r as far as the norms
    allow: r / g for an RMSNorm (the edit then equals W reading g * (x without r)), centred
    first behind a LayerNorm (which never shows the stream's mean), 0 where a gain is 0 (a
    dim the reader never sees: r . x can only be estimated from the others, and M restores
    v . u = 1; gemma-3-270m has such gains). Projecting orthogonally to normalize(g * r)
    instead would also remove whatever other directions share that axis after the gain,
    which with Gemma's gains (up to a few hundred) changes the model more than the ablation
    does."""
    q = r.double().unsqueeze(0) if r.ndim == 1 else r.double()  # [k, hidden], orthonormal
    u, v = q, q
    for gain in gains:
        u, v = gain.apply(u), gain.unapply(v)
    # u = R^T Q_u with Q_u orthonormal rows: W u^T = (W Q_u^T) R, so the write basis is R M v
    qu, rr = torch.linalg.qr(u.T)  # [hidden, k], [k, k]
    if (rr.diagonal().abs() <= EPS * max(1.0, u.norm().item())).any():
        raise AblationError("the norm gain removes the direction entirely (all-zero gain)")
    seen = v @ u.T  # [k, hidden] @ [hidden, k] -> [k, k]: I when no gain is 0
    if torch.linalg.svdvals(seen).min() < 1e-6 * max(1.0, seen.abs().max().item()):
        raise AblationError("the norm gain hides the direction from the reader (zero gains)")
    m = torch.linalg.inv(seen)  # [k, k]
    return torch.stack([qu.T, rr @ m @ v])  # [2, k, hidden]: [k, k] @ [k, k] @ [k, hidden]


def reader_projection(r: torch.Tensor, gamma: torch.Tensor, offset: float) -> torch.Tensor:
    """reader_pair behind one RMSNorm with gain offset + gamma."""
    return reader_pair(r, [Gain(gamma, offset)])


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
