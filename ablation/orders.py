"""YAML marching orders: schema, strict validation with line numbers, layer-range expansion.

Older files (model / measurements / output / ablate entries with layer, measurement, scale,
sparsity) are a subset of this schema and load as they are.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ablation.architecture import COMPONENT_GROUPS, COMPONENTS, DEFAULT_COMPONENTS
from ablation.errors import AblationError

LOG = logging.getLogger(__name__)

MAX_LAYER = 100_000  # far beyond any model; keeps '0-99999999999' from expanding for hours
MAX_NODES = 100_000  # YAML nodes in one file (aliases count each time they are used)

# the components and the group shorthands, from the one list in architecture.py
Component = Literal[(*COMPONENTS, *COMPONENT_GROUPS)]  # type: ignore[valid-type]


class _Kernel(BaseModel):
    """A scale that varies over layers: max_scale at the peak, falling linearly to min_scale
    at peak +- width; expands to one entry per layer in [peak - width, peak + width]."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    peak: int = Field(ge=0, le=MAX_LAYER)
    width: int = Field(ge=0, le=MAX_LAYER)
    max_scale: float = 1.0
    min_scale: float = 0.0

    def scales(self) -> dict[int, float]:
        out = {}
        for layer in range(max(0, self.peak - self.width), self.peak + self.width + 1):
            t = abs(layer - self.peak) / self.width if self.width else 0.0
            out[layer] = self.max_scale - (self.max_scale - self.min_scale) * t
        return out


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    layer: int | None = None
    layers: int | str | list[int | str] | None = None
    kernel: _Kernel | None = None
    measurement: int | None = None
    scale: float = 1.0
    sparsity: float = Field(default=0.0, ge=0.0, lt=1.0)
    components: list[Component] | None = None
    directions: int | None = Field(default=None, ge=1)
    rows: float | None = Field(default=None, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _one_of(self) -> _Entry:
        if sum(x is not None for x in (self.layer, self.layers, self.kernel)) != 1:
            raise ValueError("give exactly one of 'layer', 'layers' or 'kernel'")
        return self


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str
    measurements: str
    output: str
    method: Literal["norm-preserving", "standard"] = "norm-preserving"
    projected: bool = True
    scale: float = 1.0
    components: list[Component] = Field(default_factory=lambda: list(DEFAULT_COMPONENTS))
    directions: int = Field(default=1, ge=1)
    rows: float = Field(default=1.0, gt=0.0, le=1.0)
    ablate: list[_Entry] = Field(min_length=1)


@dataclass(frozen=True)
class LayerOrder:
    layer: int
    measurement: int
    scale: float  # entry scale times the global scale (times the kernel's, if any)
    sparsity: float
    line: int
    components: tuple[str, ...] = DEFAULT_COMPONENTS
    directions: int = 1  # k: the top-k subspace of the measurement (1: its unit direction)
    rows: float = 1.0  # sparse surgery: the fraction of each tensor's vectors edited
    clip: bool = False  # a kernel's flank: dropped where it runs past the model's last layer


@dataclass
class Orders:
    model: str
    measurements: Path
    output: Path
    method: str
    projected: bool
    scale: float
    components: tuple[str, ...]
    layers: list[LayerOrder]
    source: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def norm_preserving(self) -> bool:
        return self.method == "norm-preserving"

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["measurements"] = str(self.measurements)
        out["output"] = str(self.output)
        out["source"] = str(self.source) if self.source else None
        out["layers"] = [{k: v for k, v in asdict(o).items() if k != "line"} for o in self.layers]
        return out

    def where(self, order: LayerOrder) -> str:
        return f"{self.source or 'orders'}:{order.line}"


def expand_components(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Components in the order given, group shorthands ("writers", "readers") expanded."""
    out: list[str] = []
    for name in names:
        out.extend(COMPONENT_GROUPS.get(name, (name,)))
    return tuple(dict.fromkeys(out))


def parse_layers(spec: int | str | list[int | str]) -> list[int]:
    """'10-30', '3,5,7-9', 12, or a YAML list of those -> sorted-as-given layer numbers."""
    items = spec if isinstance(spec, list) else [spec]
    out: list[int] = []
    for item in items:
        if isinstance(item, int):
            out.append(_bounded(item))
            continue
        for part in str(item).split(","):
            part = part.strip()
            lo, sep, hi = part.partition("-")
            try:
                a, b = (int(lo), int(hi)) if sep else (int(part), int(part))
            except ValueError:
                a, b = 0, -1
            if b < a:
                raise ValueError(f"bad layer range {part!r} (want N, N-M or a list)")
            out.extend(range(_bounded(a), _bounded(b) + 1))
    return out


def _bounded(layer: int) -> int:
    if layer > MAX_LAYER:
        raise ValueError(f"layer {layer} is beyond any model (at most {MAX_LAYER})")
    return layer


def _line_map(root: yaml.Node) -> dict[tuple, int]:
    """YAML path -> 1-based line, for naming where a bad key or value stands. Iterative and
    capped: an alias reused in an alias (a 'billion laughs' file) expands exponentially."""
    out: dict[tuple, int] = {}
    stack: list[tuple[tuple, yaml.Node]] = [((), root)]
    while stack:
        path, node = stack.pop()
        out.setdefault(path, node.start_mark.line + 1)
        if len(out) > MAX_NODES:
            raise ValueError(f"more than {MAX_NODES} YAML nodes (aliases count each use)")
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = (*path, k.value)
                out[key] = k.start_mark.line + 1
                stack.append((key, v))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(((*path, i), v) for i, v in enumerate(node.value))
    return out


def _line_of(lines: dict[tuple, int], loc: tuple) -> int:
    for cut in range(len(loc), -1, -1):
        key = tuple(str(p) if not isinstance(p, int) else p for p in loc[:cut])
        if key in lines:
            return lines[key]
    return 1


def read_yaml(
    path: Path,
    schema: type[BaseModel],
    overrides: dict[str, Any] | None = None,
    what: str = "orders",
) -> tuple[Any, dict[tuple, int]]:
    """Read a YAML mapping and validate it against a strict schema; a bad key or value is one
    error naming the file, the line and the key. Returns the parsed model and the line map."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise AblationError(f"{path}: cannot read {what} ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise AblationError(f"{path}: not UTF-8 text ({exc.reason})") from None
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise AblationError(f"{path}{where}: not valid YAML ({problem})") from exc
    except RecursionError:
        raise AblationError(f"{path}: not valid YAML (nested too deeply)") from None
    if data is None and not overrides:
        data = {}
    if not isinstance(data, dict):
        raise AblationError(f"{path}: {what} must be a YAML mapping")
    try:
        lines = _line_map(node) if node is not None else {}
    except ValueError as exc:
        raise AblationError(f"{path}: {what} too large ({exc})") from None
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return validate(data, schema, path, lines), lines


def validate(data: dict, schema: type[BaseModel], source: Path, lines: dict[tuple, int]) -> Any:
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or "(top)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        raise AblationError(f"{source}:{_line_of(lines, loc)}: {key}: {msg}") from None


def load(path: Path, overrides: dict[str, Any] | None = None) -> Orders:
    """Read, validate and expand an orders file; CLI overrides replace file values."""
    parsed, lines = read_yaml(path, _File, overrides)
    return _expand(path, parsed, lines)


def from_dict(data: dict[str, Any], source: Path) -> Orders:
    """Orders built in code (the search's trials): the same schema and expansion as a file."""
    return _expand(source, validate(data, _File, source, {}), {})


def _expand(path: Path, parsed: _File, lines: dict[tuple, int]) -> Orders:
    if not math.isfinite(parsed.scale) or parsed.scale == 0:
        raise AblationError(f"{path}:{lines.get(('scale',), 1)}: scale must be finite, non-zero")
    seen: dict[tuple[int, str], int] = {}
    layers: list[LayerOrder] = []
    top_components = expand_components(parsed.components)
    for i, entry in enumerate(parsed.ablate):
        line = lines.get(("ablate", i), 1)
        if entry.kernel is not None:
            scales = entry.kernel.scales()
        else:
            try:
                numbers = parse_layers(entry.layers if entry.layers is not None else entry.layer)
            except ValueError as exc:
                raise AblationError(f"{path}:{line}: ablate.{i}.layers: {exc}") from None
            scales = dict.fromkeys(numbers, 1.0)
        components = (
            expand_components(entry.components) if entry.components is not None else top_components
        )
        k = entry.directions or parsed.directions
        if k > 1 and entry.sparsity:
            raise AblationError(
                f"{path}:{line}: sparsity applies to one direction, not to directions: {k}"
            )
        for n, kernel_scale in scales.items():
            if n < 0:
                raise AblationError(f"{path}:{line}: layer {n} is negative")
            for c in components:
                if (n, c) in seen:
                    raise AblationError(
                        f"{path}:{line}: layer {n} is ordered twice for {c} "
                        f"(also at line {seen[n, c]})"
                    )
                seen[n, c] = line
            layers.append(
                LayerOrder(
                    layer=n,
                    measurement=entry.measurement if entry.measurement is not None else n,
                    scale=entry.scale * kernel_scale * parsed.scale,
                    sparsity=entry.sparsity,
                    line=line,
                    components=components,
                    directions=k,
                    rows=entry.rows if entry.rows is not None else parsed.rows,
                    clip=entry.kernel is not None and n != entry.kernel.peak,
                )
            )
    return Orders(
        model=parsed.model,
        measurements=Path(parsed.measurements),
        output=Path(parsed.output),
        method=parsed.method,
        projected=parsed.projected,
        scale=parsed.scale,
        components=top_components,
        layers=sorted(layers, key=lambda o: o.layer),
        source=path,
    )
