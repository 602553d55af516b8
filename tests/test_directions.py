from __future__ import annotations

import pytest
import torch

from ablation import directions
from ablation.errors import AblationError


def test_biproject_is_unit_and_orthogonal_to_harmless():
    g = torch.Generator().manual_seed(0)
    harmless = torch.randn(256, generator=g) * 50  # large means, as real activations have
    refuse = torch.randn(256, generator=g) + 0.3 * harmless
    r = directions.biproject(refuse, harmless)
    assert abs(r.norm().item() - 1) < 1e-6
    assert abs((r.double() @ torch.nn.functional.normalize(harmless.double(), dim=0)).item()) < 1e-6


def test_refusal_raw_and_unit():
    harmless = torch.tensor([3.0, 0.0, 0.0, 0.0])
    harmful = torch.tensor([4.0, 2.0, 0.0, 0.0])
    raw, unit = directions.refusal(harmful, harmless, projected=True)
    assert raw.dtype == torch.float64 and raw.tolist() == [1.0, 2.0, 0.0, 0.0]
    assert torch.allclose(unit, torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    _, plain = directions.refusal(harmful, harmless, projected=False)
    assert torch.allclose(plain, raw / raw.norm())


def test_sparsify_keeps_largest_and_renormalizes():
    v = torch.tensor([0.1, -3.0, 0.2, 2.0])
    out = directions.sparsify(v, 0.5)
    assert out[0] == 0 and out[2] == 0
    assert abs(out.norm().item() - 1) < 1e-6
    assert directions.sparsify(v, 0.0) is v


@pytest.mark.parametrize("bad", [torch.zeros(8), torch.full((8,), float("nan"))])
def test_zero_or_non_finite_direction_is_an_error(bad):
    with pytest.raises(AblationError, match="zero or not finite"):
        directions.target_direction(bad, None, 0.0, "orders.yaml:3: layer 2")


def test_target_direction_reprojects_against_target_harmless():
    g = torch.Generator().manual_seed(1)
    r = torch.nn.functional.normalize(torch.randn(64, generator=g), dim=0)
    harmless_t = torch.randn(64, generator=g)
    d = directions.target_direction(r, harmless_t, 0.0, "x")
    assert abs(d.double() @ torch.nn.functional.normalize(harmless_t.double(), dim=0)) < 1e-6
    assert directions.target_direction(r, None, 0.0, "x").allclose(r.double())


def test_refusal_of_identical_means_is_zero_not_noise():
    m = torch.randn(16) * 100
    raw, unit = directions.refusal(m, m.clone())
    assert not raw.any() and not unit.any()
    _, unit = directions.refusal(m + 1e-9, m)
    assert not unit.any()
