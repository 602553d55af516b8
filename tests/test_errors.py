"""Every bad input: one line on stderr naming the culprit, exit code 2, inputs untouched,
nothing written."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from conftest import expect_error, make_measurements, write_refuse
from safetensors.torch import load_file, save_file

from ablation import refuse


@pytest.fixture
def setup(tmp_path, checkpoint):
    """A private copy of a tiny MoE checkpoint (shared experts, dense first layer)."""

    def make(family: str = "deepseek_v3") -> Path:
        model_dir = tmp_path / "model"
        shutil.copytree(checkpoint(family), model_dir)
        return model_dir

    return make


def edit_checkpoint(model_dir: Path, fn) -> None:
    """Rewrite every shard through fn(tensors) -> tensors, keeping the index consistent."""
    index_path = model_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    weight_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors = fn(load_file(model_dir / shard))
        save_file(tensors, model_dir / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
    index["weight_map"] = weight_map
    index_path.write_text(json.dumps(index))


def shard_of(model_dir: Path, tensor: str) -> Path:
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    return model_dir / index["weight_map"][tensor]


L2 = [{"layer": 1}, {"layer": 2}]


def test_unknown_key(tmp_path, setup, job):
    orders = job(setup(), ablate=[{"layer": 1, "scael": 1.0}])
    expect_error(tmp_path, orders, "orders.yaml:6: ablate.0.scael: unknown key")


def test_duplicate_layer(tmp_path, setup, job):
    orders = job(setup(), ablate=[{"layers": "0-2"}, {"layer": 1}])
    expect_error(tmp_path, orders, "layer 1 is ordered twice")


def test_out_of_range_layer(tmp_path, setup, job):
    orders = job(setup(), ablate=[{"layer": 1}, {"layer": 3}])
    expect_error(
        tmp_path, orders, "orders.yaml:6: layer 3 is out of range (the model has layers 0-2)"
    )


def test_missing_measurement(tmp_path, setup, job):
    orders = job(setup(), ablate=[{"layer": 1, "measurement": 40}])
    expect_error(tmp_path, orders, "measurement 40 is not in the .refuse file")


def test_hidden_size_mismatch(tmp_path, setup, job):
    write_refuse(tmp_path / "model.refuse", 3, hidden=16)
    orders = job(setup(), ablate=L2)
    expect_error(tmp_path, orders, "hidden size 16 does not match the model's 32")


def test_zero_direction(tmp_path, setup, job):
    meas = make_measurements(3, 32)
    meas.layers[1].refusenorm = torch.zeros(32)
    refuse.save(tmp_path / "model.refuse", meas)
    orders = job(setup(), ablate=L2, projected=False)
    expect_error(tmp_path, orders, "orders.yaml:5: direction for layer 1 is zero or not finite")


def test_non_finite_direction(tmp_path, setup, job):
    meas = make_measurements(3, 32)
    meas.layers[2].refusenorm[3] = float("inf")
    refuse.save(tmp_path / "model.refuse", meas)
    orders = job(setup(), ablate=L2)
    expect_error(tmp_path, orders, "direction for layer 2 is zero or not finite")


def test_corrupt_header(tmp_path, setup, job):
    model_dir = setup()
    shard = shard_of(model_dir, "model.layers.1.self_attn.o_proj.weight")
    data = bytearray(shard.read_bytes())
    data[8:20] = b"\x00garbage!!\xff\xfe"
    shard.write_bytes(bytes(data))
    expect_error(tmp_path, job(model_dir, ablate=L2), f"{shard}: header is not valid JSON")


def test_truncated_shard(tmp_path, setup, job):
    model_dir = setup()
    shard = shard_of(model_dir, "model.layers.1.self_attn.o_proj.weight")
    shard.write_bytes(shard.read_bytes()[:-100])
    expect_error(tmp_path, job(model_dir, ablate=L2), "(truncated shard)")


def test_header_length_past_end(tmp_path, setup, job):
    model_dir = setup()
    shard = shard_of(model_dir, "model.layers.1.self_attn.o_proj.weight")
    data = shard.read_bytes()
    shard.write_bytes(struct.pack("<Q", len(data) * 2) + data[8:])
    expect_error(tmp_path, job(model_dir, ablate=L2), "does not fit in a")


def test_offsets_disagree_with_shape(tmp_path, setup, job):
    model_dir = setup()
    shard = shard_of(model_dir, "model.layers.1.self_attn.o_proj.weight")
    data = shard.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    header["model.layers.1.self_attn.o_proj.weight"]["shape"] = [32, 31]
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    shard.write_bytes(data[:8] + raw + data[8 + n :])
    expect_error(
        tmp_path,
        job(model_dir, ablate=L2),
        "'model.layers.1.self_attn.o_proj.weight' spans 4096 bytes but F32[32, 31] needs 3968",
    )


def test_missing_shard(tmp_path, setup, job):
    model_dir = setup()
    shard = shard_of(model_dir, "model.layers.2.self_attn.o_proj.weight")
    shard.unlink()
    expect_error(tmp_path, job(model_dir, ablate=L2), f"shard {shard.name!r} is missing")


def test_missing_expert(tmp_path, setup, job):
    model_dir = setup()
    edit_checkpoint(
        model_dir,
        lambda t: {
            k: v for k, v in t.items() if k != "model.layers.2.mlp.experts.3.down_proj.weight"
        },
    )
    expect_error(tmp_path, job(model_dir, ablate=L2), "layer 2: 3 of 4 experts found (missing [3])")


def test_layer_that_matches_nothing_lists_what_it_holds(tmp_path, setup, job):
    model_dir = setup()
    edit_checkpoint(
        model_dir, lambda t: {k.replace("layers.1.mlp.", "layers.1.ffn."): v for k, v in t.items()}
    )
    expect_error(
        tmp_path,
        job(model_dir, ablate=L2),
        "layer 1: no mlp_out or expert_out tensor found with the deepseek table; the "
        "layer holds: model.layers.1.ffn.experts.0.down_proj.weight",
    )


def test_float8_with_block_scales(tmp_path, setup, job):
    model_dir = setup()

    def quantize(t):
        name = "model.layers.1.self_attn.o_proj.weight"
        if name in t:
            t[name] = t[name].to(torch.float8_e4m3fn)
            t[name + "_scale_inv"] = torch.ones(1, 1)
        return t

    edit_checkpoint(model_dir, quantize)
    expect_error(
        tmp_path,
        job(model_dir, ablate=L2),
        "tensor 'model.layers.1.self_attn.o_proj.weight' is stored quantized "
        "(float8 with block scales",
    )


def test_mxfp4_experts(tmp_path, setup, job):
    model_dir = setup("gpt_oss")

    def to_mxfp4(t):
        name = "model.layers.1.mlp.experts.down_proj"
        if name in t:
            del t[name]
            t[name + "_blocks"] = torch.zeros(4, 32, 3, 16, dtype=torch.uint8)
            t[name + "_scales"] = torch.zeros(4, 32, 3, dtype=torch.uint8)
        return t

    edit_checkpoint(model_dir, to_mxfp4)
    expect_error(
        tmp_path,
        job(model_dir, ablate=L2),
        "tensor 'model.layers.1.mlp.experts.down_proj' is stored quantized (MXFP4",
    )


def test_integer_weight(tmp_path, setup, job):
    model_dir = setup("llama")

    def to_int8(t):
        name = "model.layers.1.mlp.down_proj.weight"
        if name in t:
            t[name] = t[name].to(torch.int8)
        return t

    edit_checkpoint(model_dir, to_int8)
    expect_error(
        tmp_path,
        job(model_dir, ablate=L2),
        "tensor 'model.layers.1.mlp.down_proj.weight' is I8, not a float weight",
    )


def test_model_not_found(tmp_path, job, setup):
    orders = job(setup(), ablate=L2)
    expect_error(
        tmp_path,
        orders,
        "is neither a local directory nor a Hub repo id",
        "--model",
        str(tmp_path / "nope" / "x" / "y"),
    )


def test_measurements_not_found(tmp_path, setup, job):
    orders = job(setup(), ablate=L2)
    expect_error(
        tmp_path,
        orders,
        "measurements file not found",
        "--measurements",
        str(tmp_path / "missing.refuse"),
    )


def test_not_a_checkpoint(tmp_path, setup, job):
    model_dir = setup()
    orders = job(model_dir, ablate=L2)
    (model_dir / "config.json").unlink()
    expect_error(tmp_path, orders, "no config.json")


def test_output_not_empty(tmp_path, setup, job):
    orders = job(setup(), ablate=L2)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    expect_error(tmp_path, orders, "is not empty (use --overwrite")


def test_output_inside_input(tmp_path, setup, job):
    model_dir = setup()
    orders = job(model_dir, ablate=L2, output=str(model_dir / "abliterated"))
    expect_error(tmp_path, orders, "overlaps the input")


def test_resume_without_manifest(tmp_path, setup, job):
    orders = job(setup(), ablate=L2)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    expect_error(
        tmp_path, orders, "has neither .ablation-progress.json nor ablation.json", "--resume"
    )


def test_not_enough_disk(tmp_path, setup, job, monkeypatch):
    import shutil as sh

    monkeypatch.setattr(sh, "disk_usage", lambda _p: sh._ntuple_diskusage(1, 1, 1))
    expect_error(tmp_path, job(setup(), ablate=L2), "only 1 byte free")


def test_cached_models_are_built_once_by_concurrent_callers(tmp_path):
    """Two processes asking for the same cached model: one builds, the other waits for it
    (before, both built into one temporary folder and the second rename failed)."""
    import threading
    import time

    from ablation import demo_model

    built: list[str] = []

    def make(tmp):
        built.append(threading.current_thread().name)
        time.sleep(0.3)
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")

    target = tmp_path / "model"
    threads = [
        threading.Thread(target=demo_model._built_once, args=(target, make), name=f"t{i}")
        for i in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(built) == 1 and (target / "config.json").exists()
    assert not target.with_name("model.partial").exists()
