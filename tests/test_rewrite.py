"""The executor's promises: nothing lost, nothing half-written, resumable, verifiable."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ALL_COMPONENTS, run_cli, tree_sha256
from safetensors.torch import load_file, save_file

from ablation import rewrite

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def model_dir(tmp_path, checkpoint) -> Path:
    """A deepseek_v3 checkpoint with what real repos carry beside the weights: tokenizer files,
    a chat template, custom code, a sub-folder, a model card, an extra multi-token-prediction
    layer at index num_hidden_layers, and an auxiliary shard outside the index."""
    d = tmp_path / "model"
    shutil.copytree(checkpoint("deepseek_v3"), d)
    (d / "tokenizer.json").write_text('{"version": "1.0"}')
    (d / "chat_template.jinja").write_text("{{ messages }}")
    (d / "modeling_custom.py").write_text("# custom code\n")
    (d / "README.md").write_text("---\nlicense: mit\n---\n# Base model\n")
    (d / "extras").mkdir()
    (d / "extras" / "notes.txt").write_text("keep me")
    mtp = {
        "model.layers.3.eh_proj.weight": torch.randn(32, 64),
        "model.layers.3.mlp.experts.0.down_proj.weight": torch.randn(32, 16),
    }
    save_file(mtp, d / "model-mtp.safetensors", metadata={"format": "pt"})
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"].update(dict.fromkeys(mtp, "model-mtp.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file({"x": torch.ones(3)}, d / "aux.safetensors")
    return d


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_output_is_complete_and_input_untouched(tmp_path, model_dir, job):
    orders = job(model_dir, components=ALL_COMPONENTS)
    before = tree_sha256(model_dir)
    res = run_cli("ablate", orders)
    assert res.exit_code == 0, res.output + res.stderr
    assert tree_sha256(model_dir) == before
    out = tmp_path / "out"
    for rel in (
        "tokenizer.json",
        "chat_template.jinja",
        "modeling_custom.py",
        "extras/notes.txt",
        "aux.safetensors",
        "model-mtp.safetensors",
        "model.safetensors.index.json",
        "config.json",
    ):
        assert sha(out / rel) == sha(model_dir / rel), rel
    assert sha(out / "README.base.md") == sha(model_dir / "README.md")
    assert not list(out.rglob("*.partial")) and not (out / rewrite.MANIFEST).exists()
    record = json.loads((out / "ablation.json").read_text())
    assert record["refuse"]["sha256"] == sha(tmp_path / "model.refuse")
    assert record["orders"]["method"] == "norm-preserving"
    assert not any("layers.3." in e["tensor"] for e in record["edits"])
    assert record["counts_by_layer"]["2"] == {
        "attn_out": 1,
        "expert_out": 4,
        "router": 1,
        "shared_expert_out": 1,
    }
    card = (out / "README.md").read_text()
    assert f"base_model: {model_dir}" not in card  # a local path is no Hub id
    assert "abliterated" in card and "| 2 | 1 | 1 | 0 |" in card
    assert run_cli("verify", out, "--orders", orders).exit_code == 0


def test_dry_run_writes_nothing(tmp_path, model_dir, job):
    orders = job(model_dir)
    res = run_cli("ablate", orders, "--dry-run")
    assert res.exit_code == 0
    assert "layer    2 attn_out 1, expert_out 4, router 1, shared_expert_out 1" in res.output
    assert "dry run: nothing written" in res.output
    assert not (tmp_path / "out").exists()


def test_link_hard_links_unedited_shards(tmp_path, model_dir, job):
    orders = job(model_dir, ablate=[{"layer": 2}])
    assert run_cli("ablate", orders, "--link").exit_code == 0
    out = tmp_path / "out"
    record = json.loads((out / "ablation.json").read_text())
    edited = {e["shard"] for e in record["edits"]}
    for shard in json.loads((model_dir / "model.safetensors.index.json").read_text())[
        "weight_map"
    ].values():
        same_inode = os.stat(out / shard).st_ino == os.stat(model_dir / shard).st_ino
        assert same_inode == (shard not in edited)
    assert run_cli("verify", out, "--orders", orders).exit_code == 0


def test_resume_after_interrupt(tmp_path, model_dir, job, monkeypatch):
    orders = job(model_dir, components=ALL_COMPONENTS)
    real_write = rewrite._write_shard
    calls = []

    def dying_write(*args, **kwargs):
        calls.append(1)
        result = real_write(*args, **kwargs)
        if len(calls) == 3:  # killed after writing, before fsync and rename
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(rewrite, "_write_shard", dying_write)
    res = run_cli("ablate", orders)
    assert res.exit_code != 0
    out = tmp_path / "out"
    manifest = json.loads((out / rewrite.MANIFEST).read_text())
    finals = {p.name for p in out.glob("*.safetensors")}
    assert finals == set(manifest["complete"])  # nothing under a final name is incomplete
    assert len(list(out.glob("*.partial"))) == 1
    done_inodes = {n: os.stat(out / n).st_ino for n in finals}

    assert run_cli("ablate", orders).exit_code == 2  # not empty: needs --resume
    monkeypatch.setattr(rewrite, "_write_shard", real_write)
    res = run_cli("ablate", orders, "--resume")
    assert res.exit_code == 0, res.output + res.stderr
    assert "already complete (resumed)" in res.output
    assert all(os.stat(out / n).st_ino == ino for n, ino in done_inodes.items())
    assert not list(out.glob("*.partial"))
    record = json.loads((out / "ablation.json").read_text())
    assert len(record["edits"]) == sum(record["counts_by_role"].values())
    assert run_cli("verify", out, "--orders", orders).exit_code == 0


def test_resume_refuses_other_orders(tmp_path, model_dir, job, monkeypatch):
    orders = job(model_dir)
    monkeypatch.setattr(
        rewrite, "_write_shard", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt)
    )
    run_cli("ablate", orders)
    monkeypatch.undo()
    orders.write_text(orders.read_text().replace("measurement: 1", "measurement: 2"))
    res = run_cli("ablate", orders, "--resume")
    assert res.exit_code == 2 and "written with other orders" in res.stderr


def test_overwrite_replaces_previous_output(tmp_path, model_dir, job):
    orders = job(model_dir, ablate=[{"layer": 1}])
    assert run_cli("ablate", orders).exit_code == 0
    orders.write_text(orders.read_text().replace("layer: 1", "layer: 2"))
    assert run_cli("ablate", orders, "--overwrite").exit_code == 0
    record = json.loads((tmp_path / "out" / "ablation.json").read_text())
    assert {e["layer"] for e in record["edits"]} == {2}
    assert run_cli("verify", tmp_path / "out", "--orders", orders).exit_code == 0


def test_verify_catches_tampering(tmp_path, model_dir, job):
    orders = job(model_dir, ablate=[{"layer": 2}])
    assert run_cli("ablate", orders).exit_code == 0
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    # an unplanned tensor changed
    name = "model.layers.0.mlp.up_proj.weight"
    tensors = load_file(out / index[name])
    tensors[name] = tensors[name] + 1
    save_file(tensors, out / index[name], metadata={"format": "pt"})
    res = run_cli("verify", out, "--orders", orders)
    assert res.exit_code == 1 and f"{name}: not planned for editing, but changed" in res.stderr
    # an edited tensor put back to its original
    name = "model.layers.2.self_attn.o_proj.weight"
    shutil.copy(model_dir / index[name], out / index[name])
    res = run_cli("verify", out, "--orders", orders)
    assert f"{name}: |v.r|/|v|" in res.stderr


def test_partial_scale_and_invert_verify(tmp_path, model_dir, job):
    orders = job(model_dir, ablate=[{"layer": 1, "scale": 0.5}, {"layer": 2}])
    assert run_cli("ablate", orders, "--invert").exit_code == 0
    record = json.loads((tmp_path / "out" / "ablation.json").read_text())
    assert {e["scale"] for e in record["edits"]} == {-0.5, -1.0}
    res = run_cli("verify", tmp_path / "out", "--orders", orders, "--invert")
    assert res.exit_code == 0, res.stderr


def test_scripts_end_to_end(tmp_path, model_dir, job):
    """The top-level script, as a user runs it: exit 0, then exit 2 with one line."""
    orders = job(model_dir)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ok = subprocess.run(
        [sys.executable, str(ROOT / "sharded_ablate.py"), str(orders), "-q"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert ok.returncode == 0, ok.stderr
    again = subprocess.run(
        [sys.executable, str(ROOT / "sharded_ablate.py"), str(orders)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert again.returncode == 2
    assert again.stderr.strip().count("\n") == 0 and again.stderr.startswith("error: output")
