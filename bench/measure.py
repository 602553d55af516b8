#!/usr/bin/env python3
"""Benchmark: `ablation measure` against the common generate()-based measurement.

Both run on gemma-3-270m (bf16, built from the PyPI GGUF package), on the same prompts (the
first N/2 built-in harmful and harmless measure prompts), each in its own process, which reports
its wall time and peak RSS (VmHWM). The baseline is what earlier abliteration scripts do: one
prompt at a time, model.generate(max_new_tokens=1, output_hidden_states=True), and the last
prompt token's state of every layer.

usage: python bench/measure.py [--prompts 128] [--batch-size 32] [--out bench/results_measure.json]

--streamed: a model bigger than the memory the run may use. A synthetic Llama-shaped float32
checkpoint of --size-gb (random weights, written once to --dir) is measured one decoder layer
at a time (`--stream-layers`) in a process capped by a cgroup at --cap-gb (the checkpoint is
at least 4x the cap); each run starts with the page cache dropped. In the same run: the time to
read the checkpoint from disk, the in-memory compute time of the same prompts (uncapped
process), and accelerate's disk offload (device_map="auto", the layers that do not fit in
--cap-gb offloaded to a folder) on the same model and prompts.

usage: python bench/measure.py --streamed [--size-gb 6] [--cap-gb 1.5] [--prompts 32]
       [--dir /tmp/ablation-bench-stream] [--out bench/results_stream.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(mode: str, n: int, batch_size: int) -> dict:
    import torch
    import transformers

    from ablation import activations, demo_model, prompts
    from ablation.system import peak_rss

    path = demo_model.cached(torch.bfloat16)
    texts = prompts.builtin("harmful")[: n // 2] + prompts.builtin("harmless")[: n - n // 2]
    start = time.perf_counter()
    if mode == "ablation":
        model, tok = activations.load_model(str(path), "bfloat16")
        loaded = time.perf_counter()
        ids, _ = activations.encode(tok, texts)
        got = activations.collect(model, ids, tok.pad_token_id, batch_size)
        layers = got.sums.shape[0]
    else:  # as the common scripts do it: keep every generate() output, read states afterwards
        tok = transformers.AutoTokenizer.from_pretrained(path)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        loaded = time.perf_counter()
        outputs = []
        for text in texts:
            ids = tok.apply_chat_template(
                [{"role": "user", "content": text}],
                add_generation_prompt=True,
                return_tensors="pt",
                return_dict=True,
            )
            outputs.append(
                model.generate(
                    **ids,
                    use_cache=False,
                    max_new_tokens=1,
                    do_sample=False,
                    output_hidden_states=True,
                    return_dict_in_generate=True,
                )
            )
        states = [torch.stack([h[0, -1] for h in o.hidden_states[0][:-1]]) for o in outputs]
        layers = len(states[0])
    end = time.perf_counter()
    return {
        "mode": mode,
        "prompts": n,
        "layers": layers,
        "load_s": loaded - start,
        "measure_s": end - loaded,
        "prompts_per_s": n / (end - loaded),
        "peak_rss_mib": peak_rss() / 2**20,
    }


# ------------------------------------------------- streamed: a model bigger than memory

HIDDEN, INTER, HEADS, KV_HEADS, VOCAB = 2048, 5632, 16, 8, 8192


def write_model(out: Path, size_gb: float) -> dict:
    """A Llama-shaped float32 checkpoint of about size_gb, one shard per two layers."""
    import torch
    import transformers
    from safetensors.torch import save_file

    head = HIDDEN // HEADS
    shapes = {
        "input_layernorm.weight": (HIDDEN,),
        "post_attention_layernorm.weight": (HIDDEN,),
        "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
        "self_attn.k_proj.weight": (KV_HEADS * head, HIDDEN),
        "self_attn.v_proj.weight": (KV_HEADS * head, HIDDEN),
        "self_attn.o_proj.weight": (HIDDEN, HEADS * head),
        "mlp.gate_proj.weight": (INTER, HIDDEN),
        "mlp.up_proj.weight": (INTER, HIDDEN),
        "mlp.down_proj.weight": (HIDDEN, INTER),
    }
    per_layer = sum(math.prod(sh) for sh in shapes.values()) * 4
    outer = 2 * VOCAB * HIDDEN * 4
    layers = max(2, round((size_gb * 1e9 - outer) / per_layer))
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        dtype="float32",
    )
    done = out / "config.json"
    if done.exists() and json.loads(done.read_text()).get("num_hidden_layers") == layers:
        return {"layers": layers, "layer_bytes": per_layer}
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)

    def rand(shape):
        if len(shape) == 1:
            return 1 + 0.1 * torch.randn(shape, generator=gen)
        return torch.randn(shape, generator=gen) / shape[1] ** 0.5

    weight_map = {}
    groups = [[("model.embed_tokens.weight", (VOCAB, HIDDEN))]]
    for layer in range(layers):
        if layer % 2 == 0:
            groups.append([])
        groups[-1] += [(f"model.layers.{layer}.{n}", sh) for n, sh in shapes.items()]
    groups.append([("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))])
    for k, group in enumerate(groups):
        shard = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: rand(sh) for n, sh in group}, out / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys((n for n, _ in group), shard))
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    config.save_pretrained(out)  # last: marks the model complete
    return {"layers": layers, "layer_bytes": per_layer}


def prompt_ids(n: int) -> list[list[list[int]]]:
    """Two sets of n/2 token sequences of 16-48 tokens (the lengths of chat prompts)."""
    import torch

    gen = torch.Generator().manual_seed(1)
    sets = []
    for _ in range(2):
        lens = torch.randint(16, 49, (n // 2,), generator=gen).tolist()
        sets.append([torch.randint(3, VOCAB, (k,), generator=gen).tolist() for k in lens])
    return sets


def stream_child(mode: str, model: Path, n: int, batch_size: int, cap: float) -> dict:
    import torch
    import transformers  # imported before the clock starts, in every mode

    from ablation import activations, stream
    from ablation.checkpoint import open_index
    from ablation.system import peak_rss

    torch.set_grad_enabled(False)
    config = transformers.AutoConfig.from_pretrained(model)  # the modeling code's imports too
    transformers.AutoModelForCausalLM._model_mapping[type(config)]
    sets = prompt_ids(n)
    row: dict = {"mode": mode}
    start = time.perf_counter()
    if mode == "read":  # the checkpoint's bytes from disk, as fast as one reader goes
        total = 0
        for shard in sorted(
            set(open_index(model).tensors[t].shard for t in open_index(model).tensors)
        ):
            with open(model / shard, "rb", buffering=0) as f:
                while chunk := f.read(64 << 20):
                    total += len(chunk)
        row["bytes"] = total
    elif mode == "stream":
        streamer = stream.Streamer(model, "float32", "cpu")
        got = stream.collect(streamer, sets, 0, batch_size)
        streamer.close()
        st = streamer.stats
        row.update(
            bytes_read=st.bytes_read,
            reader_s=st.read_seconds,
            waited_s=st.wait_seconds,
            compute_s=st.compute_seconds,
            largest_layer=st.largest_layer,
            states_bytes=sum(g.states.numel() * 4 for g in got),
        )
    elif mode == "memory":
        m = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        loaded = time.perf_counter()
        for s in sets:
            activations.collect(m, s, 0, batch_size)
        row["load_s"] = loaded - start
        start = loaded
    else:  # accelerate's disk offload: what fits in the cap stays in RAM, the rest on disk
        import tempfile

        with tempfile.TemporaryDirectory(dir=model.parent) as folder:
            m = transformers.AutoModelForCausalLM.from_pretrained(
                model,
                dtype=torch.float32,
                device_map="auto",
                max_memory={"cpu": int(cap * 0.5 * 2**30)},
                offload_folder=folder,
            ).eval()
            loaded = time.perf_counter()
            for s in sets:
                activations.collect(m, s, 0, batch_size)
            row["load_s"] = loaded - start
            start = loaded
    row["wall_s"] = time.perf_counter() - start
    row["peak_rss"] = peak_rss()
    return row


def run_capped(cmd: list[str], cap_bytes: int | None) -> tuple[dict | None, str]:
    """Run a child, in a fresh memory cgroup limited to cap_bytes when given (and allowed)."""
    group = Path(f"/sys/fs/cgroup/memory/ablation-bench-{os.getpid()}")
    pre = None
    if cap_bytes:
        try:
            group.mkdir(exist_ok=True)
            (group / "memory.limit_in_bytes").write_text(str(cap_bytes))
            (group / "memory.memsw.limit_in_bytes").write_text(str(cap_bytes))
        except OSError:
            pass
        if (group / "memory.limit_in_bytes").exists():

            def pre():
                (group / "cgroup.procs").write_text(str(os.getpid()))

    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=pre)
    finally:
        if pre is not None:
            group.rmdir()
    if proc.returncode == -9 and pre is not None:
        return None, f"killed: out of memory at the {cap_bytes / 2**30:.2f} GiB cap"
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or [""]
        return None, f"exit {proc.returncode}: {tail[0]}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), ""


def streamed(args) -> int:
    info = write_model(args.dir, args.size_gb)
    from rewrite import drop_caches  # bench/rewrite.py

    from ablation.checkpoint import open_index

    size = open_index(args.dir).total_bytes
    cap = int(args.cap_gb * 2**30)
    rows = {}
    for mode in ("read", "stream", "memory", "offload"):
        dropped = drop_caches()
        cmd = [
            sys.executable, __file__, "--stream-child", mode, "--dir", str(args.dir),
            "--prompts", str(args.prompts), "--batch-size", str(args.batch_size),
            "--cap-gb", str(args.cap_gb),
        ]  # fmt: skip
        row, err = run_capped(cmd, cap if mode in ("stream", "offload") else None)
        if row is None and mode == "offload":  # then without the cap, to compare anyway
            drop_caches()
            row, _ = run_capped(cmd, None)
            if row is not None:
                row["uncapped"] = True
        rows[mode] = row or {"mode": mode}
        if err:
            rows[mode]["capped_run"] = err
        rows[mode]["cache_dropped"] = dropped
        print(mode, json.dumps(rows[mode]), flush=True)
    st, rd, mem = rows["stream"], rows["read"], rows["memory"]
    if not all("wall_s" in r for r in (st, rd, mem)):
        print("failed:", json.dumps(rows))
        return 1
    bound_rss = 2 * st["largest_layer"] + st["states_bytes"] + 2**30
    floor = rd["wall_s"] + mem["wall_s"]
    result = {
        "checkpoint_bytes": size,
        "layers": info["layers"],
        "cap_bytes": cap,
        "model_over_cap": size / cap,
        "prompts": args.prompts,
        "rows": rows,
        "rss_bound": bound_rss,
        "rss_ok": st["peak_rss"] <= bound_rss,
        "time_floor_s": floor,
        "time_ratio": st["wall_s"] / floor,
        "time_ok": st["wall_s"] <= 1.5 * floor,
    }
    off = rows["offload"]
    if "wall_s" in off:
        result["offload_over_stream"] = off["wall_s"] / st["wall_s"]
    print(
        f"checkpoint {size / 1e9:.2f} GB = {size / cap:.1f}x the {args.cap_gb} GiB cap\n"
        f"streamed   {st['wall_s']:.1f} s, peak RSS {st['peak_rss'] / 2**20:.0f} MiB "
        f"(bound {bound_rss / 2**20:.0f} MiB: {'ok' if result['rss_ok'] else 'OVER'})\n"
        f"floor      read {rd['wall_s']:.1f} s + in-memory compute {mem['wall_s']:.1f} s; "
        f"streamed / floor = {result['time_ratio']:.2f} (bar 1.5)\n"
        + (
            f"offload    {off['wall_s']:.1f} s, peak RSS {off['peak_rss'] / 2**20:.0f} MiB: "
            f"{result['offload_over_stream']:.1f}x the streamed time"
            if "wall_s" in off
            else "offload    failed"
        )
        + (f" (under the cap: {off['capped_run']}; this run uncapped)" if "uncapped" in off else "")
    )
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {args.out}")
    return 0 if result["rss_ok"] and result["time_ok"] else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("results_measure.json"))
    ap.add_argument("--child", choices=["ablation", "baseline"])
    ap.add_argument("--streamed", action="store_true", help="The bigger-than-memory case.")
    ap.add_argument("--size-gb", type=float, default=6.0)
    ap.add_argument("--cap-gb", type=float, default=1.5)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/ablation-bench-stream"))
    ap.add_argument("--stream-child", choices=["read", "stream", "memory", "offload"])
    args = ap.parse_args()
    if args.stream_child:
        row = stream_child(args.stream_child, args.dir, args.prompts, args.batch_size, args.cap_gb)
        print(json.dumps(row))
        return 0
    if args.streamed:
        if args.out == Path(__file__).with_name("results_measure.json"):
            args.out = Path(__file__).with_name("results_stream.json")
        return streamed(args)
    if args.child:
        print(json.dumps(child(args.child, args.prompts, args.batch_size)))
        return 0
    rows = []
    for mode in ("baseline", "ablation"):
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                mode,
                "--prompts",
                str(args.prompts),
                "--batch-size",
                str(args.batch_size),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base, ours = rows
    print(f"{'':22}{'baseline':>12}{'ablation':>12}{'ratio':>8}")
    print(
        f"{'prompts/s':22}{base['prompts_per_s']:12.2f}{ours['prompts_per_s']:12.2f}"
        f"{ours['prompts_per_s'] / base['prompts_per_s']:7.1f}x"
    )
    print(
        f"{'peak RSS (MiB)':22}{base['peak_rss_mib']:12.0f}{ours['peak_rss_mib']:12.0f}"
        f"{base['peak_rss_mib'] / ours['peak_rss_mib']:7.1f}x less"
    )
    print(f"{'load time (s)':22}{base['load_s']:12.1f}{ours['load_s']:12.1f}")
    print(f"{'measure time (s)':22}{base['measure_s']:12.1f}{ours['measure_s']:12.1f}")
    args.out.write_text(
        json.dumps(
            {
                "prompts": args.prompts,
                "batch_size": args.batch_size,
                "baseline": base,
                "ablation": ours,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
