"""Hugging Face Hub: resolve a model argument to a local directory; the output's model card."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import yaml
from huggingface_hub import HfApi, ModelCard, ModelCardData, get_token, snapshot_download
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError

from ablation import record as record_mod
from ablation.architecture import READERS
from ablation.checkpoint import read_json_object
from ablation.errors import AblationError
from ablation.system import human_bytes

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


_CACHE_PATH = re.compile(r"models--([^/]+)--([^/]+)/snapshots/")


def hub_id(model: str, model_dir: Path | None = None, override: str | None = None) -> str | None:
    """The base model's Hub id for the card, or None when it cannot be known: --base-model
    first, then the model argument when it is an id, a Hugging Face cache path
    (models--org--name/snapshots/...), or a config _name_or_path that is an id. A local path
    is never taken for an id."""
    if override:
        if not REPO_ID.match(override):
            raise AblationError(f"--base-model {override!r} is not of the form owner/name")
        return override
    if REPO_ID.match(model) and not Path(model).expanduser().exists():
        return model
    for candidate in (model, str(model_dir.resolve()) if model_dir else ""):
        m = _CACHE_PATH.search(candidate)
        if m:
            return f"{m.group(1)}/{m.group(2)}"
    config = (model_dir / "config.json") if model_dir else None
    if config is not None and config.is_file():
        try:
            name = json.loads(config.read_text()).get("_name_or_path", "")
        except (json.JSONDecodeError, OSError):
            name = ""
        if isinstance(name, str) and REPO_ID.match(name) and not Path(name).exists():
            return name
    return None


def base_license(model_dir: Path) -> str | None:
    """The license in the base model's card metadata, if it has one."""
    card = model_dir / "README.md"
    if not card.is_file():
        return None
    try:
        return ModelCard.load(card).data.license
    except (ValueError, OSError, yaml.YAMLError) as exc:
        LOG.debug("cannot read the base model card: %s", exc)
        return None


def model_card(
    record: dict, evaluation: dict | None = None, license: str | None = None
) -> ModelCard:
    """A card that says where the weights came from, what was done to them, and (after
    `ablation evaluate`) what it changed."""
    base = record["base_model"]
    base_id = record.get("base_model_id") or (
        base if REPO_ID.match(base) and not Path(base).exists() else None
    )
    orders = record["orders"]
    data = ModelCardData(
        base_model=base_id,
        license=license,
        tags=["abliterated", "uncensored", "ablation"],
    )
    rows = "\n".join(
        f"| {o['layer']} | {o['measurement']} | {o['scale']:g} | {o['sparsity']:g} | "
        f"{', '.join(o.get('components', orders['components']))} | {o.get('directions', 1)} | "
        f"{o.get('rows', 1.0):g} |"
        for o in orders["layers"]
    )
    edited = ", ".join(f"{k} {v}" for k, v in sorted(record["counts_by_role"].items()))
    meta = record["refuse"].get("metadata", {})
    measured = ", ".join(
        f"{k}: {meta[k]}"
        for k in ("model", "n_harmful", "n_harmless", "position", "projected", "created")
        if meta.get(k)
    )
    sections = [
        f"# {Path(base_id or base).name}, abliterated",
        "The refusal direction was removed from "
        + (
            f"[`{base_id}`](https://huggingface.co/{base_id})"
            if base_id
            else f"`{Path(base).name}`"
        )
        + f" with ablation {record['version']} ("
        + ("biprojected" if orders["projected"] else "plain")
        + " direction): "
        + _what_was_edited(orders)
        + ", streamed shard by shard through the safetensors checkpoint.",
        f"Edited tensors by role: {edited}.",
        "| layer | measurement | scale | sparsity | components | directions | rows |\n"
        f"|---|---|---|---|---|---|---|\n{rows}",
        f"Measurement (`.refuse`, sha256 `{record['refuse']['sha256'][:16]}...`): {measured}.",
    ]
    if evaluation and evaluation.get("mode") == "streamed":
        ft = evaluation["first_token"]
        rs, kl = ft["refusal_score"], ft["kl"]
        sections.append(
            "## Evaluation (first token only, models streamed layer by layer)\n\n"
            "| | base | abliterated |\n|---|---|---|\n"
            f"| probability of a refusal opener ({rs['n_harmful']} held-out harmful prompts) | "
            f"{rs['base']:.1%} | {rs['ablated']:.1%} |\n"
            f"| KL(base \\|\\| abliterated), first token, harmless prompts | - | "
            f"{kl['mean']:.4f} |"
        )
    elif evaluation:
        b, a, kl = evaluation["base"], evaluation["ablated"], evaluation["kl"]
        rows = [
            f"| refusal rate ({b['n_harmful']} held-out harmful prompts) | "
            f"{b['refusal_rate']:.1%} | {a['refusal_rate']:.1%} |",
        ]
        if "answer_kl" in evaluation:
            rows += [
                f"| answered (no refusal, not degenerate) | {b['compliance_rate']:.1%} | "
                f"{a['compliance_rate']:.1%} |",
                f"| degenerate answers, harmless prompts | {b['degenerate_harmless_rate']:.1%} | "
                f"{a['degenerate_harmless_rate']:.1%} |",
                f"| degenerate answers, harmful prompts | {b['degenerate_harmful_rate']:.1%} | "
                f"{a['degenerate_harmful_rate']:.1%} |",
            ]
        rows.append(
            f"| KL(base \\|\\| abliterated), first token, harmless prompts | - | {kl['mean']:.4f} |"
        )
        if "mean_base_answered" in kl:  # older eval.json files lack it
            rows.append(
                "| the same, only the harmless prompts the base answers | - | "
                f"{kl['mean_base_answered']:.4f} |"
            )
        if "answer_kl" in evaluation:
            rows.append(
                "| KL per token along the base's own harmless answers | - | "
                f"{evaluation['answer_kl']['mean']:.4f} |"
            )
        sections.append(
            "## Evaluation\n\n| | base | abliterated |\n|---|---|---|\n" + "\n".join(rows)
        )
    sections.append("The full record (resolved orders, every edited tensor) is in `ablation.json`.")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


def _what_was_edited(orders: dict) -> str:
    """Readers get the exact input-side edit whatever the method; say so."""
    used = {c for o in orders["layers"] for c in o.get("components", orders["components"])}
    used |= set(orders["components"]) & {"embed"}
    readers = [c for c in (*READERS, "router") if c in used]
    writers = sorted(used - set(readers))
    parts = []
    if writers:
        parts.append(f"a {orders['method']} edit of the writers ({', '.join(writers)})")
    if readers:
        parts.append(
            f"an input-side edit of the readers ({', '.join(readers)}), which stop reading "
            "the direction"
        )
    return " and ".join(parts) or "no tensor"


PUBLISH_SKIP = (".ablation-progress.json",)
LARGE_FOLDER = 5 * 10**9


def checkpoint_files(folder: Path) -> list[Path]:
    files = [
        p
        for p in sorted(folder.rglob("*"))
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and not p.name.endswith(".partial")
        and p.name not in PUBLISH_SKIP
    ]
    names = {p.name for p in files}
    if "config.json" not in names or not (
        "model.safetensors" in names or "model.safetensors.index.json" in names
    ):
        raise AblationError(
            f"{folder} is not a checkpoint (needs config.json and "
            "model.safetensors or model.safetensors.index.json)"
        )
    return files


def publish(
    folder: Path, repo_id: str, private: bool = False, dry_run: bool = False, echo=print
) -> None:
    """Write the final card, then upload the folder (resumable for large ones)."""
    if not REPO_ID.match(repo_id):
        raise AblationError(f"repo id {repo_id!r} is not of the form owner/name")
    if not folder.is_dir():
        raise AblationError(f"{folder} is not a directory")
    files = checkpoint_files(folder)
    record = record_mod.read(folder)
    if record is not None:
        evaluation = None
        if (folder / "eval.json").exists():
            evaluation = read_json_object(folder / "eval.json", "the evaluation")
        try:
            card = model_card(
                record,
                evaluation,
                base_license(folder.joinpath("README.base.md"))
                if (folder / "README.base.md").exists()
                else None,
            )
        except (KeyError, TypeError) as exc:  # ablation.json is checked; eval.json is not
            raise AblationError(
                f"{folder / 'eval.json'}: not an evaluation this tool wrote (at {exc})"
            ) from None
    else:
        card = None
        LOG.warning("%s has no ablation.json: its README.md is published as it is", folder)
    total = sum(p.stat().st_size for p in files)
    echo(f"repo       {repo_id} ({'private' if private else 'public'})")
    for p in files:
        echo(f"file       {human_bytes(p.stat().st_size):>10}  {p.relative_to(folder)}")
    echo(f"total      {human_bytes(total):>10}  in {len(files)} files")
    if dry_run:
        if card is not None:
            echo("card:\n" + str(card))
        echo("dry run: nothing sent")
        return
    token = get_token()
    if not token:
        raise AblationError("no Hugging Face token: run `hf auth login` or set HF_TOKEN")
    if card is not None:
        card.save(folder / "README.md")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if total > LARGE_FOLDER:
            api.upload_large_folder(
                repo_id=repo_id,
                folder_path=folder,
                repo_type="model",
                private=private,
                ignore_patterns=["*.partial", *PUBLISH_SKIP],
            )
        else:
            api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                repo_type="model",
                commit_message="Upload abliterated model",
                ignore_patterns=["*.partial", *PUBLISH_SKIP],
            )
    except HfHubHTTPError as exc:
        raise AblationError(f"upload to {repo_id} failed: {str(exc).splitlines()[0]}") from exc
    echo(f"published  https://huggingface.co/{repo_id}")
