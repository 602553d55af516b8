#!/usr/bin/env python3
"""Benchmark: the streaming rewriter against the copy floor and a whole-shard baseline.

For each size (synthetic DeepSeek-style MoE checkpoints, bench/make_synthetic_moe.py, about a
third of the bytes edited), three runs on the same checkpoint and orders, each in its own
process, with the page cache dropped before each (when permitted) and the interpreter's own
files warmed:
  floor     cp -r of the checkpoint directory, then sync
  baseline  load_file each shard, edit with the same kernels, save_file, then sync
  ablation  sharded_ablate.py (fsyncs every shard itself)
Reports wall time, peak RSS (psutil, sampled every 5 ms), GB written, GB/s and the ratio to the
floor; writes bench/results.json and bench/results.png.

With --fp8 the checkpoints are in DeepSeek-V3's float8 layout (128x128 block scales, an MTP
layer): floor and ablation only (the baseline has no float8 codec), and the residue per role
that requantization leaves, from ablation.json; written to results_fp8.json / .png.

usage: python bench/rewrite.py [--sizes 2 4 8] [--dir /tmp/ablation-bench] [--fp8]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def drop_caches() -> bool:
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(cmd: list[str]) -> tuple[float, int]:
    """Wall time and peak RSS of a command (its whole process tree), sampled every 5 ms."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree))
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.005)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{cmd[:3]} failed: {proc.stderr.read()[-2000:]}")
    return seconds, peak


def baseline(orders_path: str, out: str) -> None:
    """The whole-shard way: every shard loaded whole, edited with the same kernels, saved."""
    from safetensors.torch import load_file, save_file

    from ablation import edits, orders
    from ablation.rewrite import build_plan

    o = orders.load(Path(orders_path))
    plan = build_plan(o, Path(o.model), o.measurements)
    dst = Path(out)
    dst.mkdir(parents=True)
    for shard, todo in plan.shards.items():
        tensors = load_file(str(plan.model_dir / shard))
        for e in todo:
            w = tensors[e.target.name].contiguous()
            spec = edits.EditSpec(e.scale, e.norm_preserving)
            edits.project_out_(w, plan.directions[e.direction], e.target.hidden_axis, spec)
            tensors[e.target.name] = w
        save_file(tensors, str(dst / shard), metadata={"format": "pt"})
        del tensors
    for p in plan.model_dir.iterdir():
        if p.is_file() and p.name not in plan.shards:
            shutil.copyfile(p, dst / p.name)
    subprocess.run(["sync"], check=True)


def run_size(size: float, work: Path, fp8: bool = False) -> dict:
    src = work / f"moe{'-fp8' if fp8 else ''}-{size:g}gb"
    if not (src / "config.json").exists():
        shutil.rmtree(src, ignore_errors=True)
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "bench" / "make_synthetic_moe.py"),
                str(src),
                "--size-gb",
                str(size),
                *(["--fp8"] if fp8 else []),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    orders_path = src.with_suffix(".yaml")
    total = sum(p.stat().st_size for p in src.iterdir())
    runs = {
        "floor": ["bash", "-c", f"cp -r {src} {work}/out && sync"],
        "baseline": [
            sys.executable,
            __file__,
            "--child-baseline",
            str(orders_path),
            str(work / "out"),
        ],
        "ablation": [
            sys.executable,
            str(ROOT / "sharded_ablate.py"),
            str(orders_path),
            "-q",
            "--output",
            str(work / "out"),
        ],
    }
    if fp8:
        del runs["baseline"]
    row: dict = {"size_gb": total / 1e9, "runs": {}}
    edited = None
    for name, cmd in runs.items():
        shutil.rmtree(work / "out", ignore_errors=True)
        row["cache_dropped"] = drop_caches()
        subprocess.run(
            [sys.executable, "-c", "import torch, safetensors, ablation.cli"], check=True, cwd=ROOT
        )  # the interpreter's files, not the checkpoint's
        seconds, peak = timed(cmd)
        row["runs"][name] = {
            "seconds": seconds,
            "peak_rss_mib": peak / 2**20,
            "gb_written": total / 1e9,
            "gb_per_s": total / 1e9 / seconds,
        }
        if name == "ablation":
            record = json.loads((work / "out" / "ablation.json").read_text())
            sizes = {e["tensor"]: e for e in record["edits"]}
            edited = len(sizes)
            from ablation.checkpoint import open_index

            index = open_index(src)
            row["edited_bytes"] = sum(index.tensors[t].nbytes for t in sizes)
            row["largest_edited_mib"] = max(index.tensors[t].nbytes for t in sizes) / 2**20
            if "quantized" in record:
                row["residue_by_role"] = record["quantized"]["residue_by_role"]
    shutil.rmtree(work / "out", ignore_errors=True)
    floor = row["runs"]["floor"]["seconds"]
    for r in row["runs"].values():
        r["ratio_to_floor"] = r["seconds"] / floor
    row["edited_tensors"] = edited
    row["edited_fraction"] = row["edited_bytes"] / total
    return row


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    x = [r["size_gb"] for r in rows]
    for name in [n for n in ("floor", "baseline", "ablation") if n in rows[0]["runs"]]:
        a.plot(x, [r["runs"][name]["seconds"] for r in rows], marker="o", label=name)
        b.plot(x, [r["runs"][name]["peak_rss_mib"] for r in rows], marker="o", label=name)
    a.set(xlabel="checkpoint (GB)", ylabel="wall time (s)", title="time")
    b.set(xlabel="checkpoint (GB)", ylabel="peak RSS (MiB)", title="memory")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[2, 4, 8])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/ablation-bench"))
    ap.add_argument("--keep", action="store_true", help="Keep the synthetic checkpoints.")
    ap.add_argument("--child-baseline", nargs=2, metavar=("ORDERS", "OUT"))
    ap.add_argument("--fp8", action="store_true", help="Float8 checkpoints (DeepSeek-V3 layout).")
    args = ap.parse_args()
    if args.child_baseline:
        baseline(*args.child_baseline)
        return 0
    args.dir.mkdir(parents=True, exist_ok=True)
    rows = []
    print(
        f"{'size':>6} {'edited':>7} {'method':>9} {'time s':>7} {'GB/s':>6} {'x floor':>7} "
        f"{'peak RSS MiB':>12}"
    )
    for size in args.sizes:
        row = run_size(size, args.dir, args.fp8)
        rows.append(row)
        for name, r in row["runs"].items():
            print(
                f"{row['size_gb']:6.2f} {row['edited_fraction']:7.0%} {name:>9} "
                f"{r['seconds']:7.1f} {r['gb_per_s']:6.2f} {r['ratio_to_floor']:7.2f} "
                f"{r['peak_rss_mib']:12.0f}",
                flush=True,
            )
        for role, r in row.get("residue_by_role", {}).items():
            print(
                f"{'':6} residue {role:>18}: stored {r['stored']:.1e}, bf16 {r['bf16']:.1e}, "
                f"round-to-nearest {r['rtn']:.1e}",
                flush=True,
            )
        if not args.keep:
            shutil.rmtree(
                args.dir / f"moe{'-fp8' if args.fp8 else ''}-{size:g}gb", ignore_errors=True
            )
    stem = "results_fp8" if args.fp8 else "results"
    out = Path(__file__).with_name(stem + ".json")
    out.write_text(
        json.dumps(
            {
                "machine": f"{os.cpu_count()} CPU cores, "
                f"{psutil.virtual_memory().total / 2**30:.0f} GiB, no GPU",
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    chart(rows, Path(__file__).with_name(stem + ".png"))
    print(f"written {out} and {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
