"""Which tensors write into (or read from) the residual stream, per model family, as data.

Each family is a JSON file in ablation/architectures/: name templates relative to the text
model's root (with ${layer} and ${expert}), the role of each tensor and the axis whose length is
the hidden size. The checkpoint, not the config, says which layers are dense and which are MoE;
the config only says how many experts a MoE layer must have. Nothing is guessed: a targeted
layer whose attention, MLP or experts cannot be found is an error that lists what it holds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from string import Template
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from ablation import quant
from ablation.checkpoint import ShardIndex, TensorInfo
from ablation.errors import AblationError

LOG = logging.getLogger(__name__)

# role -> (the orders' component that selects it, whether it is a bias)
ROLES: dict[str, tuple[str, bool]] = {
    "attn_out": ("attn_out", False),
    "attn_out_bias": ("attn_out", True),
    "mlp_out": ("mlp_out", False),
    "mlp_out_bias": ("mlp_out", True),
    "expert_out": ("experts", False),
    "expert_out_bias": ("experts", True),
    "shared_expert_out": ("shared_experts", False),
    "shared_expert_out_bias": ("shared_experts", True),
    "router": ("router", False),
    "embed": ("embed", False),
    # the output head reads the stream after the final norm: blind to r, it no longer reads
    # what the identity path carries past the last edited layer
    "head": ("head", False),
    # readers: the input side of the modules that read the residual stream after a norm
    "attn_in": ("attn_in", False),
    "mlp_in": ("mlp_in", False),
    "expert_in": ("experts_in", False),
    "shared_expert_in": ("experts_in", False),
}
COMPONENTS = (
    "attn_out",
    "mlp_out",
    "experts",
    "shared_experts",
    "router",
    "embed",
    "head",
    "biases",
    "attn_in",
    "mlp_in",
    "experts_in",
)
DEFAULT_COMPONENTS = ("attn_out", "mlp_out", "experts", "shared_experts", "router")
WRITERS = ("attn_out", "mlp_out", "experts", "shared_experts")
READERS = ("attn_in", "mlp_in", "experts_in")  # routers read too, but are their own component
# shorthands the orders accept in a components list
COMPONENT_GROUPS = {"writers": WRITERS, "readers": READERS}

# Suffixes that mark a quantized tensor (or its scales) next to, or instead of, a plain weight.
QUANT_MARKERS: dict[str, str] = {
    ".weight_scale_inv": "float8 with block scales",
    ".weight_scale": "float8 with a per-tensor scale",
    "_blocks": "MXFP4 blocks",
    "_scales": "MXFP4 scales",
    ".weight_packed": "int4 pack (compressed-tensors)",
    ".weight_zero_point": "int4 pack with zero points (compressed-tensors)",
    ".qweight": "int4 pack (GPTQ/AWQ)",
    ".qzeros": "int4 pack (GPTQ/AWQ)",
    ".weight.absmax": "bitsandbytes 4-bit",
    ".weight.quant_state.bitsandbytes__nf4": "bitsandbytes 4-bit",
    ".weight.quant_state.bitsandbytes__fp4": "bitsandbytes 4-bit",
    ".SCB": "bitsandbytes 8-bit",
}


# How a norm's gain meets the stream: y = w * x / rms(x) ("w"), (1 + w) * x / rms(x) ("1+w",
# Gemma, Qwen3-Next/3.5), w * (x - mean(x)) / std(x) (+ bias) ("layernorm", Cohere, Phi-MoE)
NormForm = Literal["w", "1+w", "layernorm"]
NORM_FORMS: dict[str, tuple[float, bool]] = {  # form -> (offset added to w, mean removed)
    "w": (0.0, False),
    "1+w": (1.0, False),
    "layernorm": (0.0, True),
}


class _NormRef(BaseModel):
    """A norm named with its own form (a chain that mixes forms: Mistral Large 4's indexer
    reads a LayerNorm of the RMSNorm's output)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    form: NormForm


class _Row(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    role: str
    # the axis whose length is the hidden size; a list where a layout may come either way
    # round (Qwen3-VL-MoE's fused experts: transposed as released, not as transformers saves
    # them): the first axis of that size wins, as transformers transposes only when the
    # shape says so
    hidden_axis: int | list[int]
    # the norm(s) between this tensor and the residual stream, from the stream outwards: a
    # reader's input norms (or null: it reads the stream itself), a writer's output norms
    # innermost first (Gemma's sandwich, OLMo 2's post-norms); a name starting with "?" is a
    # norm some layers lack
    norm: str | list[str | _NormRef] | None = None
    norm_form: NormForm | None = None  # this row's norms, when not the family's form
    # the axis the tensor contracts with its input: the last (nn.Linear's [out, in]) unless
    # the model applies it as x @ W; quantized formats store the input axis last
    input_axis: int | None = None
    unless: str | None = None  # a tensor whose presence in the layer means this row does not apply

    def norms(self, family_form: NormForm) -> list[tuple[str, NormForm]]:
        """(name, form) of each norm, in the order the row lists them."""
        items = (
            [] if self.norm is None else [self.norm] if isinstance(self.norm, str) else self.norm
        )
        form = self.norm_form or family_form
        return [(n, form) if isinstance(n, str) else (n.name, n.form) for n in items]


class Family(BaseModel):
    model_config = ConfigDict(extra="forbid")
    family: str
    doc: str = ""
    model_types: list[str]
    prefixes: list[str]
    layer: str
    required: list[list[str]]
    tensors: list[_Row]
    globals: list[_Row] = []
    num_experts: list[str] = []
    norm_form: NormForm = "w"
    # when set, every norm weight a layer holds ([hidden], "norm" in its name) must be one of
    # these: a norm the table does not place means the edit cannot be known to be exact
    known_norms: list[str] | None = None
    # why readers cannot be edited with this table (the generic one: norm gains unknown)
    no_readers: str = ""
    # the output head: its names from the checkpoint's root, the first present (or, tied to
    # the embeddings, the name an untied copy is written under), and the final norm it reads
    # the stream through (from the text model's prefix)
    heads: list[str] = ["lm_head.weight", "language_model.lm_head.weight"]
    final_norm: str | None = "norm.weight"

    @model_validator(mode="after")
    def _readers_say_their_norm(self) -> Family:
        for row in self.tensors:
            reader = ROLES.get(row.role, ("", False))[0] in (*READERS, "router")
            if reader and "norm" not in row.model_fields_set:
                raise ValueError(
                    f"reader {row.name!r} must say its norm (a tensor, or null for none)"
                )
        return self


@cache
def families() -> dict[str, Family]:
    """Every family file shipped in the package, validated once."""
    out: dict[str, Family] = {}
    for entry in sorted(resources.files("ablation").joinpath("architectures").iterdir()):
        if not entry.name.endswith(".json") or entry.name == REFUSED:
            continue
        try:
            fam = Family.model_validate(json.loads(entry.read_text()))
        except (ValidationError, json.JSONDecodeError) as exc:
            raise RuntimeError(f"architecture file {entry.name} is invalid: {exc}") from exc
        for row in [*fam.tensors, *fam.globals]:
            if row.role not in ROLES:
                raise RuntimeError(f"{entry.name}: unknown role {row.role!r}")
        out[fam.family] = fam
    return out


REFUSED = "refused.json"


class _Refusal(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_types: list[str]
    reason: str


class _Refused(BaseModel):
    model_config = ConfigDict(extra="forbid")
    doc: str = ""
    refused: list[_Refusal]


@cache
def refused() -> dict[str, str]:
    """model_type -> why no table can edit it exactly (architectures/refused.json)."""
    text = resources.files("ablation").joinpath("architectures", REFUSED).read_text()
    try:
        data = _Refused.model_validate(json.loads(text))
    except (ValidationError, json.JSONDecodeError) as exc:
        raise RuntimeError(f"architecture file {REFUSED} is invalid: {exc}") from exc
    return {t: r.reason for r in data.refused for t in r.model_types}


@dataclass(frozen=True)
class Norm:
    """One norm between a tensor and the stream: its gain tensor and how the gain applies."""

    name: str
    form: NormForm
    bias: str | None = None  # a LayerNorm's bias tensor, when it has one

    @property
    def offset(self) -> float:
        return NORM_FORMS[self.form][0]

    @property
    def centred(self) -> bool:
        return NORM_FORMS[self.form][1]


@dataclass(frozen=True)
class Target:
    """One tensor the orders may edit: what it is, where its hidden axis is, where it lives."""

    name: str
    role: str
    layer: int | None  # None for embeddings
    hidden_axis: int
    info: TensorInfo
    expert: int | None = None
    # the norms between this tensor and the residual stream, with their form: applied to a
    # writer's output (innermost first: Gemma's sandwich norms, OLMo 2's post-norms) or to a
    # reader's input (pre-norms); their gains fold into the direction removed. A reader with
    # none reads the stream itself.
    norms: tuple[Norm, ...] = ()
    # a quantized weight (info: its codes): its scale tensor (possibly in another shard), the
    # block of elements per scale, and the weight's shape [..., out, in], in which hidden_axis
    # counts (quant.py)
    scale: TensorInfo | None = None
    block: tuple[int, int] | None = None
    shape: tuple[int, ...] | None = None
    # an output head tied to the embeddings: the edited copy is written under this name (a new
    # tensor, the embeddings untouched) and the output's config unties the two
    write_as: str | None = None

    @property
    def component(self) -> str:
        return ROLES[self.role][0]

    @property
    def is_bias(self) -> bool:
        return ROLES[self.role][1]

    @property
    def is_reader(self) -> bool:
        return self.component in (*READERS, "router", "head")


@dataclass(frozen=True)
class Coded:
    """A quantized weight as stored: its codes and scale tensors, the block of elements per
    scale, its shape [..., out, in], and whether the model's parameter swaps the last two."""

    name: str
    codes: TensorInfo
    scale: TensorInfo
    block: tuple[int, int]
    shape: tuple[int, ...]
    swap: bool


@dataclass
class Architecture:
    """A family's table bound to one checkpoint: its prefix, sizes and tensor index."""

    family: Family
    model_type: str
    prefix: str
    num_layers: int
    hidden_size: int
    num_experts: int | None
    tie_embeddings: bool
    index: ShardIndex
    quant: quant.Scheme | None = None  # the checkpoint's quantization, when it has one

    def layer_prefix(self, layer: int) -> str:
        return self.prefix + Template(self.family.layer).substitute(layer=layer)

    def layer_tensors(self, layer: int) -> list[str]:
        lp = self.layer_prefix(layer)
        return sorted(n for n in self.index.tensors if n.startswith(lp))

    def targets(self, layer: int) -> list[Target]:
        """Every known writer/reader of one decoder layer; errors if a required part is missing."""
        lp = self.layer_prefix(layer)
        held = self.layer_tensors(layer)
        self._check_norms(layer, lp, held)
        found: list[Target] = []
        for row in self.family.tensors:
            found.extend(self._match(row, lp, held, layer))
        roles = {t.role for t in found}
        for group in self.family.required:
            if not roles & set(group):
                raise AblationError(
                    f"layer {layer}: no {' or '.join(group)} tensor found with the "
                    f"{self.family.family} table; the layer holds: {_listing(held)}"
                )
        self._check_experts(layer, found, held)
        return found

    def _check_norms(self, layer: int, lp: str, held: list[str]) -> None:
        """A table that lists the norms it places refuses a layer holding another: where a
        norm sits decides what an exact edit is (OLMo 2's post-norms under the generic
        table's names would leave the direction in what its sublayers write)."""
        if self.family.known_norms is None:
            return
        placed = {n.removeprefix("?") for r in self.family.tensors for n, _ in r.norms("w")}
        known = set(self.family.known_norms) | placed
        other = [
            n
            for n in held
            if "norm" in n.removeprefix(lp)
            and len(self.index.tensors[n].shape) == 1
            and self.index.tensors[n].shape[0] == self.hidden_size
            and n.removeprefix(lp) not in known
            and n.removeprefix(lp).removesuffix(".bias") + ".weight" not in known
        ]
        if other:
            raise AblationError(
                f"layer {layer} holds norms the {self.family.family} table does not place "
                f"({_listing(other, 4)}), so no edit of it can be known to be exact; "
                f"model_type {self.model_type!r} needs a family table (ablation/architectures)"
            )

    def global_targets(self) -> list[Target]:
        out: list[Target] = []
        for row in self.family.globals:
            out.extend(self._match(row, self.prefix, list(self.index.tensors), None))
        return out

    def head_target(self) -> Target:
        """The output head as a reader behind the final norm; tied to the embeddings (as
        transformers ties them when the config says so, whatever the checkpoint holds), the
        embedding matrix, to be written as a separate head."""
        fam = self.family
        if fam.final_norm is None or fam.no_readers:
            why = fam.no_readers or f"the {fam.family} table names no final norm"
            raise AblationError(f"components include head, but {why}")
        row = _Row(name="", role="head", hidden_axis=1, norm=fam.final_norm)
        norms = self._norms(row, self.prefix, "the output head")
        found = next((h for h in fam.heads if h in self.index.tensors), None)
        if found is not None and not self.tie_embeddings:
            return self._target(found, row, None, None, norms)
        embeds = [t for t in self.global_targets() if t.role == "embed"]
        if not self.tie_embeddings or not embeds:
            raise AblationError(
                f"components include head, but no output head ({' or '.join(fam.heads)}) "
                "was found, and the config does not tie it to the embeddings"
            )
        t = self._target(embeds[0].name, row, None, None, norms)
        return dataclasses.replace(t, write_as=fam.heads[0])

    def _match(self, row: _Row, base: str, held: list[str], layer: int | None) -> list[Target]:
        """The tensors a row names, as plain weights or (the checkpoint being quantized) as
        the codes its scheme stores in their place."""
        if row.unless is not None and base + row.unless in self.index.tensors:
            return []
        templates = [row.name]
        if self.quant is not None and self.quant.data_name(row.name) != row.name:
            templates.append(self.quant.data_name(row.name))
        hits: list[tuple[str, int | None]] = []
        for template in templates:
            if "${expert}" in template:
                pattern = re.compile(
                    re.escape(base)
                    + re.escape(template).replace(re.escape("${expert}"), r"(\d+)")
                    + "$"
                )
                found = [(n, int(m.group(1))) for n in held if (m := pattern.match(n))]
            else:
                found = [(base + template, None)] if base + template in self.index.tensors else []
            # the weight's own name, whichever of the templates matched
            hits.extend((base + Template(row.name).safe_substitute(expert=e), e) for _, e in found)
        hits = list(dict.fromkeys(hits))
        for name, _ in hits:
            self._check_plain(name)
        if not hits:
            stem = base + row.name.replace(".${expert}", ".0")
            self._check_plain(stem)
            return []
        norms = self._norms(row, base, hits[0][0])
        return [self._target(n, row, layer, e, norms) for n, e in hits]

    def _norms(self, row: _Row, base: str, name: str) -> tuple[Norm, ...]:
        out = []
        for norm, form in row.norms(self.family.norm_form):
            optional = norm.startswith("?")
            full = base + norm.removeprefix("?")
            if full not in self.index.tensors:
                if optional:
                    continue
                raise AblationError(f"tensor {name!r}: its norm {full!r} is missing")
            bias = full.removesuffix(".weight") + ".bias" if full.endswith(".weight") else None
            if bias not in self.index.tensors:
                bias = None
            if bias is not None and not NORM_FORMS[form][1]:
                raise AblationError(
                    f"norm {full!r} has a bias {bias!r}, but the {self.family.family} table "
                    f"calls it an RMSNorm ({form!r})"
                )
            out.append(Norm(full, form, bias))
        return tuple(out)

    def _check_plain(self, name: str) -> None:
        """A weight stored in a format quant.py does not edit is never edited as bytes."""
        stem = name.removesuffix(".weight")
        ours = {self.quant.scale_name(name), self.quant.data_name(name)} if self.quant else set()
        for suffix, what in QUANT_MARKERS.items():
            for candidate in (stem + suffix, name + suffix):
                if candidate in self.index.tensors and candidate not in ours:
                    why = (
                        "but config.json has no quantization_config to say how"
                        if self.quant is None and what.startswith("float8")
                        else "a format that cannot be edited in place; supported: "
                        + "; ".join(quant.SUPPORTED)
                    )
                    raise AblationError(
                        f"tensor {name!r} is stored quantized ({what}: {candidate!r}), {why}"
                    )

    def _target(
        self, name: str, row: _Row, layer: int | None, expert: int | None, norms: tuple[Norm, ...]
    ) -> Target:
        stored = self.quant.data_name(name) if self.quant else name
        info = self.index.tensors.get(name) or self.index.tensors[stored]
        scale, block, shape = self._scale_of(info)
        if not info.is_float and scale is None:
            raise AblationError(
                f"tensor {info.name!r} is {info.dtype}, not a float weight (quantized or "
                "packed); dequantize the checkpoint first: quantized bytes are never edited"
            )
        logical = shape if shape is not None else info.shape
        axes = [row.hidden_axis] if isinstance(row.hidden_axis, int) else row.hidden_axis
        if shape is not None and self.quant is not None and self.quant.input_last:
            axes = [_stored_axis(a, row.input_axis, len(shape)) for a in axes]
        axis = next(
            (a for a in axes if a < len(logical) and logical[a] == self.hidden_size), axes[0]
        )
        if axis >= len(logical) or logical[axis] != self.hidden_size:
            raise AblationError(
                f"tensor {info.name!r} has shape {list(logical)}"
                + (f" (stored as {list(info.shape)})" if shape is not None else "")
                + f", but the {self.family.family} table puts the hidden size "
                f"{self.hidden_size} on axis {axis}"
            )
        return Target(info.name, row.role, layer, axis, info, expert, norms, scale, block, shape)

    def coded(self, info: TensorInfo) -> Coded | None:
        """How a quantized weight's values come out of its stored codes (None for a float
        tensor or a companion): its name, scale, block, and whether the model holds it with
        the last two axes swapped (applied as x @ W: its table row's input_axis)."""
        scale, block, shape = self._scale_of(info)
        if scale is None or block is None or shape is None or self.quant is None:
            return None
        name = self.quant.weight_name(info.name)
        swap = self.quant.input_last and self._input_axis(name) == len(shape) - 2
        return Coded(name, info, scale, block, shape, swap)

    def _input_axis(self, name: str) -> int | None:
        layer = re.escape(self.prefix) + re.escape(self.family.layer).replace(
            re.escape("${layer}"), r"\d+"
        )
        for row, base in [(r, layer) for r in self.family.tensors] + [
            (r, re.escape(self.prefix)) for r in self.family.globals
        ]:
            if row.input_axis is None:
                continue
            pattern = base + re.escape(row.name).replace(re.escape("${expert}"), r"\d+")
            if re.fullmatch(pattern, name):
                return row.input_axis
        return None

    def _scale_of(
        self, info: TensorInfo
    ) -> tuple[TensorInfo | None, tuple[int, int] | None, tuple[int, ...] | None]:
        """A quantized weight's scale, block and logical shape [..., out, in], checked against
        each other; (None, None, None) for a float weight."""
        q = self.quant
        if (
            q is None
            or info.dtype != q.packing.dtype
            or info.name != q.data_name(q.weight_name(info.name))
        ):
            if info.dtype == "F8_E4M3" and q is None:
                raise AblationError(
                    f"tensor {info.name!r} is float8, but config.json has no quantization_config "
                    "to say how it is scaled"
                )
            return None, None, None
        scale_name = q.scale_name(q.weight_name(info.name))
        scale = self.index.tensors.get(scale_name)
        if scale is None:
            raise AblationError(
                f"tensor {info.name!r} is {q.name} ({q.grid.name}) without its scale {scale_name!r}"
            )
        if scale.dtype not in q.scale_dtypes:
            raise AblationError(
                f"scale {scale_name!r} is {scale.dtype}, not a {q.name} scale of {info.name!r}"
            )
        if len(info.shape) < q.packing.axes + 1:
            raise AblationError(f"tensor {info.name!r} is {q.name} with shape {list(info.shape)}")
        shape = q.packing.logical_shape(tuple(info.shape))
        return scale, q.block_of(shape, tuple(scale.shape), info.name), shape

    def _check_experts(self, layer: int, found: list[Target], held: list[str]) -> None:
        experts = [t for t in found if t.role == "expert_out"]
        if not experts:
            return
        if self.num_experts is None:
            raise AblationError(
                f"layer {layer} holds experts, but config.json has none of "
                f"{self.family.num_experts} to say how many"
            )
        per_expert = sorted(t.expert for t in experts if t.expert is not None)
        fused = [t for t in experts if t.expert is None]
        if per_expert and per_expert != list(range(self.num_experts)):
            missing = sorted(set(range(self.num_experts)) - set(per_expert))
            raise AblationError(
                f"layer {layer}: {len(per_expert)} of {self.num_experts} experts found "
                f"(missing {missing[:8]}); the layer holds: {_listing(held)}"
            )
        for t in fused:
            if t.info.shape[0] != self.num_experts:
                raise AblationError(
                    f"tensor {t.name!r} has {t.info.shape[0]} experts on axis 0, config says "
                    f"{self.num_experts}"
                )
        if not any(t.role == "router" for t in found):
            raise AblationError(
                f"layer {layer} holds experts but no router; the layer holds: {_listing(held)}"
            )


def _stored_axis(axis: int, input_axis: int | None, ndim: int) -> int:
    """The hidden axis of a weight in its quantized layout, where the input axis is last: a
    tensor the model applies as x @ W ([..., in, out]) is stored with its last two axes
    swapped."""
    if input_axis is None or input_axis == ndim - 1:
        return axis
    if input_axis != ndim - 2:
        raise AblationError(f"input axis {input_axis} of a {ndim}-d tensor cannot be stored last")
    return {ndim - 2: ndim - 1, ndim - 1: ndim - 2}.get(axis, axis)


def _listing(names: list[str], most: int = 12) -> str:
    if not names:
        return "nothing"
    more = f" ... (+{len(names) - most} more)" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def _text_config(config: dict) -> dict:
    return config.get("text_config") or config


def _first(config: dict, keys: list[str]) -> int | None:
    for cfg in (_text_config(config), config):
        for key in keys:
            if isinstance(cfg.get(key), int):
                return cfg[key]
    return None


def _length(config: dict, keys: list[str]) -> int | None:
    """A count given as one entry per layer (Nemotron-H's layers_block_type or
    hybrid_override_pattern) rather than as a number."""
    for cfg in (_text_config(config), config):
        for key in keys:
            if isinstance(cfg.get(key), list | str) and cfg[key]:
                return len(cfg[key])
    return None


def resolve(config: dict, index: ShardIndex) -> Architecture:
    """Bind the family table to a checkpoint, from config.json and the tensor names."""
    model_type = config.get("model_type", "")
    text_type = _text_config(config).get("model_type", "")
    for t in (model_type, text_type):
        if t in refused():
            raise AblationError(f"model_type {t!r} cannot be edited exactly: {refused()[t]}")
    fams = families()
    family = next((f for f in fams.values() if model_type in f.model_types), None) or next(
        (f for f in fams.values() if text_type and text_type in f.model_types), None
    )
    if family is None:
        family = fams["generic"]
        LOG.warning("unknown model_type %r: using the generic tensor names", model_type)
    hidden = _first(config, ["hidden_size", "n_embd", "d_model"])
    layers = _first(config, ["num_hidden_layers", "n_layer", "num_layers"]) or _length(
        config, ["layers_block_type", "hybrid_override_pattern"]
    )
    if hidden is None or layers is None:
        raise AblationError("config.json lacks hidden_size or num_hidden_layers")
    prefix = next(
        (
            p
            for p in family.prefixes
            if any(
                n.startswith(p + Template(family.layer).substitute(layer=0)) for n in index.tensors
            )
        ),
        None,
    )
    if prefix is None:
        raise AblationError(
            f"no tensor of the {family.family} table's layer 0 found under prefixes "
            f"{family.prefixes}; the checkpoint holds: {_listing(sorted(index.tensors))}"
        )
    tie = config.get("tie_word_embeddings", _text_config(config).get("tie_word_embeddings", True))
    return Architecture(
        family=family,
        model_type=model_type,
        prefix=prefix,
        num_layers=layers,
        hidden_size=hidden,
        num_experts=_first(config, family.num_experts) if family.num_experts else None,
        tie_embeddings=bool(tie),
        index=index,
        quant=_scheme(config, index),
    )


def _scheme(config: dict, index: ShardIndex) -> quant.Scheme | None:
    """The quantization to edit through. A config that names one this tool cannot edit is an
    error only if the weights really are quantized: dequantized copies often keep the key."""
    try:
        return quant.detect(config)
    except AblationError as exc:
        if any(not t.is_float for t in index.tensors.values()):
            raise
        LOG.warning("%s; but every tensor is a float: edited as floats", exc)
        return None
