#!/usr/bin/env python3
"""Write a synthetic DeepSeek-style MoE checkpoint of about SIZE GB, with a matching .refuse
file and orders, for benchmarking the rewriter.

Layout (bf16, names as on disk for DeepSeek-V3): layer 0 dense, then MoE layers with per-expert
gate/up/down projections, a router, a shared expert and attention; shards of --shard-gb, written
one shard at a time (memory: one shard). About a third of the bytes are edited by the orders
(every expert's down_proj, shared experts, routers, attention output, dense down_proj).

With --fp8 the layout is DeepSeek-V3's release: every projection float8_e4m3fn with a float32
weight_scale_inv of 128x128 blocks beside it, router, norms and embeddings bf16, and a
multi-token-prediction layer at index num_hidden_layers (eh_proj, enorm, hnorm and a MoE block),
as in the real index.

usage: python bench/make_synthetic_moe.py OUT_DIR --size-gb 8 [--shard-gb 2] [--fp8]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ablation import directions, quant, refuse

HIDDEN, INTER, MOE_INTER, EXPERTS, VOCAB, KV = 2048, 5632, 768, 64, 32000, 512


def layer_shapes(layer: int) -> dict[str, tuple[int, ...]]:
    p = f"model.layers.{layer}."
    shapes = {
        p + "input_layernorm.weight": (HIDDEN,),
        p + "post_attention_layernorm.weight": (HIDDEN,),
        p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
        p + "self_attn.k_proj.weight": (KV, HIDDEN),
        p + "self_attn.v_proj.weight": (KV, HIDDEN),
        p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
    }
    if layer == 0:
        shapes |= {
            p + "mlp.gate_proj.weight": (INTER, HIDDEN),
            p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER),
        }
        return shapes
    for e in range(EXPERTS):
        q = f"{p}mlp.experts.{e}."
        shapes |= {
            q + "gate_proj.weight": (MOE_INTER, HIDDEN),
            q + "up_proj.weight": (MOE_INTER, HIDDEN),
            q + "down_proj.weight": (HIDDEN, MOE_INTER),
        }
    shapes |= {
        p + "mlp.gate.weight": (EXPERTS, HIDDEN),
        p + "mlp.shared_experts.gate_proj.weight": (MOE_INTER, HIDDEN),
        p + "mlp.shared_experts.up_proj.weight": (MOE_INTER, HIDDEN),
        p + "mlp.shared_experts.down_proj.weight": (HIDDEN, MOE_INTER),
    }
    return shapes


BLOCK = (128, 128)


def is_fp8(name: str) -> bool:
    return name.endswith("_proj.weight")


def nbytes(shape: tuple[int, ...], name: str = "", fp8: bool = False) -> int:
    n = torch.Size(shape).numel()
    if fp8 and is_fp8(name):  # float8 bytes + the float32 block scales
        return n + 4 * -(-shape[0] // BLOCK[0]) * -(-shape[1] // BLOCK[1])
    return 2 * n


def mtp_shapes(layer: int) -> dict[str, tuple[int, ...]]:
    """DeepSeek-V3's multi-token-prediction layer: a MoE layer plus its own projections."""
    p = f"model.layers.{layer}."
    return layer_shapes(layer) | {
        p + "eh_proj.weight": (HIDDEN, 2 * HIDDEN),
        p + "enorm.weight": (HIDDEN,),
        p + "hnorm.weight": (HIDDEN,),
        p + "shared_head.norm.weight": (HIDDEN,),
    }


def plan(size_gb: float, fp8: bool = False) -> tuple[int, dict[str, tuple[int, ...]]]:
    shapes = {
        "model.embed_tokens.weight": (VOCAB, HIDDEN),
        "lm_head.weight": (VOCAB, HIDDEN),
        "model.norm.weight": (HIDDEN,),
    }
    layers = 0
    while sum(nbytes(s, n, fp8) for n, s in shapes.items()) < size_gb * 1e9:
        shapes |= layer_shapes(layers)
        layers += 1
    if fp8:
        shapes |= mtp_shapes(layers)
    return layers, shapes


def tensors_for(name: str, shape: tuple[int, ...], gen, fp8: bool) -> dict[str, torch.Tensor]:
    w = torch.randn(shape, generator=gen) * 0.02
    if not (fp8 and is_fp8(name)):
        return {name: w.bfloat16()}
    grid = torch.zeros(-(-shape[0] // BLOCK[0]), -(-shape[1] // BLOCK[1]))
    q, s = quant.quantize(w, grid, BLOCK)
    return {name: q, name.removesuffix(".weight") + ".weight_scale_inv": s}


def write(out: Path, size_gb: float, shard_gb: float, seed: int = 0, fp8: bool = False) -> dict:
    layers, shapes = plan(size_gb, fp8)
    out.mkdir(parents=True, exist_ok=False)
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        if size + nbytes(shape, name, fp8) > shard_gb * 1e9 and groups[-1]:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes(shape, name, fp8)
    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    for i, names in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for n in names:
            tensors |= tensors_for(n, shapes[n], gen, fp8)
        save_file(tensors, out / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
        del tensors
    total = sum(nbytes(s, n, fp8) for n, s in shapes.items())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    (out / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["DeepseekV3ForCausalLM"],
                "model_type": "deepseek_v3",
                "hidden_size": HIDDEN,
                "intermediate_size": INTER,
                "moe_intermediate_size": MOE_INTER,
                "n_routed_experts": EXPERTS,
                "n_shared_experts": 1,
                "num_experts_per_tok": 8,
                "first_k_dense_replace": 1,
                "num_hidden_layers": layers,
                "vocab_size": VOCAB,
                "tie_word_embeddings": False,
                "torch_dtype": "bfloat16",
                "num_nextn_predict_layers": 1 if fp8 else 0,
                **(
                    {
                        "quantization_config": {
                            "quant_method": "fp8",
                            "fmt": "e4m3",
                            "activation_scheme": "dynamic",
                            "weight_block_size": list(BLOCK),
                        }
                    }
                    if fp8
                    else {}
                ),
            },
            indent=2,
        )
    )
    return {"layers": layers, "bytes": total, "shards": len(groups)}


def write_refuse(path: Path, layers: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    per = {}
    for layer in range(layers):
        harmless = torch.randn(HIDDEN, generator=g)
        harmful = harmless + 0.5 * torch.randn(HIDDEN, generator=g)
        raw, unit = directions.refusal(harmful, harmless)
        per[layer] = refuse.LayerMeasurement(harmful, harmless, raw.float(), unit.float())
    refuse.save(path, refuse.Measurements(per, {"model": "synthetic-moe"}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--size-gb", type=float, default=8.0)
    ap.add_argument("--shard-gb", type=float, default=2.0)
    ap.add_argument("--fp8", action="store_true", help="DeepSeek-V3's float8 release layout.")
    args = ap.parse_args()
    info = write(args.out, args.size_gb, args.shard_gb, fp8=args.fp8)
    write_refuse(args.out.with_suffix(".refuse"), info["layers"])
    orders = {
        "model": str(args.out),
        "measurements": str(args.out.with_suffix(".refuse")),
        "output": str(args.out) + "-abliterated",
        "ablate": [{"layers": f"0-{info['layers'] - 1}"}],
    }
    args.out.with_suffix(".yaml").write_text(yaml.safe_dump(orders, sort_keys=False))
    print(json.dumps({**info, "orders": str(args.out.with_suffix(".yaml"))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
