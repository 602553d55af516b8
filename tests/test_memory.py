"""Peak memory of a rewrite is bounded by the largest edited tensor, not by shard or model size.

Builds a Llama-shaped bf16 checkpoint with 1 GB shards (about 1.7 GB in all), rewrites it in a
child process, and samples that process's RSS with psutil (and takes its own ru_maxrss report).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from conftest import write_orders, write_refuse
from safetensors.torch import save_file

HIDDEN, INTER, LAYERS = 4096, 14336, 4
SHARD_BYTES = 1 << 30


def build_big_checkpoint(root: Path) -> tuple[Path, int]:
    """Returns the directory and the size in bytes of the largest edited tensor."""
    shapes = {"embed_tokens.weight": (512, HIDDEN)}
    for i in range(LAYERS):
        p = f"layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
            p + "self_attn.k_proj.weight": (1024, HIDDEN),
            p + "self_attn.v_proj.weight": (1024, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (INTER, HIDDEN),
            p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER),
            p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
        }
    shapes["norm.weight"] = (HIDDEN,)
    root.mkdir()
    gen = torch.Generator().manual_seed(0)
    shards: list[dict[str, tuple]] = [{}]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * torch.Size(shape).numel()
        if size + nbytes > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1]["model." + name] = shape
        size += nbytes
    weight_map = {}
    for i, group in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: torch.randn(s, generator=gen, dtype=torch.bfloat16) for n, s in group.items()}
        save_file(tensors, root / fname, metadata={"format": "pt"})
        del tensors
        weight_map.update(dict.fromkeys(group, fname))
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    (root / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "hidden_size": HIDDEN,
                "intermediate_size": INTER,
                "num_hidden_layers": LAYERS,
                "tie_word_embeddings": False,
            }
        )
    )
    return root, 2 * HIDDEN * INTER


def test_peak_rss_bounded_by_largest_tensor(tmp_path):
    model_dir, largest = build_big_checkpoint(tmp_path / "big")
    write_refuse(tmp_path / "big.refuse", LAYERS, hidden=HIDDEN)
    orders = write_orders(
        tmp_path / "orders.yaml",
        model=str(model_dir),
        measurements=str(tmp_path / "big.refuse"),
        output=str(tmp_path / "out"),
        ablate=[{"layers": f"0-{LAYERS - 1}"}],
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "ablation", "ablate", str(orders), "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    watched = psutil.Process(proc.pid)
    sampled = 0
    while proc.poll() is None:
        try:
            sampled = max(sampled, watched.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.005)
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    value, unit = re.search(r"peak RSS ([\d.]+) (MB|GB)", out).groups()
    reported = int(float(value) * {"MB": 1e6, "GB": 1e9}[unit])
    peak = max(sampled, reported)
    budget = 4 * largest + 400 * 2**20
    print(
        f"\npeak RSS {peak / 2**20:.0f} MiB (sampled {sampled / 2**20:.0f}, reported "
        f"{reported / 2**20:.0f}); largest edited tensor {largest / 2**20:.0f} MiB; "
        f"budget {budget / 2**20:.0f} MiB; checkpoint "
        f"{sum(p.stat().st_size for p in model_dir.iterdir()) / 2**30:.2f} GiB"
    )
    assert peak < budget
