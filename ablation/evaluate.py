"""Before vs after: refusal rate on held-out harmful prompts, KL(base || ablated) of the first
generated token on harmless prompts, and the harmful/harmless separation along the ablated
directions. Base-model numbers are cached by the model's fingerprint and the settings."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ablation import activations, analysis, directions, prompts, refusals, refuse
from ablation.checkpoint import open_index
from ablation.demo_model import default_cache
from ablation.errors import AblationError
from ablation.hub import resolve_model
from ablation.rewrite import RECORD

LOG = logging.getLogger(__name__)
KL_DAMAGE = 0.5


@dataclass
class EvalOptions:
    base: str
    ablated: str
    harmful: str | None = None
    harmless: str | None = None
    text_field: str = "text"
    max_prompts: int | None = None
    seed: int = 0
    max_new_tokens: int = 64
    batch_size: int = 16
    device: str | None = None
    dtype: str = "auto"
    system: str | None = None
    response_prefix: str | None = None
    output: Path | None = None
    refuse_file: Path | None = None
    cache: bool = True


def fingerprint(model_dir: Path) -> str:
    """Changes whenever the weights could: config, index and every shard's header and size."""
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json"):
        if (model_dir / name).exists():
            h.update((model_dir / name).read_bytes())
    for name, shard in sorted(open_index(model_dir).shards.items()):
        h.update(f"{name}:{shard.size}:".encode())
        with open(shard.path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            h.update(f.read(n))
    return h.hexdigest()


def _probes(meas: refuse.Measurements, record: dict) -> dict[int, torch.Tensor]:
    """The direction each ablated layer was edited with, as the plan computed it."""
    o = record["orders"]
    out = {}
    for entry in o["layers"]:
        t, m = entry["layer"], entry["measurement"]
        if m not in meas.layers or t not in meas.layers:
            continue
        harmless = meas.layers[t].harmless if o["projected"] else None
        out[t] = directions.target_direction(
            meas.layers[m].refusenorm, harmless, entry["sparsity"], f"layer {t}"
        )
    return out


def _side(
    model_path: Path,
    opts: EvalOptions,
    harmful: list[str],
    harmless: list[str],
    probes: dict[int, torch.Tensor],
    label: str,
) -> tuple[dict, torch.Tensor]:
    """Everything measured on one model: (numbers and responses, harmless next-token logits)."""
    model, tok = activations.load_model(str(model_path), opts.dtype, opts.device)
    pad = activations.pad_id(tok)
    h_ids, _ = activations.encode(tok, harmful, opts.system, opts.response_prefix)
    l_ids, _ = activations.encode(tok, harmless, opts.system, opts.response_prefix)
    n = len(h_ids) + len(l_ids) * (2 if probes else 1) + (len(h_ids) if probes else 0)
    with tqdm(total=n, unit="prompt", desc=label, disable=None) as bar:
        new = activations.generate(
            model, h_ids, pad, opts.batch_size, opts.max_new_tokens, bar.update
        )
        logits = activations.next_token_logits(model, l_ids, pad, opts.batch_size, bar.update)
        separation = {}
        if probes:
            hs = activations.collect(model, h_ids, pad, opts.batch_size, progress=bar.update)
            ls = activations.collect(model, l_ids, pad, opts.batch_size, progress=bar.update)
            for layer, r in probes.items():
                hp = hs.states[:, layer].double() @ r  # [n, hidden] @ [hidden] -> [n]
                lp = ls.states[:, layer].double() @ r
                separation[str(layer)] = {
                    "auroc": analysis.auroc(hp, lp),
                    "gap": (hp.mean() - lp.mean()).item(),
                }
    responses = [tok.decode(ids, skip_special_tokens=True) for ids in new]
    flags = [refusals.is_refusal(r) for r in responses]
    result = {
        "model": str(model_path),
        "refusals": sum(flags),
        "n_harmful": len(flags),
        "refusal_rate": sum(flags) / max(1, len(flags)),
        "separation": separation,
        "responses": [
            {"prompt": p, "response": r, "refusal": f}
            for p, r, f in zip(harmful, responses, flags, strict=True)
        ],
    }
    del model
    return result, logits


def run(opts: EvalOptions) -> dict:
    harmful, h_src = prompts.load(
        opts.harmful, "harmful", "eval", opts.text_field, opts.max_prompts, opts.seed
    )
    harmless, l_src = prompts.load(
        opts.harmless, "harmless", "eval", opts.text_field, opts.max_prompts, opts.seed
    )
    base_dir, ablated_dir = resolve_model(opts.base), resolve_model(opts.ablated)
    record = {}
    if (ablated_dir / RECORD).exists():
        record = json.loads((ablated_dir / RECORD).read_text())
    probes: dict[int, torch.Tensor] = {}
    refuse_path = opts.refuse_file or (Path(record["refuse"]["path"]) if record else None)
    if refuse_path is not None and refuse_path.exists() and record:
        probes = _probes(refuse.load(refuse_path), record)
    elif record:
        LOG.warning("the .refuse file %s is not here: separation is not measured", refuse_path)

    settings = {
        k: v
        for k, v in asdict(opts).items()
        if k not in ("base", "ablated", "output", "refuse_file", "cache", "device", "batch_size")
    }
    key_src = json.dumps(
        {
            "model": fingerprint(base_dir),
            "harmful": harmful,
            "harmless": harmless,
            "settings": settings,
            "probes": {k: v.tolist() for k, v in probes.items()},
        },
        sort_keys=True,
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:32]
    cache = default_cache() / "eval" / key
    if opts.cache and (cache.with_suffix(".json")).exists():
        LOG.info("base model numbers from the cache (%s)", cache)
        base = json.loads(cache.with_suffix(".json").read_text())
        base_logits = load_file(str(cache.with_suffix(".safetensors")))["logits"]
    else:
        base, base_logits = _side(base_dir, opts, harmful, harmless, probes, "base")
        if opts.cache:
            cache.parent.mkdir(parents=True, exist_ok=True)
            save_file({"logits": base_logits.contiguous()}, str(cache.with_suffix(".safetensors")))
            cache.with_suffix(".json").write_text(json.dumps(base))
    ablated, ablated_logits = _side(ablated_dir, opts, harmful, harmless, probes, "ablated")
    if base_logits.shape != ablated_logits.shape:
        raise AblationError(
            f"vocabularies differ: base {list(base_logits.shape)}, ablated "
            f"{list(ablated_logits.shape)}"
        )
    kl = analysis.kl_divergence(base_logits, ablated_logits)
    result = {
        "base": {k: v for k, v in base.items() if k != "responses"},
        "ablated": {k: v for k, v in ablated.items() if k != "responses"},
        "kl": {"mean": kl.mean().item(), "max": kl.max().item(), "n_harmless": len(harmless)},
        "settings": {**settings, "harmful_source": h_src, "harmless_source": l_src},
    }
    out = opts.output or ablated_dir / "eval.json"
    responses = out.with_name(out.stem + "_responses.jsonl")
    try:
        out.write_text(json.dumps(result, indent=2) + "\n")
        with open(responses, "w") as f:
            for side, res in (("base", base), ("ablated", ablated)):
                for row in res["responses"]:
                    f.write(json.dumps({"model": side, **row}) + "\n")
    except OSError as exc:
        raise AblationError(f"{out}: cannot write ({exc.strerror})") from exc
    result["files"] = {"eval": str(out), "responses": str(responses)}
    return result


def table(result: dict) -> list[str]:
    b, a, kl = result["base"], result["ablated"], result["kl"]
    rows = [
        f"{'':28}{'base':>10}{'ablated':>10}",
        f"{'refusal rate':28}{b['refusal_rate']:>10.1%}{a['refusal_rate']:>10.1%}"
        f"   ({b['n_harmful']} held-out harmful prompts)",
        f"{'KL(base || ablated)':28}{'-':>10}{kl['mean']:>10.4f}"
        f"   (first token, {kl['n_harmless']} harmless prompts; max {kl['max']:.3f})",
    ]
    for layer in sorted(a["separation"], key=int):
        sb, sa = b["separation"].get(layer, {}), a["separation"][layer]
        rows.append(
            f"{'layer ' + layer + ' separation auroc':28}"
            f"{sb.get('auroc', float('nan')):>10.3f}{sa['auroc']:>10.3f}"
            f"   (gap {sb.get('gap', float('nan')):.2f} -> {sa['gap']:.2f})"
        )
    if kl["mean"] > KL_DAMAGE:
        rows.append(f"warning: KL above {KL_DAMAGE} usually means real damage to the model")
    return rows
