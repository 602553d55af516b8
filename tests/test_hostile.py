"""Inputs from strangers and runs on shared machines: shard names that leave the directory, a
Hugging Face cache of symlinks, two runs on one output, a run killed with its lock held, a disk
that fills up in the middle, --resume of a finished output."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ALL_COMPONENTS, assert_one_error, expect_error, run_cli, tree_sha256

from ablation import lock, rewrite
from ablation.system import human_bytes

ROOT = Path(__file__).resolve().parents[1]
INDEX = "model.safetensors.index.json"


@pytest.fixture
def model_dir(tmp_path, checkpoint) -> Path:
    d = tmp_path / "model"
    shutil.copytree(checkpoint("deepseek_v3"), d)
    (d / "tokenizer.json").write_text('{"version": "1.0"}')
    (d / "README.md").write_text("---\nlicense: mit\n---\n# Base\n")
    return d


def weight_map(model_dir: Path) -> dict[str, str]:
    return json.loads((model_dir / INDEX).read_text())["weight_map"]


def remap(model_dir: Path, shard: str, new_name: str) -> None:
    """Point every tensor of `shard` at `new_name` in the index."""
    index = json.loads((model_dir / INDEX).read_text())
    index["weight_map"] = {t: new_name if s == shard else s for t, s in index["weight_map"].items()}
    (model_dir / INDEX).write_text(json.dumps(index))


def edited_shard(model_dir: Path) -> str:
    """The largest shard, which holds edited tensors under ALL_COMPONENTS."""
    return max(set(weight_map(model_dir).values()), key=lambda s: (model_dir / s).stat().st_size)


# ---------------------------------------------------------------- shard names in the index


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "subdir"])
def test_index_cannot_point_outside(tmp_path, model_dir, job, kind):
    """The shard really exists at the named place outside the model: reading it would work,
    so only the name check stops the run (and nothing is read or written outside)."""
    shard = edited_shard(model_dir)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(model_dir / shard, outside / shard)
    name = {
        "dotdot": f"../outside/{shard}",
        "absolute": str(outside / shard),
        "subdir": f"sub/{shard}",
    }[kind]
    if kind == "subdir":
        (model_dir / "sub").mkdir()
        shutil.copy(outside / shard, model_dir / "sub" / shard)
    remap(model_dir, shard, name)
    orders = job(model_dir, components=ALL_COMPONENTS)
    expect_error(tmp_path, orders, "is not a plain file name inside the checkpoint directory")
    expect_error(tmp_path, orders, f"{name!r}", "--dry-run")


@pytest.mark.parametrize("bad", [None, 3, ["a"], "", ".", "..", "a\\b", "x\0y"])
def test_index_shard_name_of_any_shape(tmp_path, model_dir, job, bad):
    index = json.loads((model_dir / INDEX).read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = bad
    (model_dir / INDEX).write_text(json.dumps(index))
    expect_error(tmp_path, job(model_dir), "is not a plain file name")


@pytest.mark.parametrize("body", ['{"weight_map": []}', "[1, 2]", '{"weight_map"', "\xff\xfe"])
def test_index_of_any_shape(tmp_path, model_dir, job, body):
    (model_dir / INDEX).write_bytes(body.encode("latin-1"))
    expect_error(tmp_path, job(model_dir), INDEX)


def test_verify_and_evaluate_check_the_output_index(tmp_path, model_dir, job):
    orders = job(model_dir, components=ALL_COMPONENTS)
    assert run_cli("ablate", orders).exit_code == 0
    out = tmp_path / "out"
    shard = edited_shard(out)
    remap(out, shard, f"../model/{shard}")  # would compare the input with itself
    (out / shard).unlink()
    assert_one_error(run_cli("verify", out, "--orders", orders), "is not a plain file name")
    res = run_cli("evaluate", "--base", model_dir, "--ablated", out, "--max-prompts", "2")
    assert_one_error(res, "is not a plain file name")
    assert not (out / "eval.json").exists()


def test_record_and_manifest_names_are_checked(tmp_path, model_dir, job, monkeypatch):
    orders = job(model_dir, components=ALL_COMPONENTS)
    assert run_cli("ablate", orders).exit_code == 0
    out = tmp_path / "out"
    record = json.loads((out / "ablation.json").read_text())
    record["edits"][0]["shard"] = "../../etc/passwd"
    (out / "ablation.json").write_text(json.dumps(record))
    expect_error(tmp_path, orders, "edits.0.shard", "--resume")
    res = run_cli("evaluate", "--base", model_dir, "--ablated", out, "--max-prompts", "2")
    assert_one_error(res, "edits.0.shard")
    (out / "ablation.json").write_text("[]")
    expect_error(
        tmp_path, orders, "ablation.json: the ablation record is not a JSON object", "--resume"
    )

    shutil.rmtree(out)
    monkeypatch.setattr(
        rewrite, "_write_shard", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt)
    )
    run_cli("ablate", orders)
    monkeypatch.undo()
    manifest = json.loads((out / rewrite.MANIFEST).read_text())
    manifest["complete"]["/etc/passwd"] = 1
    (out / rewrite.MANIFEST).write_text(json.dumps(manifest))
    expect_error(tmp_path, orders, "complete: '/etc/passwd' is not a plain file name", "--resume")
    (out / rewrite.MANIFEST).write_text("{not json")
    expect_error(tmp_path, orders, "the progress manifest is not valid JSON", "--resume")


# ---------------------------------------------------------------- a Hugging Face cache layout


def as_hub_cache(src: Path, cache: Path, repo: str = "models--org--tiny") -> Path:
    """The layout huggingface_hub writes: snapshots/<rev>/<file> -> ../../blobs/<sha256>."""
    blobs, snap = cache / repo / "blobs", cache / repo / "snapshots" / ("0" * 40)
    blobs.mkdir(parents=True)
    for p in sorted(src.rglob("*")):
        if p.is_file():
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
            if not (blobs / digest).exists():
                shutil.copy(p, blobs / digest)
            link = snap / p.relative_to(src)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blobs / digest, link.parent))
    return snap


def test_hub_cache_layout_in_and_out(tmp_path, model_dir, job):
    snap = as_hub_cache(model_dir, tmp_path / "hub")
    blobs = tmp_path / "hub" / "models--org--tiny" / "blobs"
    blob_hashes = tree_sha256(blobs)
    orders = job(snap, components=ALL_COMPONENTS)
    res = run_cli("ablate", orders, "--link")
    assert res.exit_code == 0, res.output + res.stderr
    out = tmp_path / "out"
    assert run_cli("verify", out, "--orders", orders).exit_code == 0
    assert tree_sha256(blobs) == blob_hashes  # the cache is read, never written
    edited = {e["shard"] for e in json.loads((out / "ablation.json").read_text())["edits"]}
    for shard in weight_map(snap).values():
        assert not (out / shard).is_symlink()
        blob_inode = os.stat(snap / shard).st_ino  # through the link: the blob
        assert (os.stat(out / shard).st_ino == blob_inode) == (shard not in edited)
    assert (out / "tokenizer.json").read_text() == '{"version": "1.0"}'

    # the output itself moved into a cache layout (as a download of it would be) still verifies
    out_snap = as_hub_cache(out, tmp_path / "hub2")
    assert run_cli("verify", out_snap, "--orders", orders).exit_code == 0
    # and --overwrite into a directory of symlinks replaces the links, never writes through
    orders2 = job(snap, components=ALL_COMPONENTS, output=str(out_snap))
    out_blobs = tree_sha256(tmp_path / "hub2")
    res = run_cli("ablate", orders2, "--overwrite")
    assert res.exit_code == 0, res.output + res.stderr
    written = {p.name for p in out_snap.iterdir() if not p.is_symlink()}
    assert {"ablation.json", "README.md", *weight_map(snap).values()} <= written
    blobs_after = tree_sha256(tmp_path / "hub2" / "models--org--tiny" / "blobs")
    assert all(out_blobs["models--org--tiny/blobs/" + k] == v for k, v in blobs_after.items())


# ---------------------------------------------------------------- one writer per output


def test_second_run_on_the_same_output_stops(tmp_path, model_dir, job, monkeypatch):
    """Two processes: while this run writes its first shard, a second one (with --overwrite)
    starts on the same output and must stop at once, naming this one; this run finishes."""
    orders = job(model_dir, components=ALL_COMPONENTS)
    real = rewrite._write_shard
    seen: list[subprocess.CompletedProcess] = []

    def with_intruder(*args, **kwargs):
        if not seen:
            seen.append(
                subprocess.run(
                    [sys.executable, str(ROOT / "sharded_ablate.py"), str(orders), "--overwrite"],
                    capture_output=True,
                    text=True,
                    env={**os.environ, "PYTHONPATH": str(ROOT)},
                    timeout=300,
                )
            )
        return real(*args, **kwargs)

    monkeypatch.setattr(rewrite, "_write_shard", with_intruder)
    res = run_cli("ablate", orders)
    assert res.exit_code == 0, res.output + res.stderr
    (second,) = seen
    assert second.returncode == 2, second.stderr
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in second.stderr, second.stderr
    assert "is being written by another run" in errors[0]
    assert f"pid {os.getpid()} on " in errors[0]
    assert not (tmp_path / "out" / lock.LOCK).exists()
    assert run_cli("verify", tmp_path / "out", "--orders", orders).exit_code == 0


KILLER = """
import os, signal, sys
from ablation import rewrite
from ablation.cli import main
real, calls = rewrite._write_shard, []
def dying(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # no finally, no atexit: the lock file stays
    return real(*args, **kwargs)
rewrite._write_shard = dying
main(["ablate", sys.argv[1], "-q"])
"""


def test_killed_run_leaves_a_stale_lock_that_resume_takes_over(tmp_path, model_dir, job):
    orders = job(model_dir, components=ALL_COMPONENTS)
    out = tmp_path / "out"
    assert run_cli("ablate", orders).exit_code == 0
    reference = tree_sha256(out)
    shutil.rmtree(out)

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, str(orders)], env=env, capture_output=True, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    owner = json.loads((out / lock.LOCK).read_text())
    assert owner["pid"] != os.getpid()
    res = run_cli("ablate", orders, "--resume")
    assert res.exit_code == 0, res.output + res.stderr
    assert f"taking over the lock of a run that no longer holds it (pid {owner['pid']}" in (
        res.stderr
    )
    assert tree_sha256(out) == reference  # lock gone, every byte as an uninterrupted run's


# ---------------------------------------------------------------- disk full in the middle


@pytest.fixture
def disk_fills(monkeypatch):
    """fill(name, at): writes into NAME.partial past byte `at` fail with ENOSPC, as a full disk
    does (a short write, then the error), whether they come from copy_file_range or pwrite."""
    real_range, real_pwrite = os.copy_file_range, os.pwrite
    state: dict = {}

    def target(fd: int) -> bool:
        try:
            return os.readlink(f"/proc/self/fd/{fd}").endswith(state["name"] + rewrite.PARTIAL)
        except OSError:
            return False

    def room(fd: int, offset: int, count: int) -> int:
        if not target(fd) or offset + count <= state["at"]:
            return count
        if offset >= state["at"]:
            state["hits"] += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return state["at"] - offset

    def copy_file_range(src, dst, count, offset_src=None, offset_dst=None):
        return real_range(src, dst, room(dst, offset_dst, count), offset_src, offset_dst)

    def pwrite(fd, data, offset):
        n = room(fd, offset, len(data))
        return real_pwrite(fd, memoryview(data)[:n], offset)

    def fill(name: str, at: int) -> dict:
        state.update(name=name, at=at, hits=0)
        monkeypatch.setattr(os, "copy_file_range", copy_file_range)
        monkeypatch.setattr(os, "pwrite", pwrite)
        return state

    return fill


@pytest.mark.parametrize("where", [0.1, 0.5, 0.9])
def test_disk_full_mid_shard_then_resume(tmp_path, model_dir, job, disk_fills, monkeypatch, where):
    orders = job(model_dir, components=ALL_COMPONENTS)
    out = tmp_path / "out"
    assert run_cli("ablate", orders).exit_code == 0
    reference = tree_sha256(out)
    shutil.rmtree(out)

    shard = edited_shard(model_dir)
    state = disk_fills(shard, int(where * (model_dir / shard).stat().st_size))
    res = run_cli("ablate", orders)
    assert state["hits"] >= 1
    assert_one_error(res, "No space left on device")
    assert "free some space, then run the same command with --resume" in res.stderr
    manifest = json.loads((out / rewrite.MANIFEST).read_text())
    finals = {p.name for p in out.glob("*.safetensors")}
    assert finals == set(manifest["complete"]) and shard not in finals  # the manifest is true
    assert not list(out.glob("*" + rewrite.PARTIAL))  # the cut shard is gone, not left half
    assert not (out / lock.LOCK).exists()

    monkeypatch.undo()
    res = run_cli("ablate", orders, "--resume")
    assert res.exit_code == 0, res.output + res.stderr
    assert tree_sha256(out) == reference


# ---------------------------------------------------------------- --resume of a finished run


def test_resume_of_a_complete_output(tmp_path, model_dir, job):
    orders = job(model_dir, components=ALL_COMPONENTS)
    out = tmp_path / "out"
    assert run_cli("ablate", orders).exit_code == 0
    before = tree_sha256(out)
    inodes = {p: p.stat().st_ino for p in out.iterdir()}
    res = run_cli("ablate", orders, "--resume")
    assert res.exit_code == 0, res.output + res.stderr
    assert "already holds these orders' rewrite" in res.output
    assert tree_sha256(out) == before
    assert {p: p.stat().st_ino for p in out.iterdir()} == inodes

    (out / "tokenizer.json").unlink()
    expect_error(tmp_path, orders, "tokenizer.json is missing or altered", "--resume")
    shutil.copy(model_dir / "tokenizer.json", out / "tokenizer.json")

    orders.write_text(orders.read_text().replace("measurement: 1", "measurement: 2"))
    expect_error(tmp_path, orders, "is a complete output of other orders", "--resume")

    record = json.loads((out / "ablation.json").read_text())
    del record["fingerprint"]
    (out / "ablation.json").write_text(json.dumps(record))
    expect_error(tmp_path, orders, "a version of this tool that did not record", "--resume")


def test_lock_file_is_never_written_through(tmp_path, model_dir, job):
    orders = job(model_dir)
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    (out / lock.LOCK).symlink_to(victim)
    expect_error(tmp_path, orders, "cannot create its lock file", "--overwrite")
    assert victim.read_text() == "mine"


def test_sizes_in_human_units():
    assert [human_bytes(n) for n in (0, 1, 999, 1000, 12_345, 540e6, 1.75e9, 2.5e12)] == [
        "0 bytes",
        "1 byte",
        "999 bytes",
        "1.00 KB",
        "12.3 KB",
        "540 MB",
        "1.75 GB",
        "2.50 TB",
    ]
