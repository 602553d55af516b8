"""Plan (which tensor of which shard gets which edit) and the streaming executor.

Execution streams each shard into NAME.partial with kernel copies, in file order, while the
edited tensors are read behind the copy (from the page cache), edited on the device and written
back over their byte ranges: memory is bounded by a few times the largest edited tensor plus one
compute chunk, whatever the shard or model size. A shard is fsynced and renamed in a background
worker while the next one streams; a progress manifest lets --resume skip shards already
complete.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import torch
from pydantic import BaseModel, ConfigDict, field_validator
from safetensors.torch import save_file
from tqdm import tqdm

from ablation import __version__, directions, edits, lock, quant, refuse
from ablation import record as record_mod
from ablation.architecture import READERS, Architecture, Norm, Target, resolve
from ablation.checkpoint import (
    INDEX_NAME,
    ShardFiles,
    ShardIndex,
    TensorInfo,
    copy_file,
    copy_range,
    open_index,
    read_header,
    read_json_object,
    read_tensor,
    write_tensor,
)
from ablation.errors import AblationError
from ablation.hub import base_license, hub_id, model_card
from ablation.orders import LayerOrder, Orders
from ablation.system import human_bytes, peak_rss, pin_mmap_threshold

LOG = logging.getLogger(__name__)

MANIFEST = ".ablation-progress.json"
HEAD_SHARD = "model-head-abliterated.safetensors"  # an untied output head, when tied
RECORD = record_mod.RECORD
PARTIAL = ".partial"
SKIP_DIRS = {".git", ".cache", ".huggingface"}


@dataclass(frozen=True)
class Edit:
    target: Target
    direction: str  # key into Plan.directions
    measurement: int
    scale: float
    norm_preserving: bool
    rows: float = 1.0

    def spec(self, compute_dtype: torch.dtype = torch.float32) -> edits.EditSpec:
        return edits.EditSpec(self.scale, self.norm_preserving, compute_dtype, self.rows)


@dataclass
class Plan:
    model_dir: Path
    arch: Architecture
    orders: Orders
    measurements: refuse.Measurements
    refuse_sha256: str
    directions: dict[str, torch.Tensor]  # key -> [hidden] unit direction or [k, hidden] basis
    shards: dict[str, list[Edit]]  # shard -> edits in byte order; every shard is a key
    warnings: list[str] = field(default_factory=list)
    # edits written as new tensors into HEAD_SHARD (an output head tied to the embeddings)
    extra: list[Edit] = field(default_factory=list)

    @property
    def index(self) -> ShardIndex:
        return self.arch.index

    @property
    def edits(self) -> list[Edit]:
        return [e for es in self.shards.values() for e in es] + self.extra

    def counts_by_role(self) -> dict[str, int]:
        return dict(Counter(e.target.role for e in self.edits))

    def counts_by_layer(self) -> dict[str, dict[str, int]]:
        out: dict[str, Counter] = {}
        for e in self.edits:
            key = "embed" if e.target.layer is None else str(e.target.layer)
            out.setdefault(key, Counter())[e.target.role] += 1
        order = sorted(out, key=lambda k: -1 if k == "embed" else int(k))
        return {k: dict(out[k]) for k in order}

    def fingerprint(self) -> str:
        """Changes whenever the bytes the plan would write could change."""
        orders = self.orders.as_dict()
        orders.pop("output")
        orders.pop("source")
        payload = json.dumps(
            {
                "orders": orders,
                "refuse": self.refuse_sha256,
                "version": __version__,
                "tensors": sorted((e.target.name, e.target.info.start) for e in self.edits),
                "shards": {n: h.size for n, h in self.index.shards.items()},
            },
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()

    def describe(self) -> list[str]:
        a = self.arch
        lines = [
            f"model      {self.model_dir} ({a.family.family} table, model_type {a.model_type!r}, "
            f"{a.num_layers} layers, hidden {a.hidden_size}"
            + (f", {a.num_experts} experts" if a.num_experts else "")
            + ")",
            f"method     {self.orders.method}, projected={self.orders.projected}, "
            f"components={','.join(self.orders.components)}",
            f"shards     {sum(1 for es in self.shards.values() if es)} of {len(self.shards)} "
            f"edited, {human_bytes(self.index.total_bytes)} in all",
        ]
        for layer, roles in self.counts_by_layer().items():
            order = next((o for o in self.orders.layers if str(o.layer) == layer), None)
            src = f" from measurement {order.measurement}, scale {order.scale:g}" if order else ""
            lines.append(f"layer {layer:>4} {_roles(roles)}{src}")
        lines.append(f"total      {len(self.edits)} tensors: {_roles(self.counts_by_role())}")
        packed = [e for e in self.edits if e.target.scale is not None]
        if packed and a.quant is not None:
            lines.append(
                f"quantized  {len(packed)} of them {a.quant.name} ({a.quant.grid.name})"
                + (", power-of-two scales" if a.quant.ue8m0 else "")
                + ": dequantized, edited, requantized with their scales (error feedback)"
            )
        return lines


def _roles(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise AblationError(
            f"{model_dir}: no config.json (not a Hugging Face checkpoint)"
        ) from None
    except json.JSONDecodeError as exc:
        raise AblationError(f"{path}: not valid JSON ({exc})") from exc


def open_model(model_dir: Path, meas: refuse.Measurements, meas_path: Path) -> Architecture:
    """The checkpoint's headers bound to its family table, checked against a measurement."""
    arch = resolve(read_config(model_dir), open_index(model_dir))
    if meas.hidden_size != arch.hidden_size:
        raise AblationError(
            f"{meas_path}: hidden size {meas.hidden_size} does not match the model's "
            f"{arch.hidden_size} ({model_dir})"
        )
    return arch


@dataclass(frozen=True)
class Sources:
    """What every plan of one model and one measurement reads: loaded once by a caller that
    plans many times (the search)."""

    measurements: refuse.Measurements
    refuse_sha256: str
    arch: Architecture


def open_sources(model_dir: Path, measurements_path: Path) -> Sources:
    meas = refuse.load(measurements_path)
    return Sources(
        meas, refuse.sha256_of(measurements_path), open_model(model_dir, meas, measurements_path)
    )


def build_plan(
    orders: Orders, model_dir: Path, measurements_path: Path, sources: Sources | None = None
) -> Plan:
    """Everything is validated here, before a byte is written."""
    src = sources or open_sources(model_dir, measurements_path)
    arch = src.arch
    plan = Plan(
        model_dir,
        arch,
        orders,
        src.measurements,
        src.refuse_sha256,
        {},
        {name: [] for name in arch.index.shards},
    )
    with ShardFiles(model_dir) as files:
        for order in orders.layers:
            _plan_layer(plan, order, files)
        if "embed" in orders.components:
            _plan_embed(plan, files)
        if any("head" in o.components for o in orders.layers):
            _plan_head(plan, files)
    for edits_ in plan.shards.values():
        edits_.sort(key=lambda e: e.target.info.start)
    if not plan.edits:
        raise AblationError(
            f"{orders.source}: the orders select no tensor to edit "
            f"(components: {', '.join(orders.components)})"
        )
    return plan


def _direction(plan: Plan, order: LayerOrder, target_layer: int, what: str) -> torch.Tensor:
    """The unit direction [hidden] (or the orthonormal basis [k, hidden]) one order applies at
    one target layer."""
    meas, orders = plan.measurements, plan.orders
    where = orders.where(order)
    if order.measurement not in meas.layers:
        raise AblationError(
            f"{where}: measurement {order.measurement} is not in the .refuse file "
            f"(it has {min(meas.layers)}-{max(meas.layers)})"
        )
    harmless = None
    if orders.projected:
        if target_layer not in meas.layers:
            raise AblationError(
                f"{where}: projected orders need the harmless mean of layer {target_layer}, "
                "which the .refuse file lacks (or set projected: false)"
            )
        harmless = meas.layers[target_layer].harmless
    m = meas.layers[order.measurement]
    if order.directions > 1:
        return directions.target_basis(
            m.basis,
            harmless,
            order.directions,
            f"{where}: {what} (measurement {order.measurement})",
        )
    return directions.target_direction(m.refusenorm, harmless, order.sparsity, f"{where}: {what}")


def _plan_layer(plan: Plan, order: LayerOrder, files: ShardFiles) -> None:
    arch, orders = plan.arch, plan.orders
    if order.clip and order.layer >= arch.num_layers:
        return  # the flank of a kernel peaking near the last layer
    if order.layer >= arch.num_layers:
        raise AblationError(
            f"{orders.where(order)}: layer {order.layer} is out of range "
            f"(the model has layers 0-{arch.num_layers - 1})"
        )
    r = _direction(plan, order, order.layer, f"direction for layer {order.layer}")
    key = f"layer{order.layer}" + (
        "" if order.components == orders.components else f"@{order.line}"
    )
    plan.directions[key] = r
    try:
        targets = arch.targets(order.layer)
    except AblationError as exc:
        raise AblationError(f"{orders.where(order)}: {exc}") from None
    chosen = [t for t in targets if _selected(t, order.components)]
    wanted_readers = [c for c in order.components if c in READERS]
    if arch.family.no_readers and (wanted_readers or "router" in order.components):
        if wanted_readers:
            raise AblationError(
                f"{orders.where(order)}: {', '.join(wanted_readers)}: {arch.family.no_readers}; "
                f"layer {order.layer} holds: " + ", ".join(arch.layer_tensors(order.layer)[:12])
            )
        note = f"routers are not edited: {arch.family.no_readers}"
        if note not in plan.warnings:
            plan.warnings.append(note)
    if wanted_readers and not any(t.component in wanted_readers for t in chosen):
        raise AblationError(
            f"{orders.where(order)}: layer {order.layer}: no {' or '.join(wanted_readers)} "
            f"tensor found with the {arch.family.family} table; the layer holds: "
            + ", ".join(arch.layer_tensors(order.layer)[:12])
        )
    for t in chosen:
        _add(plan, t, key, r, order, files)


def _plan_embed(plan: Plan, files: ShardFiles) -> None:
    """Embeddings write the residual stream entering layer 0; they take the settings of the
    lowest ordered layer, projected against the harmless mean at index 0."""
    first = plan.orders.layers[0]
    r = _direction(plan, first, 0, "direction for embeddings")
    plan.directions["embed"] = r
    targets = plan.arch.global_targets()
    if not targets:
        raise AblationError("components include embed, but no embedding tensor was found")
    if plan.arch.tie_embeddings:
        plan.warnings.append("embeddings are tied to lm_head: the output head changes too")
    for t in targets:
        _add(plan, t, "embed", r, first, files)


def _plan_head(plan: Plan, files: ShardFiles) -> None:
    """The output head reads the stream after the last layer through the final norm; it takes
    the settings of the highest layer ordered with it, projected against the last layer's
    harmless mean (the last one measured). A head tied to the embeddings is written as a new
    tensor and the output unties the two: the embeddings must stay as they are."""
    last = max((o for o in plan.orders.layers if "head" in o.components), key=lambda o: o.layer)
    n = plan.arch.num_layers
    r = _direction(plan, last, n - 1, "direction for the output head")
    plan.directions["head"] = r
    t = plan.arch.head_target()
    if t.write_as is not None:
        if t.scale is not None:
            raise AblationError(
                f"the output head is tied to {t.name!r}, which is quantized: an untied copy "
                "cannot be written in its format; dequantize the embeddings first"
            )
        plan.warnings.append(
            f"the output head is tied to {t.name}: its edited copy is written as {t.write_as} "
            f"in {HEAD_SHARD} and the config unties the two"
        )
    _add(plan, t, "head", r, last, files)


def _selected(t: Target, components: tuple[str, ...]) -> bool:
    return t.component in components and (not t.is_bias or "biases" in components)


def _add(
    plan: Plan, t: Target, key: str, r: torch.Tensor, order: LayerOrder, files: ShardFiles
) -> None:
    if t.is_reader:  # the exact input-side edit behind its norms (an oblique projection)
        key = f"{key}:in:" + ",".join(n.name for n in t.norms)
        if key not in plan.directions:
            gains = [_gain(n, files, plan) for n in t.norms]
            plan.directions[key] = directions.reader_pair(r, gains)
    elif t.norms:
        key = f"{key}:" + ",".join(n.name for n in t.norms)
        if key not in plan.directions:
            gains = [_gain(n, files, plan) for n in t.norms]
            plan.directions[key] = directions.norm_direction(r, gains)
    oblique = plan.directions[key].ndim == 3
    (plan.extra if t.write_as else plan.shards[t.info.shard]).append(
        Edit(
            t,
            key,
            order.measurement,
            order.scale,
            plan.orders.norm_preserving and not t.is_bias and not oblique,
            1.0 if t.is_bias else order.rows,
        )
    )


def _gain(norm: Norm, files: ShardFiles, plan: Plan) -> directions.Gain:
    return directions.Gain(files.read(plan.index.tensors[norm.name]), norm.offset, norm.centred)


def pick_device(requested: str | None) -> torch.device:
    if requested:
        try:
            dev = torch.device(requested)
        except RuntimeError as exc:
            raise AblationError(f"--device {requested!r}: {exc}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise AblationError("--device cuda, but torch sees no CUDA device")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass
class Options:
    device: torch.device
    compute_dtype: torch.dtype = torch.float32
    link: bool = False
    overwrite: bool = False
    resume: bool = False
    base_model: str | None = None  # the base model's Hub id for the card (--base-model)


@dataclass
class Summary:
    bytes_written: int
    seconds: float
    peak_rss: int
    edited: dict[str, int]
    shards_skipped: int
    already_complete: bool = False
    residue: dict[str, dict[str, float]] = field(default_factory=dict)  # float8 edits, by role

    def lines(self) -> list[str]:
        if self.already_complete:
            return [
                "complete   the output already holds these orders' rewrite, every file in "
                "place: nothing written"
            ]
        rate = self.bytes_written / max(self.seconds, 1e-9)
        return [
            f"wrote      {human_bytes(self.bytes_written)} in {self.seconds:.1f} s "
            f"({human_bytes(rate)}/s); peak RSS {human_bytes(self.peak_rss)}",
            f"edited     {_roles(self.edited)}"
            + (
                f"; {self.shards_skipped} shards already complete (resumed)"
                if self.shards_skipped
                else ""
            ),
        ] + [
            f"quantized  {role}: |r.v|/|v| {r['stored']:.1e} stored (bf16 would leave "
            f"{r['bf16']:.1e}; round-to-nearest {r['rtn']:.1e})"
            for role, r in self.residue.items()
        ]


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def _check_output_path(plan: Plan, out: Path) -> None:
    if _is_within(out, plan.model_dir) or _is_within(plan.model_dir, out):
        raise AblationError(
            f"output {out} overlaps the input {plan.model_dir}; choose a separate directory"
        )
    if out.exists() and not out.is_dir():
        raise AblationError(f"output {out} exists and is not a directory")


class _Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fingerprint: str
    complete: dict[str, int]
    records: list[record_mod.EditEntry] = []

    @field_validator("complete")
    @classmethod
    def _plain(cls, v: dict[str, int]) -> dict[str, int]:
        record_mod.plain_names(list(v))
        return v


def _prepare_output(plan: Plan, out: Path, opts: Options) -> dict | None:
    """Check the output directory (locked by this run); return the resume manifest (empty
    when starting fresh), or None when --resume finds the output already complete."""
    fresh = {"fingerprint": plan.fingerprint(), "complete": {}}
    if not any(p.name != lock.LOCK for p in out.iterdir()):
        return fresh
    manifest_path = out / MANIFEST
    if opts.resume:
        if not manifest_path.is_file():
            _check_complete(plan, out, fresh["fingerprint"])
            return None
        manifest = read_json_object(manifest_path, "the progress manifest")
        record_mod.check(manifest, manifest_path, _Manifest)
        if manifest["fingerprint"] != fresh["fingerprint"]:
            raise AblationError(
                f"--resume: {out} was written with other orders, "
                "measurements or model; use --overwrite"
            )
        return _trust_but_check(plan, out, manifest)
    if not opts.overwrite:
        raise AblationError(
            f"output {out} is not empty (use --overwrite, or --resume to finish an interrupted run)"
        )
    for p in out.iterdir():
        if (p.is_file() or p.is_symlink()) and (
            p.suffix in {".safetensors", PARTIAL} or p.name == MANIFEST
        ):
            p.unlink()
    return fresh


def _trust_but_check(plan: Plan, out: Path, manifest: dict) -> dict:
    """A shard the manifest calls complete is kept only if it is still there, whole: one
    deleted or truncated since is written again."""
    done = manifest["complete"]
    for shard in list(done):
        final = out / shard
        want = plan.index.shards[shard].size if shard in plan.index.shards else None
        if want is None or not final.is_file() or final.stat().st_size != want:
            LOG.warning("%s: listed as complete but missing or cut short: written again", final)
            del done[shard]
    manifest["records"] = [r for r in manifest.get("records", []) if r.get("shard") in done]
    return manifest


def _check_complete(plan: Plan, out: Path, fingerprint: str) -> None:
    """--resume on an output whose run finished (the manifest goes last): fine when the record
    is of these very orders and every file is in place."""
    rec = record_mod.read(out)
    if rec is None:
        raise AblationError(
            f"--resume: {out} has neither {MANIFEST} nor {RECORD} (not a run of this tool)"
        )
    if rec.get("fingerprint") != fingerprint:
        what = (
            "other orders, measurements or model"
            if rec.get("fingerprint")
            else "a version of this tool that did not record its plan"
        )
        raise AblationError(f"--resume: {out} is a complete output of {what}; use --overwrite")
    missing = [
        name
        for name, header in plan.index.shards.items()
        if not _same_header(out / name, header.tensors, header.size)
    ]
    if plan.extra and not (out / HEAD_SHARD).is_file():
        missing.append(HEAD_SHARD)
    aux = [_aux_destination(plan.model_dir, out, p) for p in _aux_files(plan.model_dir, plan.index)]
    missing += [str(p.relative_to(out)) for p in aux if not p.is_file()]
    if not (out / "README.md").is_file():
        missing.append("README.md")
    if missing:
        raise AblationError(
            f"--resume: {out} was completed with these orders, but "
            f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} "
            f"{'is' if len(missing) == 1 else 'are'} missing or altered; use --overwrite"
        )


def _same_header(path: Path, tensors: dict, size: int) -> bool:
    if not path.is_file():
        return False
    try:
        header = read_header(path)
    except AblationError:
        return False
    return header.size == size and header.tensors == tensors


def _aux_destination(model_dir: Path, out: Path, p: Path) -> Path:
    if p.name == "README.md" and p.parent == model_dir:
        return out / "README.base.md"  # the card takes README.md; nothing is lost
    return out / p.relative_to(model_dir)


def _aux_files(model_dir: Path, index: ShardIndex) -> list[Path]:
    out = []
    for root, dirs, files in os.walk(model_dir):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        for f in sorted(files):
            p = Path(root) / f
            rel = p.relative_to(model_dir)
            if str(rel) in index.shards or f.endswith(PARTIAL) or f in (MANIFEST, lock.LOCK):
                continue
            out.append(p)
    return out


def _check_space(out: Path, need: int) -> None:
    free = shutil.disk_usage(out).free
    if need > free:
        raise AblationError(
            f"output {out}: needs {human_bytes(need)}, only {human_bytes(free)} free"
        )


def _fresh(path: Path) -> Path:
    """Make room for a new file at `path`: whatever is there (a stale partial, a symlink into
    someone's blobs) is unlinked, never written through."""
    path.unlink(missing_ok=True)
    return path


def _write_file(path: Path, data: bytes) -> None:
    """Write a small file whole or not at all, as a new inode (never through a link)."""
    tmp = _fresh(path.with_name(path.name + PARTIAL))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _write_json(path: Path, data: dict) -> None:
    _write_file(path, json.dumps(data, indent=2).encode())


def execute(plan: Plan, out: Path, opts: Options) -> Summary:
    """Write the plan into `out`, holding the output's lock throughout. A write that fails
    (disk full, quota, I/O error) stops the run with one line; the shards already complete
    stay listed in the manifest, the one being written is removed, and --resume finishes."""
    _check_output_path(plan, out)
    with lock.hold(out):
        manifest = _prepare_output(plan, out, opts)
        if manifest is None:
            return Summary(0, 0.0, peak_rss(), {}, len(plan.shards), already_complete=True)
        try:
            return _stream(plan, out, opts, manifest)
        except OSError as exc:
            for shard in plan.shards:  # the threads are done: no partial is open any more
                if shard not in manifest["complete"]:
                    (out / (shard + PARTIAL)).unlink(missing_ok=True)
            (out / (MANIFEST + PARTIAL)).unlink(missing_ok=True)
            raise _write_error(exc, out, manifest) from exc


def _write_error(exc: OSError, out: Path, manifest: dict) -> AblationError:
    where = exc.filename or out
    done = len(manifest["complete"])
    kept = f"the {done} complete shard{'s' if done != 1 else ''} kept" if done else "nothing kept"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return AblationError(
            f"{where}: {exc.strerror} ({kept}); free some space, then run the same command "
            "with --resume"
        )
    return AblationError(
        f"{where}: {exc.strerror} ({kept}); once fixed, run the same command with --resume"
    )


def _stream(plan: Plan, out: Path, opts: Options, manifest: dict) -> Summary:
    pin_mmap_threshold()
    if opts.device.type == "cpu":
        # leave a core to the copy and writer threads, unless float8 edits make the run
        # compute-bound (their rounding costs several times the edit itself)
        quantized = any(e.target.scale is not None for e in plan.edits)
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - (0 if quantized else 1)))
    LOG.info("device %s, compute in %s", opts.device, opts.compute_dtype)
    done: dict = manifest["complete"]
    todo = [s for s in plan.shards if s not in done]
    aux = _aux_files(plan.model_dir, plan.index)
    for name in plan.index.unindexed:
        LOG.warning("%s is not in the index: copied unchanged (not ablated)", name)
    shard_bytes = {s: plan.index.shards[s].size for s in todo}
    deferred = _deferred_scales(plan, opts, todo)
    need = sum(
        b for s, b in shard_bytes.items() if plan.shards[s] or s in deferred or not opts.link
    )
    _check_space(out, need + sum(p.stat().st_size for p in aux))
    _write_json(out / MANIFEST, manifest)

    proc = psutil.Process()
    peak = proc.memory_info().rss
    records: list[dict] = manifest.setdefault("records", [])
    start = time.perf_counter()
    written = 0

    def complete(partial: Path | None, final: Path, shard: str, new: list[dict]) -> None:
        """fsync, rename, record: a shard gets its final name only once it is on disk, and the
        manifest names it only after that. One worker runs these in order, so a shard's
        flush overlaps the next shard's reading and writing."""
        if partial is not None:
            try:
                with open(partial, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(partial, final)
            except OSError as exc:
                raise OSError(exc.errno, exc.strerror, str(partial)) from exc
        records.extend(new)
        done[shard] = shard_bytes[shard]
        _write_json(out / MANIFEST, manifest)

    with (
        tqdm(
            total=sum(shard_bytes.values()),
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc="rewrite",
            disable=None,
        ) as bar,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="fsync") as finisher,
    ):
        finishing: list = []
        for shard in todo:
            src, final = plan.model_dir / shard, out / shard
            partial = _fresh(final.with_name(final.name + PARTIAL))
            edits_, extra = plan.shards[shard], deferred.get(shard, [])
            new: list[dict] = []
            if not edits_ and not extra and opts.link and _try_link(src, final):
                bar.update(shard_bytes[shard])
                partial = None
            else:
                if edits_ or extra:
                    bar.set_postfix_str(shard, refresh=False)
                    new = _write_shard(plan, src, partial, edits_, opts, bar.update, extra)
                    peak = max(peak, proc.memory_info().rss)
                else:
                    copy_file(src, partial, bar.update)
                written += shard_bytes[shard]
            finishing.append(finisher.submit(complete, partial, final, shard, new))
            for f in [f for f in finishing if f.done()]:
                f.result()  # a failed fsync or rename stops the run here
                finishing.remove(f)
        for f in finishing:
            f.result()
    if plan.extra and HEAD_SHARD not in done:
        new, size = _write_untied(plan, out, opts)
        records.extend(new)
        done[HEAD_SHARD] = size
        _write_json(out / MANIFEST, manifest)
        written += size
    rewritten = _untied_files(plan) if plan.extra else {}
    for p in aux:
        dst = _aux_destination(plan.model_dir, out, p)
        dst.parent.mkdir(parents=True, exist_ok=True)
        rel = str(p.relative_to(plan.model_dir))
        if rel in rewritten:
            _write_file(dst, rewritten.pop(rel))
            written += dst.stat().st_size
            continue
        tmp = _fresh(dst.with_name(dst.name + PARTIAL))
        shutil.copyfile(p, tmp)
        os.replace(tmp, dst)
        written += p.stat().st_size
    for rel, data in rewritten.items():  # an index for a single-file checkpoint
        _write_file(out / rel, data)
    _finish(plan, out, opts, records)
    peak = max(peak, peak_rss())
    return Summary(
        written,
        time.perf_counter() - start,
        peak,
        Counter(r["role"] for r in records),
        len(plan.shards) - len(todo),
        residue=residue_by_role(records),
    )


def _write_untied(plan: Plan, out: Path, opts: Options) -> tuple[list[dict], int]:
    """The edited copies of tied tensors (the output head), as a new shard of their own."""
    tensors: dict[str, torch.Tensor] = {}
    records = []
    with ShardFiles(plan.model_dir) as files:
        for e in plan.extra:
            assert e.target.write_as is not None
            new, record = _edit(plan, e, {"weight": files.read(e.target.info)}, opts)
            record.update(tensor=e.target.write_as, shard=HEAD_SHARD, source=e.target.name)
            records.append(record)
            tensors[e.target.write_as] = new[0][1].contiguous()
    final = out / HEAD_SHARD
    partial = _fresh(final.with_name(final.name + PARTIAL))
    save_file(tensors, str(partial), metadata={"format": "pt"})
    with open(partial, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(partial, final)
    return records, final.stat().st_size


def _untied_files(plan: Plan) -> dict[str, bytes]:
    """config.json with the head untied from the embeddings (top level and text_config), and
    the index with the head's new shard (written for a single-file checkpoint too)."""
    config = read_config(plan.model_dir)
    config["tie_word_embeddings"] = False
    if isinstance(config.get("text_config"), dict):
        config["text_config"]["tie_word_embeddings"] = False
    index = plan.index
    name = index.index_file.name if index.index_file else INDEX_NAME
    if index.index_file is not None:
        body = read_json_object(index.index_file, "the index")
    else:
        body = {"metadata": {}, "weight_map": {t: i.shard for t, i in index.tensors.items()}}
    extra = {e.target.write_as: e.target.info.nbytes for e in plan.extra}
    body.setdefault("weight_map", {}).update(dict.fromkeys(extra, HEAD_SHARD))
    meta = body.setdefault("metadata", {})
    if isinstance(meta.get("total_size"), int):
        meta["total_size"] += sum(extra.values())
    return {
        "config.json": json.dumps(config, indent=2).encode(),
        name: json.dumps(body, indent=2).encode(),
    }


def _try_link(src: Path, dst: Path) -> bool:
    try:
        os.link(src, _fresh(dst))  # a symlinked source (a Hub cache snapshot): its blob
        return True
    except OSError as exc:
        LOG.warning("cannot hard-link %s (%s): copying instead", src.name, exc.strerror)
        return False


class _Budget:
    """Bytes of edited tensors waiting to be written: the editor waits while it is full."""

    def __init__(self, limit: int) -> None:
        self.limit, self.held = limit, 0
        self.cv = threading.Condition()

    def take(self, n: int) -> None:
        with self.cv:
            self.cv.wait_for(lambda: self.held == 0 or self.held + n <= self.limit)
            self.held += n

    def give(self, n: int) -> None:
        with self.cv:
            self.held -= n
            self.cv.notify_all()


class _Mark:
    """How far the kernel copy of a shard has got; edits wait until it has passed them."""

    def __init__(self) -> None:
        self.pos, self.failed, self.stopped = 0, False, False
        self.cv = threading.Condition()

    def stop(self) -> None:
        self.stopped = True

    def advance(self, pos: int) -> None:
        with self.cv:
            self.pos = pos
            self.cv.notify_all()

    def fail(self) -> None:
        with self.cv:
            self.failed = True
            self.cv.notify_all()

    def wait(self, pos: int) -> bool:
        with self.cv:
            self.cv.wait_for(lambda: self.failed or self.pos >= pos)
            return not self.failed


COPY_STEP = 256 << 20


Write = tuple[TensorInfo, torch.Tensor]  # new bytes for one tensor's byte range


def _write_shard(
    plan: Plan,
    src: Path,
    partial: Path,
    edits_: list[Edit],
    opts: Options,
    progress,
    extra: list[Write] | None = None,
) -> list[dict]:
    """A copy thread streams the whole shard into NAME.partial with kernel copies, in file
    order, as cp does; this thread follows behind it, reading each edited tensor once the copy
    has passed it (so from the page cache, not the disk), editing it on the device, and handing
    it to a writer thread that overwrites its byte range, usually before the copied pages
    reach the disk. At most twice the largest edited tensor waits to be written. `extra` are
    writes computed beforehand (the scales of float8 weights that live in other shards)."""
    extra = extra or []
    size = plan.index.shards[src.name].size
    largest = max([_nbytes(e) for e in edits_] + [i.nbytes for i, _ in extra] + [1])
    budget = _Budget(2 * largest)
    mark = _Mark()
    records = []
    fd_in = os.open(src, os.O_RDONLY)
    fd_out = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    others = ShardFiles(plan.model_dir)

    def copier() -> None:
        try:
            for pos in range(0, size, COPY_STEP):
                if mark.stopped:
                    return
                n = min(COPY_STEP, size - pos)
                copy_range(fd_in, fd_out, pos, n, progress)
                mark.advance(pos + n)
        except BaseException:
            mark.fail()
            raise

    try:
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="io") as pool:
            try:
                copying = pool.submit(copier)
                writes = []

                def submit(info: TensorInfo, t: torch.Tensor) -> None:
                    if not mark.wait(info.end):
                        copying.result()  # raises the copy's error
                    budget.take(info.nbytes)
                    writes.append(pool.submit(_write_back, fd_out, info, t, budget))
                    for f in [f for f in writes if f.done()]:
                        f.result()
                        writes.remove(f)

                for e in edits_:
                    if not mark.wait(_end_here(e, src.name)):
                        copying.result()
                    parts = _read_parts(e, src.name, fd_in, others)
                    new, record = _edit(plan, e, parts, opts)
                    records.append(record)
                    del parts
                    for info, t in new:
                        if info.shard == src.name:  # a scale elsewhere was written beforehand
                            submit(info, t)
                    del new
                for info, t in extra:
                    submit(info, t)
                copying.result()
                for f in writes:
                    f.result()
            except BaseException:
                mark.stop()  # the copy leaves at its next step instead of finishing the shard
                raise
    except OSError as exc:
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror, str(partial)) from exc
        raise
    finally:
        os.close(fd_in)
        os.close(fd_out)
        others.close()
    return records


def _nbytes(e: Edit) -> int:
    return e.target.info.nbytes + (e.target.scale.nbytes if e.target.scale else 0)


def _end_here(e: Edit, shard: str) -> int:
    """Where the copy must have got to before the edit can read its tensors in this shard."""
    ends = [e.target.info.end]
    if e.target.scale is not None and e.target.scale.shard == shard:
        ends.append(e.target.scale.end)
    return max(ends)


def _read_parts(e: Edit, shard: str, fd_in: int, others: ShardFiles) -> dict[str, torch.Tensor]:
    """The tensors one edit reads: the weight (from the shard being streamed), and a float8
    weight's scale (from there too, or from its own shard)."""
    parts = {"weight": read_tensor(fd_in, e.target.info)}
    scale = e.target.scale
    if scale is not None:
        parts["scale"] = read_tensor(fd_in, scale) if scale.shard == shard else others.read(scale)
    return parts


def _deferred_scales(plan: Plan, opts: Options, todo: list[str]) -> dict[str, list[Write]]:
    """The new scales of float8 weights whose scale sits in another shard, computed before
    streaming (the edit is deterministic: the weight's own shard computes it again), so that
    the scale's shard can be written in any order."""
    out: dict[str, list[Write]] = {}
    with ShardFiles(plan.model_dir) as inputs:
        for e in plan.edits:
            scale = e.target.scale
            if scale is None or scale.shard == e.target.info.shard or scale.shard not in todo:
                continue
            parts = _read_parts(e, e.target.info.shard, inputs.fd(e.target.info.shard), inputs)
            new, _ = _edit(plan, e, parts, opts)
            out.setdefault(scale.shard, []).extend((i, t) for i, t in new if i is scale)
    for writes in out.values():
        writes.sort(key=lambda w: w[0].start)
    return out


def _write_back(fd: int, info, w: torch.Tensor, budget: _Budget) -> None:
    try:
        write_tensor(fd, info, w)
    finally:
        budget.give(info.nbytes)


def _edit(
    plan: Plan, e: Edit, parts: dict[str, torch.Tensor], opts: Options
) -> tuple[list[Write], dict]:
    """Edit one tensor on the device (in place on the CPU); the new tensors, back on the CPU,
    and the edit's entry for ablation.json. A float8 weight is dequantized, edited and
    quantized back with its scale (quant.py)."""
    t = e.target
    info = t.info
    d = plan.directions[e.direction]
    spec = e.spec(opts.compute_dtype)
    on_device = {k: v.to(opts.device) if opts.device.type != "cpu" else v for k, v in parts.items()}
    record = {
        "tensor": info.name,
        "shard": info.shard,
        "role": t.role,
        "layer": t.layer,
        "expert": t.expert,
        "measurement": e.measurement,
        "scale": e.scale,
        "method": "norm-preserving" if e.norm_preserving else "standard",
        "direction": e.direction,
        "directions": int(edits.as_basis(d).shape[0]),
        "rows": e.rows,
    }
    if t.scale is None:
        w = on_device["weight"]
        residue_abs, residue_rel = edits.project_out_(w, d, t.hidden_axis, spec)
        record.update(max_abs_projection=residue_abs, max_rel_projection=residue_rel)
        return [(info, w.cpu())], record
    scheme = plan.arch.quant
    assert scheme is not None and t.block is not None  # architecture checked both
    q, s, residue = quant.edit_stored(
        scheme,
        on_device["weight"],
        on_device["scale"],
        t.block,
        d.to(on_device["weight"].device),
        t.hidden_axis,
        spec,
    )
    record.update(
        max_rel_projection=residue.stored,
        quantized={"format": scheme.name, "block": list(t.block), **asdict(residue)},
    )
    return [(info, q.cpu()), (t.scale, s.cpu())], record


def residue_by_role(records: list[dict]) -> dict[str, dict[str, float]]:
    """Worst |r . v| / |v| per role over the float8 edits: the float edit, the same edit
    stored as bf16, plain round-to-nearest, and what was written (the error feedback acts on
    single-direction edits; readers' oblique edits are rounded to nearest)."""
    out: dict[str, dict[str, float]] = {}
    for r in records:
        q = r.get("quantized")
        if not q:
            continue
        worst = out.setdefault(r["role"], dict.fromkeys(("float", "bf16", "rtn", "stored"), 0.0))
        for k in worst:
            worst[k] = max(worst[k], q[k])
    return dict(sorted(out.items()))


def _finish(plan: Plan, out: Path, opts: Options, records: list[dict]) -> None:
    meta = plan.measurements.metadata
    record = {
        "tool": "ablation",
        "version": __version__,
        "base_model": plan.orders.model,
        "base_model_id": hub_id(plan.orders.model, plan.model_dir, opts.base_model),
        "orders": plan.orders.as_dict(),
        "refuse": {
            "path": str(plan.orders.measurements),
            "sha256": plan.refuse_sha256,
            "metadata": meta,
        },
        "architecture": {
            "family": plan.arch.family.family,
            "model_type": plan.arch.model_type,
            "num_layers": plan.arch.num_layers,
            "hidden_size": plan.arch.hidden_size,
            "num_experts": plan.arch.num_experts,
        },
        "device": str(opts.device),
        "fingerprint": plan.fingerprint(),
        "counts_by_role": plan.counts_by_role(),
        "counts_by_layer": plan.counts_by_layer(),
        "warnings": plan.warnings,
        "edits": sorted(records, key=lambda r: r["tensor"]),
    }
    if plan.arch.quant is not None:
        record["quantized"] = {
            "format": plan.arch.quant.name,
            "ue8m0": plan.arch.quant.ue8m0,
            "residue_by_role": residue_by_role(records),
        }
    _write_json(out / RECORD, record)
    card = model_card(record, None, base_license(plan.model_dir))
    _write_file(out / "README.md", str(card).encode())
    (out / MANIFEST).unlink()
