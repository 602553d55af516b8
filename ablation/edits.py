"""The edit kernels: remove a direction from the hidden axis of any weight (pure tensor math).

A weight is seen as a stack of vectors along its hidden axis: the columns of a writer
[hidden, k], the rows of a router or embedding [n, hidden], each expert's slice of a fused 3D
tensor, a bias [hidden]. Vectors are independent, so a tensor is processed in chunks of vectors:
each chunk is widened to float32 (or float64), edited, and written back into the tensor in its
stored dtype. Memory beyond the tensor itself is one chunk, whatever the tensor's size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

TINY = 1e-30
CHUNK_ELEMENTS = 1 << 22  # 16 MiB of float32 per chunk


@dataclass(frozen=True)
class EditSpec:
    scale: float
    norm_preserving: bool
    compute_dtype: torch.dtype = torch.float32


def _chunks(w: torch.Tensor, axis: int) -> Iterator[tuple[torch.Tensor, int]]:
    """Views of w, each holding whole vectors, with the dim of the view that is hidden."""
    hidden = w.shape[axis]
    lead = 1
    for s in w.shape[:axis]:
        lead *= s
    trail = w.numel() // max(1, lead * hidden)
    x = w.reshape(lead, hidden, trail)  # a view: w is contiguous
    per = max(1, CHUNK_ELEMENTS // max(1, hidden))
    if trail == 1:  # hidden is the last axis: vectors are rows
        rows = x.reshape(lead, hidden)
        for i in range(0, lead, per):
            yield rows[i : i + per], 1
        return
    for panel in x:  # [hidden, trail]: vectors are columns
        for j in range(0, trail, per):
            yield panel[:, j : j + per], 0


def project_out_(
    w: torch.Tensor, d: torch.Tensor, axis: int, spec: EditSpec
) -> tuple[float, float]:
    """In place: v' = v - s (v.d) d for every vector v along `axis`; with norm preservation
    v' is then rescaled to |v|. The new norm is known without another pass,
    |v - s c d|^2 = |v|^2 - (2s - s^2) c^2 with c = v.d and |d| = 1, so each chunk is read once,
    updated by one rank-1 step and one scaling, and written back. Returns the residue
    (max |v'.d|, max |v'.d| / |v'|) of the values as stored, after the cast back."""
    if not w.is_contiguous():
        raise ValueError("project_out_ needs a contiguous tensor")
    d = d.to(device=w.device, dtype=spec.compute_dtype)
    worst = torch.zeros(2, dtype=spec.compute_dtype, device=w.device)  # no device sync per chunk
    for view, hd in _chunks(w, axis):
        x = view.to(spec.compute_dtype, copy=True)  # [n, hidden] (hd=1) or [hidden, n] (hd=0)
        # [n, hidden] @ [hidden] -> [n]  or  [hidden] @ [hidden, n] -> [n]
        coef = x @ d if hd == 1 else d @ x
        sq = (x * x).sum(dim=hd)  # [n]; faster than x.square() or a strided vector_norm
        new_sq = (sq - (2 * spec.scale - spec.scale**2) * coef.square()).clamp_min(0)
        if hd == 1:
            x.addr_(coef, d, alpha=-spec.scale)  # x -= s * coef ⊗ d
        else:
            x.addr_(d, coef, alpha=-spec.scale)  # x -= s * d ⊗ coef
        if spec.norm_preserving:
            factor = torch.where(new_sq > TINY, (sq / new_sq.clamp_min(TINY)).sqrt(), 0.0)
            x.mul_(factor.unsqueeze(hd))
            new_sq = sq
        view.copy_(x)
        # what is left along d in the stored values, relative to the (known) new norms
        stored = view.to(spec.compute_dtype)
        left = (stored @ d if hd == 1 else d @ stored).abs()  # -> [n]
        if left.numel():
            # a vector (nearly) parallel to d has (almost) nothing left: no relative residue
            floor = (1e-3 * sq.sqrt()).clamp_min(TINY)
            rel = left / torch.maximum(new_sq.sqrt(), floor)
            worst = torch.maximum(worst, torch.stack([left.max(), rel.max()]))
    worst_abs, worst_rel = worst.tolist()
    return worst_abs, worst_rel


def _residue(view: torch.Tensor, d: torch.Tensor, hd: int) -> tuple[float, float]:
    if view.numel() == 0:
        return 0.0, 0.0
    x = view.to(d.dtype)
    coef = (x @ d if hd == 1 else d @ x).abs()  # -> [n]
    norms = (x * x).sum(dim=hd).sqrt()  # a strided vector_norm is several times slower
    return coef.max().item(), (coef / norms.clamp_min(TINY)).max().item()


def project_out(w: torch.Tensor, d: torch.Tensor, axis: int, spec: EditSpec) -> torch.Tensor:
    """Out-of-place project_out_ (for tests and small tensors)."""
    out = w.clone().contiguous()
    project_out_(out, d, axis, spec)
    return out


def projection_residue(w: torch.Tensor, d: torch.Tensor, axis: int) -> tuple[float, float]:
    """(max |v.d|, max |v.d| / |v|) over the vectors of w: how much of d is left."""
    d = d.double().to(w.device)
    worst_abs = worst_rel = 0.0
    for view, hd in _chunks(w.contiguous(), axis):
        a, r = _residue(view, d, hd)
        worst_abs, worst_rel = max(worst_abs, a), max(worst_rel, r)
    return worst_abs, worst_rel


def norm_change(before: torch.Tensor, after: torch.Tensor, axis: int) -> float:
    """Largest relative change of a vector's norm (0 for exact norm preservation); zero
    vectors are skipped."""
    worst = 0.0
    pairs = zip(_chunks(before.contiguous(), axis), _chunks(after.contiguous(), axis), strict=True)
    for (vb, hd), (va, _) in pairs:
        nb = (vb.double() ** 2).sum(dim=hd).sqrt()
        na = (va.double().to(nb.device) ** 2).sum(dim=hd).sqrt()
        keep = nb > 0
        if keep.any():
            worst = max(worst, ((na - nb).abs()[keep] / nb[keep]).max().item())
    return worst
