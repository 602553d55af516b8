"""The edit kernels against dense reference formulas, on every hidden-axis layout."""

from __future__ import annotations

import pytest
import torch

from ablation import directions, edits
from ablation.edits import EditSpec

NP = EditSpec(scale=1.0, norm_preserving=True)
STD = EditSpec(scale=1.0, norm_preserving=False)


def unit(n: int, seed: int = 0) -> torch.Tensor:
    return torch.nn.functional.normalize(
        torch.randn(n, generator=torch.Generator().manual_seed(seed)), dim=0
    )


def reference_norm_preserving(w: torch.Tensor, r: torch.Tensor, s: float = 1.0) -> torch.Tensor:
    """The formula of DESIGN.md, written out for a writer [hidden, k], in float64."""
    w = w.double()
    r = r.double()
    norms = w.norm(dim=0, keepdim=True)  # [1, k]
    u = w / norms
    u = u - s * torch.outer(r, r @ u)  # [hidden] x ([hidden] @ [hidden, k] -> [k])
    u = u / u.norm(dim=0, keepdim=True)
    return norms * u


def test_norm_preserving_matches_dense_reference_float32():
    w = torch.randn(64, 96)
    r = unit(64)
    got = edits.project_out(w, r, 0, NP)
    want = reference_norm_preserving(w, r)
    assert torch.allclose(got.double().norm(dim=0), w.double().norm(dim=0), rtol=1e-5)
    assert torch.allclose(got.double(), want, atol=1e-5)
    assert (r.double() @ got.double()).abs().max() < 1e-5


def test_norm_preserving_matches_dense_reference_bf16():
    w = torch.randn(64, 96).bfloat16()
    r = unit(64)
    got = edits.project_out(w, r, 0, NP)
    assert got.dtype == torch.bfloat16 and got.shape == w.shape
    want = reference_norm_preserving(w.float(), r).bfloat16()
    # values agree to one bf16 rounding
    ulp = want.double().abs() * 2**-7
    assert ((got.double() - want.double()).abs() <= ulp + 1e-12).all()


def test_standard_is_rank_one_projection():
    w = torch.randn(40, 24, dtype=torch.float64)
    r = unit(40).double()
    got = edits.project_out(w, r, 0, EditSpec(1.0, False, torch.float64))
    want = w - torch.outer(r, r @ w)  # W - r (r^T W): [hidden] x [k]
    assert torch.allclose(got, want, atol=1e-12)


def test_partial_and_inverted_scale():
    w = torch.randn(40, 24, dtype=torch.float64)
    r = unit(40).double()
    half = edits.project_out(w, r, 0, EditSpec(0.5, False, torch.float64))
    assert torch.allclose(r @ half, 0.5 * (r @ w), atol=1e-12)
    inverted = edits.project_out(w, r, 0, EditSpec(-1.0, False, torch.float64))
    assert torch.allclose(r @ inverted, 2 * (r @ w), atol=1e-12)


@pytest.mark.parametrize(
    ("shape", "axis"),
    [
        ((32, 48), 0),
        ((48, 32), 1),
        ((32,), 0),
        ((4, 32, 16), 1),
        ((4, 16, 32), 2),
        ((4, 32), 1),
        ((5, 3, 32, 7), 2),
    ],
)
@pytest.mark.parametrize("spec", [NP, STD], ids=["norm-preserving", "standard"])
def test_every_layout_matches_moved_axis_reference(shape, axis, spec, monkeypatch):
    monkeypatch.setattr(edits, "CHUNK_ELEMENTS", 64)  # force many chunks
    w = torch.randn(*shape)
    r = unit(32, seed=3)
    got = edits.project_out(w, r, axis, spec)
    flat = w.movedim(axis, 0).reshape(32, -1)  # [hidden, k]: vectors as columns
    if spec.norm_preserving:
        want = reference_norm_preserving(flat, r).float()
    else:
        want = flat - torch.outer(r, r @ flat)
    want = want.reshape(w.movedim(axis, 0).shape).movedim(0, axis)
    assert torch.allclose(got, want, atol=1e-5)
    _, rel = edits.projection_residue(got, r, axis)
    assert rel < 1e-5


def test_square_tensor_axis_decides():
    """A square fused expert tensor: the two axes give different results, so the table's
    axis must be used; the other axis leaves r in the output."""
    w = torch.randn(2, 32, 32)
    r = unit(32)
    right = edits.project_out(w, r, 2, NP)
    wrong = edits.project_out(w, r, 1, NP)
    assert edits.projection_residue(right, r, 2)[1] < 1e-5
    assert edits.projection_residue(wrong, r, 2)[1] > 1e-2


def test_zero_vectors_stay_zero():
    w = torch.randn(16, 8)
    w[:, 3] = 0
    got = edits.project_out(w, unit(16), 0, NP)
    assert torch.equal(got[:, 3], torch.zeros(16))
    assert torch.isfinite(got).all()


def test_in_place_edit_does_not_allocate_a_copy():
    w = torch.randn(32, 64)
    before = w.clone()
    ptr = w.data_ptr()
    residue = edits.project_out_(w, unit(32), 0, NP)
    assert w.data_ptr() == ptr and not torch.equal(w, before)
    assert residue[1] < 1e-5
    assert residue[1] == pytest.approx(edits.projection_residue(w, unit(32), 0)[1], abs=1e-6)


def test_norm_direction_makes_residual_contribution_orthogonal():
    r = unit(32).double()
    gamma = torch.randn(32).double()
    d = directions.norm_direction(r, [directions.Gain(gamma, 1.0)]).double()
    w = edits.project_out(
        torch.randn(32, 20, dtype=torch.float64), d, 0, EditSpec(1.0, True, torch.float64)
    )
    y = w @ torch.randn(20, 5, dtype=torch.float64)  # [hidden, k] @ [k, tokens]
    contribution = (1 + gamma)[:, None] * y / y.pow(2).mean(0).sqrt()  # Gemma post-norm
    assert (r @ contribution).abs().max() < 1e-10
