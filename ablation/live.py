"""Applying a plan to a model loaded in memory: the same targets, directions and kernels as the
streaming rewriter, on the model's parameters instead of the checkpoint's bytes. Used to score
orders without writing a checkpoint (the frontier benchmark, the search); undo restores the
exact tensors."""

from __future__ import annotations

import torch

from ablation import edits
from ablation.errors import AblationError
from ablation.rewrite import Plan


def apply(model: torch.nn.Module, plan: Plan) -> dict[str, torch.Tensor]:
    """Edit the model's parameters in place as the plan says; returns copies of the originals
    of every touched tensor (for undo). Parameter names must be the checkpoint's names, as
    transformers loads them."""
    params = dict(model.named_parameters(remove_duplicate=False))
    saved: dict[str, torch.Tensor] = {}
    for e in plan.edits:
        name = e.target.name
        p = params.get(name)
        if p is None:
            raise AblationError(f"the loaded model has no parameter {name!r} for the plan")
        if tuple(p.shape) != tuple(e.target.info.shape):
            raise AblationError(
                f"parameter {name!r} has shape {list(p.shape)}, the checkpoint "
                f"{list(e.target.info.shape)}"
            )
        if name not in saved:
            saved[name] = p.detach().clone()
        with torch.no_grad():
            w = p.data if p.data.is_contiguous() else p.data.contiguous()
            edits.project_out_(w, plan.directions[e.direction], e.target.hidden_axis, e.spec())
            if w.data_ptr() != p.data.data_ptr():
                p.data.copy_(w)
    return saved


def undo(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, value in saved.items():
            params[name].data.copy_(value)
