"""The .refuse file (format v1): per-layer means and refusal directions, as safetensors.

No pickle: the file is safetensors with string metadata. Files written by earlier measure
scripts (a torch.save dict) are read with torch.load(weights_only=True) only.
"""

from __future__ import annotations

import hashlib
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ablation.errors import AblationError

LOG = logging.getLogger(__name__)

FORMAT = "refuse"
FORMAT_VERSION = "1"
_KEY = re.compile(
    r"^(harmful|harmless|refuse|refusenorm|harmful_proj|harmless_proj|"
    r"experts_harmful|experts_harmless|basis)_(\d{1,9})$"
)
REQUIRED = ("harmful", "harmless", "refuse", "refusenorm")


@dataclass
class LayerMeasurement:
    harmful: torch.Tensor  # [hidden] mean last-token state on harmful prompts
    harmless: torch.Tensor  # [hidden]
    refuse: torch.Tensor  # [hidden] harmful - harmless
    refusenorm: torch.Tensor  # [hidden] unit direction (biprojected when measured so)
    # *_proj, experts_*, and basis [k, hidden]: an optional orthonormal refusal subspace whose
    # first row is refusenorm (a reader that does not know the key skips it)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def basis(self) -> torch.Tensor:
        """The stored subspace [k, hidden], or the unit direction alone as [1, hidden]."""
        return self.extra.get("basis", self.refusenorm.unsqueeze(0))


@dataclass
class Measurements:
    layers: dict[int, LayerMeasurement]
    metadata: dict[str, str]

    @property
    def hidden_size(self) -> int:
        return next(iter(self.layers.values())).harmful.shape[0]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def save(path: Path, meas: Measurements) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for layer, m in sorted(meas.layers.items()):
        for kind in REQUIRED:
            tensors[f"{kind}_{layer}"] = getattr(m, kind).detach().to(torch.float32, copy=True)
        for kind, t in m.extra.items():
            tensors[f"{kind}_{layer}"] = t.detach().to(torch.float32, copy=True)
    metadata = {k: str(v) for k, v in meas.metadata.items()}
    metadata.update(format=FORMAT, format_version=FORMAT_VERSION)
    try:
        save_file(tensors, str(path), metadata=metadata)
    except OSError as exc:
        raise AblationError(f"{path}: cannot write ({exc.strerror})") from exc


def load(path: Path) -> Measurements:
    """Read a v1 file, or a legacy torch.save dict; anything else is a clear error."""
    if not path.is_file():
        raise AblationError(f"{path}: measurements file not found")
    try:
        tensors = load_file(str(path))

        with safe_open(str(path), "pt") as f:
            metadata = dict(sorted((f.metadata() or {}).items()))  # stored order varies
        if metadata.get("format") != FORMAT:
            raise AblationError(
                f"{path}: a safetensors file, but not a .refuse file (no format=refuse metadata)"
            )
        if metadata.get("format_version") != FORMAT_VERSION:
            raise AblationError(
                f"{path}: .refuse format version "
                f"{metadata.get('format_version')!r} is not supported (want 1)"
            )
    except SafetensorError:
        tensors, metadata = _load_legacy(path)
    return _assemble(path, tensors, metadata)


def _load_legacy(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with warnings.catch_warnings():  # garbage reads as exotic pickle protocols
            warnings.simplefilter("ignore")
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    # torch's restricted unpickler turns arbitrary bytes into any of a dozen exception types
    # (UnpicklingError, IndexError, KeyError, UnicodeDecodeError, zip errors ...): at this
    # boundary every one of them means "not a legacy measurement file"
    except Exception as exc:
        raise AblationError(
            f"{path}: neither a .refuse (safetensors) file nor a legacy "
            f"measurement dict ({(str(exc).splitlines() or [type(exc).__name__])[0]})"
        ) from exc
    if not isinstance(data, dict):
        raise AblationError(f"{path}: legacy file holds a {type(data).__name__}, not a dict")
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor) and _KEY.match(k)}
    LOG.info("%s: legacy measurement file (torch.save dict)", path)
    return tensors, {
        "format": FORMAT,
        "format_version": "legacy",
        "num_layers": str(data.get("layers", "")),
    }


def _assemble(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> Measurements:
    by_layer: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            continue
        by_layer.setdefault(int(m.group(2)), {})[m.group(1)] = t.float()
    if not by_layer:
        raise AblationError(f"{path}: holds no per-layer measurements")
    layers: dict[int, LayerMeasurement] = {}
    hidden = None
    for layer, parts in sorted(by_layer.items()):
        missing = [k for k in REQUIRED if k not in parts]
        if missing:
            raise AblationError(f"{path}: layer {layer} lacks {', '.join(missing)}")
        for kind in REQUIRED:
            t = parts[kind]
            if t.ndim != 1 or (hidden is not None and t.shape[0] != hidden):
                raise AblationError(f"{path}: {kind}_{layer} has shape {list(t.shape)}")
            hidden = t.shape[0]
        basis = parts.get("basis")
        if basis is not None and (basis.ndim != 2 or basis.shape[1] != hidden):
            raise AblationError(f"{path}: basis_{layer} has shape {list(basis.shape)}")
        layers[layer] = LayerMeasurement(*(parts.pop(k) for k in REQUIRED), extra=parts)
    return Measurements(layers, metadata)
