#!/usr/bin/env python3
"""Benchmark: `ablation measure` against the common generate()-based measurement.

Both run on gemma-3-270m (bf16, built from the PyPI GGUF package), on the same prompts (the
first N/2 built-in harmful and harmless measure prompts), each in its own process, which reports
its wall time and peak RSS (VmHWM). The baseline is what earlier abliteration scripts do: one
prompt at a time, model.generate(max_new_tokens=1, output_hidden_states=True), and the last
prompt token's state of every layer.

usage: python bench/measure.py [--prompts 128] [--batch-size 32] [--out bench/results_measure.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("results_measure.json"))
    ap.add_argument("--child", choices=["ablation", "baseline"])
    args = ap.parse_args()
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
