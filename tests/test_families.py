"""Every supported family: rewrite a tiny sharded checkpoint, reload it, run it, verify it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ALL_COMPONENTS, COMMON, FAMILIES, build_model, run_cli, save_sharded
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

# family -> expected edited tensors per role, with all components on every layer (3 layers)
EXPECTED = {
    "llama": {"attn_out": 3, "attn_out_bias": 3, "mlp_out": 3, "mlp_out_bias": 3, "embed": 1},
    "mistral": {"attn_out": 3, "mlp_out": 3, "embed": 1},
    "qwen2": {"attn_out": 3, "mlp_out": 3, "embed": 1},
    "qwen3": {"attn_out": 3, "mlp_out": 3, "embed": 1},
    "phi3": {"attn_out": 3, "mlp_out": 3, "embed": 1},
    "gemma2": {"attn_out": 3, "mlp_out": 3, "embed": 1},
    "gemma3_text": {"attn_out": 3, "mlp_out": 3, "embed": 1},
    "gpt2": {"attn_out": 3, "attn_out_bias": 3, "mlp_out": 3, "mlp_out_bias": 3, "embed": 2},
    "mixtral": {"attn_out": 3, "expert_out": 12, "router": 3, "embed": 1},
    "qwen2_moe": {"attn_out": 3, "expert_out": 12, "router": 6, "shared_expert_out": 3, "embed": 1},
    "qwen3_moe": {"attn_out": 3, "mlp_out": 1, "expert_out": 8, "router": 2, "embed": 1},
    "qwen3_next": {
        "attn_out": 3,
        "expert_out": 12,
        "router": 6,
        "shared_expert_out": 3,
        "embed": 1,
    },
    "deepseek_v2": {
        "attn_out": 3,
        "mlp_out": 1,
        "expert_out": 8,
        "router": 2,
        "shared_expert_out": 2,
        "embed": 1,
    },
    "deepseek_v3": {
        "attn_out": 3,
        "mlp_out": 1,
        "expert_out": 8,
        "router": 2,
        "shared_expert_out": 2,
        "embed": 1,
    },
    "glm4_moe": {
        "attn_out": 3,
        "mlp_out": 1,
        "expert_out": 8,
        "router": 2,
        "shared_expert_out": 2,
        "embed": 1,
    },
    "gpt_oss": {
        "attn_out": 3,
        "attn_out_bias": 3,
        "expert_out": 3,
        "expert_out_bias": 3,
        "router": 3,
        "embed": 1,
    },
    "llama4_text": {
        "attn_out": 3,
        "mlp_out": 2,
        "expert_out": 1,
        "router": 1,
        "shared_expert_out": 1,
        "embed": 1,
    },
}
assert set(EXPECTED) == set(FAMILIES)


def rewrite_and_check(model_dir: Path, job, expected: dict[str, int]) -> Path:
    orders = job(model_dir, components=ALL_COMPONENTS)
    res = run_cli("ablate", orders)
    assert res.exit_code == 0, res.output + res.stderr
    out = orders.parent / "out"
    record = json.loads((out / "ablation.json").read_text())
    assert record["counts_by_role"] == expected
    assert len(record["edits"]) == sum(expected.values())
    assert max(e["max_rel_projection"] for e in record["edits"]) < 1e-5

    res = run_cli("verify", out, "--orders", orders)
    assert res.exit_code == 0, res.output + res.stderr
    assert "verify     ok" in res.output

    # same shard names and index, every non-weight file carried over
    src_files = {p.name for p in model_dir.iterdir()}
    out_files = {p.name for p in out.iterdir()}
    assert src_files - {"README.md"} <= out_files
    assert {"ablation.json", "README.md"} <= out_files
    for name in ("config.json", "model.safetensors.index.json", "generation_config.json"):
        if (model_dir / name).exists():
            assert (model_dir / name).read_bytes() == (out / name).read_bytes()

    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        logits = model(torch.randint(0, 128, (2, 7))).logits
    assert logits.shape == (2, 7, 128) and torch.isfinite(logits).all()
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_rewrite_loads_and_verifies(family, checkpoint, job):
    rewrite_and_check(checkpoint(family), job, EXPECTED[family])


def test_bf16_checkpoint(checkpoint, job):
    """Stored dtype is kept: bf16 in, bf16 out, residue at bf16 rounding."""
    model_dir = checkpoint("qwen3_moe", torch.bfloat16)
    orders = job(model_dir, components=ALL_COMPONENTS)
    assert run_cli("ablate", orders).exit_code == 0
    res = run_cli("verify", orders.parent / "out", "--orders", orders)
    assert res.exit_code == 0, res.output + res.stderr
    shard = sorted((orders.parent / "out").glob("*.safetensors"))[0]
    assert all(t.dtype == torch.bfloat16 for t in load_file(shard).values())


def _gemma3_multimodal(root: Path, newer_prefix: bool) -> Path:
    text = transformers.Gemma3TextConfig(**COMMON)
    vision = transformers.SiglipVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    cfg = transformers.Gemma3Config(
        text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4
    )
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    out = save_sharded(model, root / "model")
    if newer_prefix:  # as newer transformers write it: model.language_model.layers...
        index = json.loads((out / "model.safetensors.index.json").read_text())
        renamed = {}
        for shard in sorted(set(index["weight_map"].values())):
            tensors = load_file(out / shard)
            tensors = {
                k.replace("language_model.model.", "model.language_model.")
                .replace("vision_tower.", "model.vision_tower.")
                .replace("multi_modal_projector.", "model.multi_modal_projector."): v
                for k, v in tensors.items()
            }
            save_file(tensors, out / shard, metadata={"format": "pt"})
            renamed.update(dict.fromkeys(tensors, shard))
        index["weight_map"] = renamed
        (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return out


@pytest.mark.parametrize("newer_prefix", [False, True])
def test_gemma3_multimodal_text_stack_only(tmp_path, job, newer_prefix):
    """Both on-disk prefixes of the multimodal Gemma 3; the vision tower stays byte-identical."""
    model_dir = _gemma3_multimodal(tmp_path, newer_prefix)
    orders = job(model_dir, components=ALL_COMPONENTS)
    res = run_cli("ablate", orders)
    assert res.exit_code == 0, res.output + res.stderr
    record = json.loads((orders.parent / "out" / "ablation.json").read_text())
    assert record["counts_by_role"] == {"attn_out": 3, "mlp_out": 3, "embed": 1}
    assert not any("vision" in e["tensor"] for e in record["edits"])
    res = run_cli("verify", orders.parent / "out", "--orders", orders)
    assert res.exit_code == 0, res.output + res.stderr
    model = transformers.AutoModelForImageTextToText.from_pretrained(orders.parent / "out")
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.randint(0, 100, (1, 5))).logits).all()


def test_fused_experts_on_disk(tmp_path, job):
    """A Qwen3-MoE checkpoint saved with transformers 5's fused layout ([E, hidden, inter])."""
    model = build_model("qwen3_moe")
    src = save_sharded(model, tmp_path / "src")
    fused = tmp_path / "model"
    fused.mkdir()
    for f in src.iterdir():
        if not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, fused / f.name)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert state["model.layers.1.mlp.experts.down_proj"].shape == (4, 32, 16)
    save_file(state, fused / "model.safetensors", metadata={"format": "pt"})
    orders = job(fused, components=ALL_COMPONENTS)
    res = run_cli("ablate", orders)
    assert res.exit_code == 0, res.output + res.stderr
    record = json.loads((orders.parent / "out" / "ablation.json").read_text())
    assert record["counts_by_role"]["expert_out"] == 2  # one fused tensor per MoE layer
    assert run_cli("verify", orders.parent / "out", "--orders", orders).exit_code == 0
