from __future__ import annotations

import pytest
import torch
from conftest import make_measurements
from safetensors.torch import save_file

from ablation import refuse
from ablation.errors import AblationError


def test_round_trip(tmp_path):
    meas = make_measurements(4, 16)
    meas.layers[2].extra["harmful_proj"] = torch.randn(7)
    path = tmp_path / "m.refuse"
    refuse.save(path, meas)
    back = refuse.load(path)
    assert sorted(back.layers) == [0, 1, 2, 3]
    assert back.metadata["format"] == "refuse" and back.metadata["format_version"] == "1"
    assert back.metadata["model"] == "test"
    for layer, m in meas.layers.items():
        for kind in refuse.REQUIRED:
            assert torch.equal(getattr(back.layers[layer], kind), getattr(m, kind))
    assert torch.equal(back.layers[2].extra["harmful_proj"], meas.layers[2].extra["harmful_proj"])


def test_legacy_torch_save_dict(tmp_path):
    meas = make_measurements(3, 16)
    legacy = {"layers": 3}
    for layer, m in meas.layers.items():
        for kind in refuse.REQUIRED:
            legacy[f"{kind}_{layer}"] = getattr(m, kind)
    path = tmp_path / "old.refuse"
    torch.save(legacy, path)
    back = refuse.load(path)
    assert sorted(back.layers) == [0, 1, 2]
    assert torch.equal(back.layers[1].refusenorm, meas.layers[1].refusenorm)


class Payload:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_legacy_reader_never_unpickles_objects(tmp_path):
    path = tmp_path / "evil.refuse"
    torch.save({"layers": 1, "x": Payload()}, path)
    with pytest.raises(AblationError, match=r"neither a \.refuse"):
        refuse.load(path)


def test_other_safetensors_file_is_rejected(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"a": torch.zeros(2)}, path)
    with pytest.raises(AblationError, match=r"not a \.refuse file"):
        refuse.load(path)


def test_missing_part_of_a_layer(tmp_path):
    path = tmp_path / "m.refuse"
    save_file(
        {"harmful_0": torch.zeros(4), "harmless_0": torch.zeros(4)},
        path,
        metadata={"format": "refuse", "format_version": "1"},
    )
    with pytest.raises(AblationError, match="layer 0 lacks refuse, refusenorm"):
        refuse.load(path)
