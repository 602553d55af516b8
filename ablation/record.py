"""ablation.json, read back: the record a rewrite leaves beside its shards.

evaluate, publish and --resume read it from folders that may come from anyone (a downloaded
abliterated model, a half-deleted output), so it is validated here once: a record that is not
what the rewriter writes is one user error naming the key, never a KeyError later. Extra keys
are allowed (newer versions add some); the keys readers use are checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from ablation.checkpoint import is_plain_name, read_json_object
from ablation.errors import AblationError

RECORD = "ablation.json"


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class _Layer(_Open):
    layer: int
    measurement: int
    scale: float
    sparsity: float = 0.0
    components: list[str] | None = None
    directions: int = 1
    rows: float = 1.0


class _Orders(_Open):
    method: str
    projected: bool
    components: list[str]
    layers: list[_Layer]


class _Refuse(_Open):
    path: str
    sha256: str
    metadata: dict[str, str] = {}


class EditEntry(_Open):
    """One edited tensor in ablation.json (and in the manifest of a run under way)."""

    tensor: str
    shard: str
    role: str

    @field_validator("shard")
    @classmethod
    def _plain(cls, v: str) -> str:
        return plain_names([v])[0]


class _Record(_Open):
    version: str
    base_model: str
    base_model_id: str | None = None
    fingerprint: str | None = None  # absent in records of versions before 0.1.0's resume check
    orders: _Orders
    refuse: _Refuse
    counts_by_role: dict[str, int]
    edits: list[EditEntry]


def plain_names(names: list[str]) -> list[str]:
    """For validators: shard names read back must be plain file names."""
    for name in names:
        if not is_plain_name(name):
            raise ValueError(f"{name!r} is not a plain file name inside the checkpoint directory")
    return names


def check(data: dict[str, Any], source: Path, schema: type[BaseModel]) -> None:
    """Validate a dict read back from disk; the first bad key is the error."""
    try:
        schema.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(top)"
        msg = err["msg"].removeprefix("Value error, ")
        raise AblationError(f"{source}: {key}: {msg}") from None


def read(folder: Path) -> dict[str, Any] | None:
    """The folder's ablation.json as the rewriter wrote it, or None when there is none."""
    path = folder / RECORD
    if not path.exists():
        return None
    data = read_json_object(path, "the ablation record")
    check(data, path, _Record)
    return data
