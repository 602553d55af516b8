"""DESIGN's exact invariant: one direction r ablated from every writer (embeddings and biases
included) leaves no component along r in the residual stream, at any layer, for any input."""

from __future__ import annotations

import pytest
import torch
from conftest import ALL_COMPONENTS, HIDDEN, run_cli
from zoo import residual_streams

transformers = pytest.importorskip("transformers")


def worst_alignment(streams: list[torch.Tensor], r: torch.Tensor) -> float:
    worst = 0.0
    for h in streams:
        h = h.double().reshape(-1, h.shape[-1])  # [tokens, hidden]
        rel = (h @ r.double()).abs() / h.norm(dim=-1)  # [tokens, hidden] @ [hidden] -> [tokens]
        worst = max(worst, rel.max().item())
    return worst


@pytest.mark.parametrize("method", ["norm-preserving", "standard"])
@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen2_moe", "gpt_oss"])
def test_residual_stream_orthogonal_to_r(family, method, checkpoint, job):
    model_dir = checkpoint(family)
    r = torch.nn.functional.normalize(
        torch.randn(HIDDEN, generator=torch.Generator().manual_seed(7)), dim=0
    )
    orders = job(
        model_dir,
        refuse_kw={"direction": r},
        components=ALL_COMPONENTS,
        method=method,
        projected=False,
    )
    res = run_cli("ablate", orders)
    assert res.exit_code == 0, res.output + res.stderr

    ids = torch.randint(0, 128, (4, 11), generator=torch.Generator().manual_seed(1))
    before = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    after = transformers.AutoModelForCausalLM.from_pretrained(orders.parent / "out").eval()
    assert worst_alignment(residual_streams(before, ids), r) > 1e-2  # r was really there
    assert worst_alignment(residual_streams(after, ids), r) < 1e-4
