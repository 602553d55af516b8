"""Hugging Face Hub: resolve a model argument to a local directory; the output's model card."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData, snapshot_download
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError

from ablation import __version__
from ablation.errors import AblationError

LOG = logging.getLogger(__name__)

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# weights, config, tokenizer, chat template, custom code: what a loadable checkpoint needs
CHECKPOINT_FILES = [
    "*.safetensors",
    "*.safetensors.index.json",
    "*.json",
    "*.py",
    "*.txt",
    "*.model",
    "*.tiktoken",
    "*.jinja",
    "tokenizer*",
    "README.md",
    "LICENSE*",
]


def resolve_model(spec: str) -> Path:
    """A local directory as is; otherwise a Hub repo id, downloaded (or taken from the cache
    when HF_HUB_OFFLINE is set) with only the files a checkpoint needs."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if not REPO_ID.match(spec):
        raise AblationError(f"model {spec!r} is neither a local directory nor a Hub repo id")
    LOG.info("resolving %s on the Hugging Face Hub", spec)
    try:
        return Path(snapshot_download(spec, allow_patterns=CHECKPOINT_FILES))
    except (HfHubHTTPError, LocalEntryNotFoundError, HFValidationError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise AblationError(f"model {spec!r}: cannot get it from the Hub ({first})") from exc


def model_card(base_model: str, orders_table: list[dict], counts: dict[str, int]) -> ModelCard:
    """A card that says where the weights came from and what was done to them."""
    data = ModelCardData(
        base_model=base_model if REPO_ID.match(base_model) else None,
        tags=["abliterated", "uncensored", "ablation"],
    )
    rows = "\n".join(
        f"| {o['layer']} | {o['measurement']} | {o['scale']:g} | {o['sparsity']:g} |"
        for o in orders_table
    )
    edited = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    content = (
        f"---\n{data.to_yaml()}\n---\n\n# {Path(base_model).name} (abliterated)\n\n"
        f"The refusal direction was removed from `{base_model}` with "
        f"[ablation](https://pypi.org/project/ablation/) {__version__}.\n\n"
        f"Tensors edited per role: {edited}.\n\n"
        "| layer | measurement | scale | sparsity |\n|---|---|---|---|\n"
        f"{rows}\n\nThe full record is in `ablation.json`.\n"
    )
    return ModelCard(content)
