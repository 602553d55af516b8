"""Applying a plan to a model loaded in memory: the same targets, directions and kernels as the
streaming rewriter, on the model's parameters instead of the checkpoint's bytes. Used to score
orders without writing a checkpoint (the search, the frontier benchmark). Undo reads the
touched tensors back from the checkpoint's own bytes, so no second copy of the model is held."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch

from ablation import edits
from ablation.checkpoint import DTYPES, ShardFiles, ShardIndex
from ablation.errors import AblationError
from ablation.rewrite import Plan

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Swap:
    """The last element of a Layout index: the parameter holds the checkpoint tensor with these
    two axes swapped."""

    dim0: int
    dim1: int


class Layout:
    """Where a checkpoint tensor lives in the loaded model. Usually a parameter of the same
    name; but transformers renames some on load and fuses others (the per-expert gate/up/down
    of Qwen-MoE, Mixtral, DeepSeek ... become one [experts, ...] tensor per layer). The
    conversion rules are transformers' own (its conversion mapping for the model); a tensor
    they stack (MergeModulelist) and concatenate (Concatenate) is a slice of the fused
    parameter, a view edited in place. Any other conversion is an error naming it."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.params: dict[str, torch.Tensor] = {
            **{
                n: b
                for n, b in model.named_buffers(remove_duplicate=False)
                if n.rsplit(".", 1)[-1] not in _non_persistent(model, n)
            },
            **dict(model.named_parameters(remove_duplicate=False)),
        }
        self.prefix = getattr(model, "base_model_prefix", None)
        self.renamings: list = []
        self.converters: list = []
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter
        except ImportError:
            return
        for t in get_model_conversion_mapping(model):
            (self.converters if isinstance(t, WeightConverter) else self.renamings).append(t)

    def view(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The loaded model's tensor for checkpoint tensor `name`: a parameter's data or a
        view into a fused one."""
        found = self.locate(name, shape)
        if found is None:
            raise AblationError(
                f"the loaded model has no parameter for checkpoint tensor {name!r} (looked for "
                f"{self.target_of(name)!r}); the in-memory edit needs it"
            )
        return self.tensor(*found, name, shape)

    def tensor(self, param: str, index: tuple, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The model's current tensor `param` (looked up again: materializing a module
        replaces its tensors), indexed, checked against the checkpoint's shape."""
        t = self.model.get_parameter_or_buffer(param)
        swap = index[-1] if index and isinstance(index[-1], Swap) else None
        index = index[:-1] if swap else index
        t = t.data[index] if index else t.data
        if swap is not None:  # a view: edits through it land in the parameter
            t = t.transpose(swap.dim0, swap.dim1)
        if tuple(t.shape) != tuple(shape):
            raise AblationError(
                f"parameter for {name!r} has shape {list(t.shape)}, the checkpoint {list(shape)}"
            )
        return t

    def target_of(self, name: str) -> str:
        from transformers.core_model_loading import apply_renamings

        return apply_renamings(name, self.renamings) if self.renamings else name

    def locate(self, name: str, shape: tuple[int, ...]) -> tuple[str, tuple] | None:
        """(parameter or buffer name, index into it) of checkpoint tensor `name`; None when
        the model has no such tensor (transformers ignores those on load too)."""
        if name in self.params:
            return name, ()
        return self._converted(name, shape)

    def _converted(self, name: str, shape: tuple[int, ...]) -> tuple[str, tuple] | None:
        key = self.target_of(name)
        for conv in self.converters:
            target, pattern = conv.rename_source_key(key)
            if pattern is not None:
                break
        else:
            target, pattern, conv = key, None, None
        for pname in (target, f"{self.prefix}.{target}" if self.prefix else None):
            if pname in self.params:
                break
        else:
            return None
        p = self.params[pname]
        if conv is None:
            return pname, ()
        from transformers.core_model_loading import Concatenate, MergeModulelist, Transpose

        ops = [type(op).__name__ for op in conv.operations]
        index: list = [slice(None)] * p.ndim
        for op in conv.operations:
            if isinstance(op, Transpose):  # stored transposed (Qwen3-VL-MoE's fused experts)
                swapped = list(p.shape)
                swapped[op.dim0], swapped[op.dim1] = swapped[op.dim1], swapped[op.dim0]
                if tuple(swapped) == tuple(shape) and tuple(p.shape) != tuple(shape):
                    return pname, (Swap(op.dim0, op.dim1),)
                if tuple(p.shape) == tuple(shape):
                    return pname, ()
                break
            if isinstance(op, MergeModulelist):
                # transformers' source patterns are regexes in which "*." stands for an index
                found = re.search(pattern.replace("*.", r"(\d+)\."), key)
                if found is None or not found.groups():
                    break
                index[op.dim] = int(found.group(1))
            elif isinstance(op, Concatenate):
                k = conv.source_patterns.index(pattern)
                dim = op.dim - sum(isinstance(i, int) for i in index[: op.dim])
                size = shape[dim]
                if p.shape[op.dim] != size * len(conv.source_patterns):
                    break
                index[op.dim] = slice(k * size, (k + 1) * size)
            else:
                break
        else:
            return pname, tuple(index)
        raise AblationError(
            f"checkpoint tensor {name!r} becomes {target!r} through {', '.join(ops)} when "
            "transformers loads it: the in-memory edit supports stacked, concatenated and "
            "transposed tensors only"
        )


def _non_persistent(model: torch.nn.Module, name: str) -> set[str]:
    owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    return owner._non_persistent_buffers_set


def apply(model: torch.nn.Module, plan: Plan) -> list[str]:
    """Edit the model's tensors in place as the plan says (each on the device that holds it);
    returns the names of the touched checkpoint tensors, for `restore`."""
    if plan.arch.quant is not None:
        raise AblationError(
            f"{plan.model_dir}: a {plan.arch.quant.name} checkpoint cannot be edited in memory "
            "(tune, frontier); search on a dequantized copy, then write the orders to the "
            "quantized checkpoint with sharded_ablate.py"
        )
    if plan.extra:
        _untie(model)
    layout = Layout(model)
    touched: dict[str, None] = {}
    for e in plan.edits:
        name, info = e.target.write_as or e.target.name, e.target.info
        t = layout.view(name, info.shape)
        if t.dtype != DTYPES[info.dtype][0] and name not in touched:
            LOG.warning(
                "%s is %s in memory, %s on disk: the in-memory edit rounds differently from "
                "the written one (load the model in the checkpoint's dtype)",
                name,
                t.dtype,
                info.dtype,
            )
        touched[name] = None
        with torch.no_grad():
            w = t if t.is_contiguous() else t.contiguous()
            direction = plan.directions[e.direction].to(w.device)
            edits.project_out_(w, direction, e.target.hidden_axis, e.spec())
            if w.data_ptr() != t.data_ptr():
                t.copy_(w)
    return list(touched)


def restore(model: torch.nn.Module, index: ShardIndex, names: list[str]) -> None:
    """Put the named checkpoint tensors back into the model from the checkpoint's bytes; an
    output head apply untied is tied to the embeddings again."""
    layout = Layout(model)
    with ShardFiles(index.root) as files, torch.no_grad():
        for name in names:
            if name not in index.tensors:  # the untied head: not in the checkpoint
                model.get_output_embeddings().weight = model.get_input_embeddings().weight
                continue
            info = index.tensors[name]
            layout.view(name, info.shape).copy_(files.read(info))


def _untie(model: torch.nn.Module) -> None:
    """Give the output head a copy of the embeddings it is tied to, as the written checkpoint
    (its config untied) has."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is embed.weight:
        head.weight = torch.nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
