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


def project_out_(w: torch.Tensor, d: torch.Tensor, axis: int, spec: EditSpec) -> torch.Tensor:
    """In place: v' = v - s (v.d) d for every vector v along `axis`. With norm preservation
    each unit vector is projected, renormalized, and scaled back to |v| (twice when s == 1,
    which clears the float residue that the first pass leaves)."""
    if not w.is_contiguous():
        raise ValueError("project_out_ needs a contiguous tensor")
    d = d.to(device=w.device, dtype=spec.compute_dtype)
    passes = 2 if spec.scale == 1.0 else 1
    for view, hd in _chunks(w, axis):
        v = view.movedim(hd, -1).to(spec.compute_dtype, copy=True)  # [n, hidden]
        if spec.norm_preserving:
            norms = torch.linalg.vector_norm(v, dim=-1, keepdim=True)  # [n, 1]
            v.div_(norms.clamp_min(TINY))
            for _ in range(passes):
                coef = v @ d  # [n, hidden] @ [hidden] -> [n]
                v.addr_(coef, d, alpha=-spec.scale)  # v -= s * coef ⊗ d
                v.div_(torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(TINY))
            v.mul_(norms)
        else:
            coef = v @ d  # [n, hidden] @ [hidden] -> [n]
            v.addr_(coef, d, alpha=-spec.scale)
        view.copy_(v.movedim(-1, hd))
    return w


def project_out(w: torch.Tensor, d: torch.Tensor, axis: int, spec: EditSpec) -> torch.Tensor:
    """Out-of-place project_out_ (for tests and small tensors)."""
    return project_out_(w.clone().contiguous(), d, axis, spec)


def projection_residue(w: torch.Tensor, d: torch.Tensor, axis: int) -> tuple[float, float]:
    """(max |v.d|, max |v.d| / |v|) over the vectors of w: how much of d is left."""
    d = d.double().to(w.device)
    worst_abs = worst_rel = 0.0
    for view, hd in _chunks(w.contiguous(), axis):
        v = view.movedim(hd, -1).double()  # [n, hidden]
        coef = (v @ d).abs()  # [n, hidden] @ [hidden] -> [n]
        rel = coef / torch.linalg.vector_norm(v, dim=-1).clamp_min(TINY)
        if coef.numel():
            worst_abs = max(worst_abs, coef.max().item())
            worst_rel = max(worst_rel, rel.max().item())
    return worst_abs, worst_rel


def norm_change(before: torch.Tensor, after: torch.Tensor, axis: int) -> float:
    """Largest relative change of a vector's norm (0 for exact norm preservation); zero
    vectors are skipped."""
    worst = 0.0
    pairs = zip(_chunks(before.contiguous(), axis), _chunks(after.contiguous(), axis), strict=True)
    for (vb, hd), (va, _) in pairs:
        nb = torch.linalg.vector_norm(vb.movedim(hd, -1).double(), dim=-1)
        na = torch.linalg.vector_norm(va.movedim(hd, -1).double().to(nb.device), dim=-1)
        keep = nb > 0
        if keep.any():
            worst = max(worst, ((na - nb).abs()[keep] / nb[keep]).max().item())
    return worst
