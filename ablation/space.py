"""The search space of `ablation tune`: which order parameters a trial may choose, in what
ranges, and how one trial's choices become an ordinary orders body.

A space file is a YAML mapping; every key is optional. A single value fixes a parameter; a
two-element list of numbers is a range (inclusive); a list of strings or booleans is a set of
choices. Layer parameters are relative where that keeps a file valid across models: `start` is
the first edited layer relative to the measurement layer, `end` the last edited layer relative
to the model's last layer. Scales below OFF leave their group out of the orders.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator

from ablation.errors import AblationError
from ablation.orders import read_yaml

OFF = 0.05  # a group scale below this is "not edited"

# the component groups a trial weighs separately
GROUPS: dict[str, list[str]] = {
    "attn_readers": ["attn_in"],
    "mlp_readers": ["mlp_in", "experts_in", "router"],
    "writers": ["writers"],
}

SEARCHED = (  # in asking order: shape decides what is asked after it
    "shape",
    "measurement",
    "start",
    "end",
    *GROUPS,
    "per_layer",
    "directions",
    "rows",
    "method",
    "kernel_width",
    "kernel_min_scale",
)
CHOICES = ("shape", "per_layer", "method")
RANGED = tuple(name for name in SEARCHED if name not in CHOICES)

IntSpec = int | list[int]
FloatSpec = float | list[float]


def _range(v: Any) -> Any:
    if isinstance(v, list) and (len(v) != 2 or v[0] > v[1]):
        raise ValueError("a range is [low, high] with low <= high")
    return v


def _choices(v: Any) -> Any:
    if isinstance(v, list) and not v:
        raise ValueError("give at least one choice")
    return v


class Space(BaseModel):
    """Defaults: the measurement layer anywhere past the first tenth; the edited window from a
    few layers around it to (or near) the last layer; attention readers, MLP/expert readers and
    writers each with their own scale; one direction from one measurement layer or per-layer
    directions."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    measurement: IntSpec | None = None  # None: past the first tenth to before the last tenth
    start: IntSpec = [-3, 2]
    end: IntSpec = [-4, 0]
    attn_readers: FloatSpec = [0.0, 1.5]
    mlp_readers: FloatSpec = [0.0, 1.5]
    writers: FloatSpec = [0.0, 1.0]
    per_layer: bool | list[bool] = [False, True]
    directions: IntSpec = 1
    rows: FloatSpec = 1.0
    method: (
        Literal["norm-preserving", "standard"] | list[Literal["norm-preserving", "standard"]]
    ) = "norm-preserving"
    shape: Literal["window", "kernel"] | list[Literal["window", "kernel"]] = "window"
    kernel_width: IntSpec = [1, 6]
    kernel_min_scale: FloatSpec = [0.0, 1.0]
    sampler: Literal["tpe", "nsga2"] = "tpe"

    _ranges = field_validator(*RANGED)(_range)
    _sets = field_validator(*CHOICES)(_choices)


KERNEL_ONLY = ("kernel_width", "kernel_min_scale")
WINDOW_ONLY = ("end",)


@dataclass(frozen=True)
class Bound:
    """A space checked against one model: every parameter as a fixed value or a range."""

    space: Space
    num_layers: int
    source: Path | None

    def spec(self, name: str) -> Any:
        return getattr(self.space, name)


def load(path: Path | None) -> Space:
    if path is None:
        return Space()
    parsed, _ = read_yaml(path, Space, what="a search space")
    return parsed


def bind(space: Space, num_layers: int, source: Path | None = None) -> Bound:
    """Fill the model-dependent defaults and check every layer range against the model."""
    n = num_layers
    where = f"{source or 'search space'}"
    if space.measurement is None:
        margin = max(1, round(0.1 * n))
        lo, hi = min(margin, n - 1), max(min(margin, n - 1), n - 1 - margin)
        space = space.model_copy(update={"measurement": [lo, hi]})
    m = space.measurement
    lo, hi = (m, m) if isinstance(m, int) else m
    if lo < 0 or hi > n - 1:
        raise AblationError(f"{where}: measurement: {m} is outside the model's layers 0-{n - 1}")
    for name in ("start", "end", "kernel_width"):  # defaults shrink to a small model
        v = getattr(space, name)
        if name not in space.model_fields_set and isinstance(v, list):
            lo_, hi_ = (0 if name == "kernel_width" else -(n - 1)), n - 1
            space = space.model_copy(update={name: [max(v[0], lo_), min(v[1], hi_)]})
    for name, bound in (("start", n - 1), ("end", n - 1)):
        v = getattr(space, name)
        a, b = (v, v) if isinstance(v, int) else v
        if abs(a) > bound or abs(b) > bound or (name == "end" and b > 0):
            raise AblationError(
                f"{where}: {name}: {v} reaches outside the model's layers 0-{n - 1}"
                + (" (end counts back from the last layer: 0 or less)" if name == "end" else "")
            )
    w = space.kernel_width
    if max(w if isinstance(w, list) else [w]) > n - 1 or min(w if isinstance(w, list) else [w]) < 0:
        raise AblationError(f"{where}: kernel_width: {w} is not within 0-{n - 1}")
    d = space.directions
    if min(d if isinstance(d, list) else [d]) < 1:
        raise AblationError(f"{where}: directions: {d} must be 1 or more")
    r = space.rows
    if any(not 0 < x <= 1 for x in (r if isinstance(r, list) else [r])):
        raise AblationError(f"{where}: rows: {r} must be in (0, 1]")
    for name in GROUPS:
        v = getattr(space, name)
        if min(v if isinstance(v, list) else [v]) < 0:
            raise AblationError(f"{where}: {name}: {v} must not be negative")
    return Bound(space, n, source)


def searched(bound: Bound) -> list[str]:
    """The parameters a trial chooses (the others are fixed)."""
    return [
        name
        for name in SEARCHED
        if isinstance(bound.spec(name), list) and len(set(map(repr, bound.spec(name)))) > 1
    ]


def suggest(trial: Any, bound: Bound) -> dict[str, Any]:
    """One trial's values for every parameter (an Optuna trial chooses the searched ones);
    kernel parameters are asked only in kernel-shaped trials, `end` only in windows."""
    values: dict[str, Any] = {}
    for name in SEARCHED:
        spec = bound.spec(name)
        if name in KERNEL_ONLY and values["shape"] != "kernel":
            continue
        if name in WINDOW_ONLY and values["shape"] == "kernel":
            continue
        if not isinstance(spec, list) or len(set(map(repr, spec))) == 1:
            values[name] = spec[0] if isinstance(spec, list) else spec
        elif isinstance(spec[0], (bool, str)):
            values[name] = trial.suggest_categorical(name, spec)
        elif all(isinstance(x, int) for x in spec):
            values[name] = trial.suggest_int(name, spec[0], spec[1])
        else:
            values[name] = trial.suggest_float(name, float(spec[0]), float(spec[1]))
    return values


def orders_body(values: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """The orders (everything but model / measurements / output) one trial's values mean;
    an empty `ablate` list when every group is off."""
    last = num_layers - 1
    m = values["measurement"]
    first = min(max(m + values["start"], 0), last)
    entries = []
    for group, components in GROUPS.items():
        scale = float(values[group])
        if scale < OFF:
            continue
        entry: dict[str, Any] = {"components": components}
        if values["shape"] == "kernel":
            entry["kernel"] = {
                "peak": first,
                "width": int(values["kernel_width"]),
                "max_scale": round(scale, 4),
                "min_scale": round(float(values["kernel_min_scale"]) * scale, 4),
            }
        else:
            entry["layers"] = f"{first}-{max(first, last + values['end'])}"
            entry["scale"] = round(scale, 4)
        if not values["per_layer"]:
            entry["measurement"] = m
        entries.append(entry)
    return {
        "method": values["method"],
        "projected": True,
        "directions": int(values["directions"]),
        "rows": float(values["rows"]),
        "ablate": entries,
    }


def seed_values(bound: Bound, measurement: int, start: int = 0) -> list[tuple[str, dict[str, Any]]]:
    """The first trials, as the searched parameters to enqueue: analyze's suggestion (readers
    from the measurement layer to the last, scale 1, no writers), then two neighbours that edit
    less of the model. The suggestion starts at the earliest layer with the full signal, the
    most editing end of the choices that work, so what a short search most often misses is the
    same edit starting one layer later or at 0.75 of the strength: the sampler's first trials
    are random and rarely land there. A seed the space cannot express is left out. `start`:
    the first edited layer's offset from the measurement (the causal check's pick may start
    later)."""
    suggestion = {
        "measurement": measurement,
        "start": start,
        "end": 0,
        "attn_readers": 1.0,
        "mlp_readers": 1.0,
        "writers": 0.0,
        "per_layer": False,
        "shape": "window",
    }
    seeds = [
        ("analyze's suggestion", suggestion),
        ("analyze's suggestion from one layer later", {**suggestion, "start": start + 1}),
        (
            "analyze's suggestion at 0.75",
            {**suggestion, "attn_readers": 0.75, "mlp_readers": 0.75},
        ),
    ]
    out = []
    for label, want in seeds:
        values = _expressed(bound, want)
        if values is not None and all(values != v for _, v in out):
            out.append((label, values))
    return out


def _expressed(bound: Bound, want: dict[str, Any]) -> dict[str, Any] | None:
    """`want` restricted to the searched parameters; None when one is outside its range."""
    out = {}
    for name in searched(bound):
        if name not in want:
            continue
        spec = bound.spec(name)
        v = want[name]
        ok = v in spec if isinstance(v, (bool, str)) else spec[0] <= v <= spec[1]
        if not ok:
            return None
        out[name] = v
    return out
