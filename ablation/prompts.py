"""Prompt sets: the built-in harmful/harmless sets (measure and held-out eval parts), user files
(.txt, .json, .jsonl, .csv, .parquet) and Hub datasets."""

from __future__ import annotations

import csv
import json
import logging
import random
from importlib import resources
from pathlib import Path

from ablation.errors import AblationError

LOG = logging.getLogger(__name__)

KINDS = ("harmful", "harmless")
SPLITS = ("measure", "tune", "eval")
SUFFIXES = (".txt", ".json", ".jsonl", ".csv", ".parquet")


def builtin(kind: str, split: str = "measure") -> list[str]:
    """The project's own sets: requests aligned chat models refuse, and matched ordinary ones,
    split by task: measure (what directions are measured on, and what the refusing demo model
    is taught on), tune (what `ablation tune` scores trials on) and eval (held out: the final
    numbers); no task appears in two parts."""
    if kind not in KINDS or split not in SPLITS:
        raise ValueError(f"no built-in set {kind}/{split}")
    text = resources.files("ablation").joinpath("data", f"{kind}_{split}.txt").read_text()
    return [line for line in text.splitlines() if line.strip()]


def load(
    spec: str | None,
    kind: str,
    split: str = "measure",
    field: str = "text",
    max_prompts: int | None = None,
    seed: int = 0,
) -> tuple[list[str], str]:
    """Prompts and a name for where they came from (stored in the .refuse metadata)."""
    if spec is None:
        prompts, source = builtin(kind, split), f"builtin:{kind}_{split}"
    else:
        path = Path(spec).expanduser()
        if path.exists():
            prompts, source = read_file(path, field), str(path)
        elif "/" in spec and not path.suffix:
            prompts, source = _hub_dataset(spec, field), f"hub:{spec}"
        else:
            raise AblationError(f"{spec}: prompt file not found")
    if not prompts:
        raise AblationError(f"{source}: no prompts")
    return sample(prompts, max_prompts, seed), source


def sample(prompts: list[str], n: int | None, seed: int = 0) -> list[str]:
    """A seeded subset in the original order (the same n and seed always give the same set)."""
    if n is None or n >= len(prompts):
        return prompts
    if n <= 0:
        raise AblationError(f"--max-prompts {n}: must be positive")
    keep = sorted(random.Random(seed).sample(range(len(prompts)), n))
    return [prompts[i] for i in keep]


def read_file(path: Path, field: str = "text") -> list[str]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            rows = path.read_text().splitlines()
        elif suffix == ".json":
            data = json.loads(path.read_text())
            if not isinstance(data, list):
                raise AblationError(f"{path}: a .json prompt file must hold a list")
            rows = [_field(r, field, path) for r in data]
        elif suffix == ".jsonl":
            rows = [
                _field(json.loads(line), field, path)
                for line in path.read_text().splitlines()
                if line.strip()
            ]
        elif suffix == ".csv":
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                if field not in (reader.fieldnames or []):
                    raise AblationError(
                        f"{path}: no {field!r} column (columns: {reader.fieldnames})"
                    )
                rows = [r[field] for r in reader]
        elif suffix == ".parquet":
            rows = _parquet(path, field)
        else:
            raise AblationError(
                f"{path}: unsupported prompt file type {suffix!r} "
                f"(use one of {', '.join(SUFFIXES)})"
            )
    except json.JSONDecodeError as exc:
        raise AblationError(f"{path}: not valid JSON ({exc})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise AblationError(f"{path}: cannot read ({exc})") from exc
    prompts = [r.strip() for r in rows if isinstance(r, str) and r.strip()]
    if not prompts:
        raise AblationError(f"{path}: no prompts")
    return prompts


def _field(row: object, field: str, path: Path) -> str:
    if isinstance(row, str):
        return row
    if isinstance(row, dict) and isinstance(row.get(field), str):
        return row[field]
    raise AblationError(f"{path}: an entry has no string {field!r} field: {str(row)[:80]}")


def _parquet(path: Path, field: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise AblationError(
            f"{path}: reading .parquet needs pyarrow (pip install pyarrow)"
        ) from None
    table = pq.read_table(path)
    if field not in table.column_names:
        raise AblationError(f"{path}: no {field!r} column (columns: {table.column_names})")
    return [str(v) for v in table.column(field).to_pylist()]


def _hub_dataset(repo_id: str, field: str) -> list[str]:
    """The first data file of a Hub dataset repo (parquet, jsonl, json or csv)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError

    try:
        root = Path(
            snapshot_download(
                repo_id, repo_type="dataset", allow_patterns=[f"*{s}" for s in SUFFIXES[1:]]
            )
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, HFValidationError, OSError) as exc:
        raise AblationError(
            f"dataset {repo_id!r}: cannot get it from the Hub "
            f"({str(exc).splitlines()[0] if str(exc) else exc!r})"
        ) from exc
    files = sorted(p for s in SUFFIXES[1:] for p in root.rglob(f"*{s}"))
    if not files:
        raise AblationError(f"dataset {repo_id!r} has no data file ({', '.join(SUFFIXES[1:])})")
    LOG.info("dataset %s: reading %s", repo_id, files[0].relative_to(root))
    return read_file(files[0], field)
