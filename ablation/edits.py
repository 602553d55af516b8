"""The edit kernels: remove a direction from the hidden axis of any weight (pure tensor math).

A weight is seen as a stack of vectors along its hidden axis: the columns of a writer
[hidden, k], the rows of a router or embedding [n, hidden], each expert's slice of a fused 3D
tensor, a bias [hidden]. Vectors are independent, so a tensor is processed in chunks of vectors:
each chunk is widened to float32 (or float64), edited, and written back into the tensor in its
stored dtype. Memory beyond the tensor itself is one chunk, whatever the tensor's size.
"""

from __future__ import annotations

import math
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
    rows: float = 1.0  # sparse surgery: edit only this fraction of the vectors (largest |v.d|)


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


def as_basis(d: torch.Tensor) -> torch.Tensor:
    """The read basis of an edit, always as [k, hidden]: a direction [hidden], an orthonormal
    basis [k, hidden], or the first half of a (read, write) pair [2, k, hidden]."""
    if d.ndim == 3:
        return d[0]
    return d.unsqueeze(0) if d.ndim == 1 else d


def _pair(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(read basis [k, hidden], write basis [k, hidden] or None when it is the read basis)."""
    return (d[0], d[1]) if d.ndim == 3 else (as_basis(d), None)


def _coef(x: torch.Tensor, q: torch.Tensor, hd: int) -> torch.Tensor:
    """Coordinates of every vector of a chunk in the basis: [n, k]."""
    if q.shape[0] == 1:  # a gemv, the common case
        # [n, hidden] @ [hidden] -> [n]   or   [hidden] @ [hidden, n] -> [n]
        return (x @ q[0] if hd == 1 else q[0] @ x).unsqueeze(1)
    # [n, hidden] @ [hidden, k] -> [n, k]   or   [n, hidden] (x^T) @ [hidden, k] -> [n, k]
    return x @ q.T if hd == 1 else x.T @ q.T


def _selected_rows(w: torch.Tensor, q: torch.Tensor, axis: int, spec: EditSpec) -> torch.Tensor:
    """Sparse surgery: a mask over all vectors of w (in _chunks order) that keeps the
    ceil(rows * n) vectors with the largest |Q v|; one extra read pass, no extra tensor copy."""
    mags = [
        _coef(view.to(spec.compute_dtype), q, hd).square().sum(dim=1)
        for view, hd in _chunks(w, axis)
    ]
    allm = torch.cat(mags) if mags else torch.zeros(0, device=w.device)  # [n]
    keep = math.ceil(spec.rows * allm.numel())
    mask = torch.zeros(allm.numel(), dtype=torch.bool, device=w.device)
    mask[allm.topk(keep).indices] = True
    return mask


def project_out_(
    w: torch.Tensor, d: torch.Tensor, axis: int, spec: EditSpec
) -> tuple[float, float]:
    """In place: v' = v - s Q^T Q v for every vector v along `axis`, Q = d as [k, hidden] with
    orthonormal rows (k = 1: v' = v - s (v.d) d); with norm preservation v' is then rescaled to
    |v|. The new norm is known without another pass, |v - s Q^T c|^2 = |v|^2 - (2s - s^2)|c|^2
    with c = Q v, so each chunk is read once, updated by one rank-k step and one scaling, and
    written back. A (read, write) pair d [2, k, hidden] (directions.reader_projection) gives
    the oblique v' = v - s P^T Q v instead: a reader's exact input-side edit, which keeps no
    norms. With spec.rows < 1 only the vectors with the largest |Q v| are edited; the others
    keep their exact bytes (c = 0 for them: no change, factor exactly 1). Returns the residue
    (max |Q v'|, max |Q v'| / |v'|) of the values as stored, after the cast back."""
    if not w.is_contiguous():
        raise ValueError("project_out_ needs a contiguous tensor")
    read, write = _pair(d)
    oblique = write is not None
    if oblique and spec.norm_preserving:
        raise ValueError("an oblique (reader) edit cannot preserve norms")
    q = read.to(device=w.device, dtype=spec.compute_dtype)  # [k, hidden]
    p = write.to(device=w.device, dtype=spec.compute_dtype) if oblique else q  # [k, hidden]
    mask = _selected_rows(w, q, axis, spec) if spec.rows < 1.0 else None
    seen = 0
    worst = torch.zeros(2, dtype=spec.compute_dtype, device=w.device)  # no device sync per chunk
    for view, hd in _chunks(w, axis):
        x = view.to(spec.compute_dtype, copy=True)  # [n, hidden] (hd=1) or [hidden, n] (hd=0)
        coef = _coef(x, q, hd)  # [n, k]
        if mask is not None:
            coef = coef * mask[seen : seen + coef.shape[0]].unsqueeze(1)
        seen += coef.shape[0]
        sq = (x * x).sum(dim=hd)  # [n]; faster than x.square() or a strided vector_norm
        new_sq = (sq - (2 * spec.scale - spec.scale**2) * coef.square().sum(dim=1)).clamp_min(0)
        if p.shape[0] == 1:  # rank 1: an outer-product update, the common case
            if hd == 1:
                x.addr_(coef[:, 0], p[0], alpha=-spec.scale)  # x -= s * coef ⊗ p
            else:
                x.addr_(p[0], coef[:, 0], alpha=-spec.scale)  # x -= s * p ⊗ coef
        elif hd == 1:
            x.addmm_(coef, p, alpha=-spec.scale)  # [n, hidden] -= s [n, k] @ [k, hidden]
        else:
            x.addmm_(p.T, coef.T, alpha=-spec.scale)  # [hidden, n] -= s [hidden, k] @ [k, n]
        if spec.norm_preserving:
            factor = torch.where(new_sq > TINY, (sq / new_sq.clamp_min(TINY)).sqrt(), 0.0)
            x.mul_(factor.unsqueeze(hd))
            new_sq = sq
        elif oblique:  # the analytic norm holds for orthogonal projections only
            new_sq = (x * x).sum(dim=hd)
        view.copy_(x)
        # what is left along Q in the stored values, relative to the (known) new norms
        left = _coef(view.to(spec.compute_dtype), q, hd).square().sum(dim=1).sqrt()  # [n]
        if mask is not None:
            keep = mask[seen - coef.shape[0] : seen]
            left, sq, new_sq = left[keep], sq[keep], new_sq[keep]
        if left.numel():
            # a vector (nearly) inside span(Q) has (almost) nothing left: no relative residue
            floor = (1e-3 * sq.sqrt()).clamp_min(TINY)
            rel = left / torch.maximum(new_sq.sqrt(), floor)
            worst = torch.maximum(worst, torch.stack([left.max(), rel.max()]))
    worst_abs, worst_rel = worst.tolist()
    return worst_abs, worst_rel


def _residue(view: torch.Tensor, d: torch.Tensor, hd: int) -> tuple[float, float]:
    if view.numel() == 0:
        return 0.0, 0.0
    x = view.to(d.dtype)
    coef = _coef(x, as_basis(d), hd).square().sum(dim=1).sqrt()  # [n]: |Q v|
    norms = (x * x).sum(dim=hd).sqrt()  # a strided vector_norm is several times slower
    return coef.max().item(), (coef / norms.clamp_min(TINY)).max().item()


def project_out(w: torch.Tensor, d: torch.Tensor, axis: int, spec: EditSpec) -> torch.Tensor:
    """Out-of-place project_out_ (for tests and small tensors)."""
    out = w.clone().contiguous()
    project_out_(out, d, axis, spec)
    return out


def projection_residue(w: torch.Tensor, d: torch.Tensor, axis: int) -> tuple[float, float]:
    """(max |Q v|, max |Q v| / |v|) over the vectors of w: how much of d (a direction or an
    orthonormal basis [k, hidden]) is left."""
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
