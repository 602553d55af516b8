"""Safetensors shards as byte ranges: headers, validation, reading and patching single tensors.

The rewriter never loads a shard: it reads a header (a few KB of JSON), copies the file with a
kernel copy, and overwrites the byte ranges of edited tensors in place. Because an edit keeps
dtype and shape, the header and every other byte stay valid.
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ablation.errors import AblationError

LOG = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit the safetensors reference implementation uses

# safetensors dtype code -> (torch dtype or None when torch has none, bytes per element)
DTYPES: dict[str, tuple[torch.dtype | None, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "U16": (getattr(torch, "uint16", None), 2),
    "U32": (getattr(torch, "uint32", None), 4),
    "U64": (getattr(torch, "uint64", None), 8),
    "BOOL": (torch.bool, 1),
    "F8_E4M3": (getattr(torch, "float8_e4m3fn", None), 1),
    "F8_E5M2": (getattr(torch, "float8_e5m2", None), 1),
    "F8_E8M0": (getattr(torch, "float8_e8m0fnu", None), 1),
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live: absolute [start, end) offsets in its shard file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int
    shard: str

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


@dataclass
class ShardHeader:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    size: int


@dataclass
class ShardIndex:
    """Every tensor of a checkpoint by name, read from headers only."""

    root: Path
    shards: dict[str, ShardHeader]
    tensors: dict[str, TensorInfo]
    index_file: Path | None = None
    unindexed: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(h.size for h in self.shards.values())


def read_header(path: Path) -> ShardHeader:
    """Parse and validate a safetensors header without touching the tensor bytes."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise AblationError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            header_len = int.from_bytes(raw_len, "little")
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise AblationError(
                    f"{path}: header length {header_len} does not fit in a {size}-byte file "
                    "(corrupt or truncated shard)"
                )
            raw = f.read(header_len)
    except OSError as exc:
        raise AblationError(f"{path}: cannot read ({exc.strerror})") from exc
    header = json_object(raw, f"{path}: header")
    metadata = header.pop("__metadata__", None) or {}
    if not (
        isinstance(metadata, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise AblationError(f"{path}: __metadata__ is not a map of strings to strings")
    base = 8 + header_len
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _tensor_info(path, name, entry, base, size)
    _check_no_overlap(path, tensors)
    return ShardHeader(path=path, tensors=tensors, metadata=metadata, size=size)


def json_object(raw: bytes, what: str) -> dict:
    """A JSON object from untrusted bytes; anything else is one user error."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AblationError(f"{what} is not valid JSON ({exc})") from exc
    except RecursionError:
        raise AblationError(f"{what} is not valid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise AblationError(f"{what} is not a JSON object")
    return data


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _tensor_info(path: Path, name: str, entry: object, base: int, size: int) -> TensorInfo:
    if not isinstance(entry, dict) or {"dtype", "shape", "data_offsets"} - entry.keys():
        raise AblationError(f"{path}: tensor {name!r} lacks dtype/shape/data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise AblationError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
        raise AblationError(f"{path}: tensor {name!r} has a bad shape {shape!r}")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_int(o) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise AblationError(f"{path}: tensor {name!r} has bad data_offsets {offsets!r}")
    numel = 1
    for d in shape:
        numel *= d
    want = numel * DTYPES[dtype][1]
    if offsets[1] - offsets[0] != want:
        raise AblationError(
            f"{path}: tensor {name!r} spans {offsets[1] - offsets[0]} bytes but {dtype}{shape} "
            f"needs {want}"
        )
    start, end = base + offsets[0], base + offsets[1]
    if end > size:
        raise AblationError(
            f"{path}: tensor {name!r} ends at byte {end}, past the end of the {size}-byte file "
            "(truncated shard)"
        )
    return TensorInfo(name, dtype, tuple(shape), start, end, path.name)


def _check_no_overlap(path: Path, tensors: dict[str, TensorInfo]) -> None:
    spans = sorted((t.start, t.end, t.name) for t in tensors.values() if t.end > t.start)
    for (_, end_a, name_a), (start_b, _, name_b) in itertools.pairwise(spans):
        if start_b < end_a:
            raise AblationError(f"{path}: tensors {name_a!r} and {name_b!r} overlap")


def is_plain_name(name: object) -> bool:
    """A file name that can only mean a file directly inside its directory: no separator, no
    '..', not absolute. Shard names come from files written by strangers (an index, a record,
    a manifest) and become paths on both the reading and the writing side; a symlink *at* a
    plain name stays allowed (a Hugging Face cache snapshot is made of them)."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not any(c in name for c in "/\\\0")
        and not Path(name).is_absolute()
    )


def plain_name(name: object, where: str) -> str:
    if not is_plain_name(name):
        raise AblationError(
            f"{where}: {name!r} is not a plain file name inside the checkpoint directory"
        )
    return name  # type: ignore[return-value]


def read_json_object(path: Path, what: str) -> dict:
    """A JSON object from a file; unreadable, not JSON or not an object is one user error."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise AblationError(f"{path}: cannot read {what} ({exc.strerror})") from exc
    return json_object(raw, f"{path}: {what}")


def read_weight_map(index_path: Path) -> dict[str, str]:
    """tensor -> shard from a model.safetensors.index.json, every shard name checked."""
    weight_map = read_json_object(index_path, "the index").get("weight_map")
    if not isinstance(weight_map, dict):
        raise AblationError(f"{index_path}: not a valid safetensors index (no weight_map object)")
    for tensor, shard in weight_map.items():
        plain_name(shard, f"{index_path}: weight_map[{tensor!r}]")
    return weight_map


def check_shard_names(root: Path) -> None:
    """The index's shard names, checked before anything else (transformers) turns them into
    paths; a checkpoint without an index has one fixed name."""
    if (root / INDEX_NAME).is_file():
        read_weight_map(root / INDEX_NAME)


def open_index(root: Path) -> ShardIndex:
    """Read the checkpoint's index (or its single file) and every shard header it names."""
    index_path = root / INDEX_NAME
    weight_map: dict[str, str]
    if index_path.is_file():
        weight_map = read_weight_map(index_path)
        shard_names = sorted(set(weight_map.values()))
    elif (root / SINGLE_NAME).is_file():
        index_path = None
        shard_names = [SINGLE_NAME]
        weight_map = {}
    else:
        found = sorted(p.name for p in root.glob("*.safetensors"))
        hint = f" (found {', '.join(found[:4])} but no {INDEX_NAME})" if found else ""
        raise AblationError(f"{root}: no {SINGLE_NAME} or {INDEX_NAME}{hint}")
    shards: dict[str, ShardHeader] = {}
    tensors: dict[str, TensorInfo] = {}
    for shard in shard_names:
        path = root / shard
        if not path.is_file():
            raise AblationError(f"{index_path or root}: shard {shard!r} is missing")
        shards[shard] = read_header(path)
        for name, info in shards[shard].tensors.items():
            if name in tensors:
                raise AblationError(
                    f"{root}: tensor {name!r} is in both {tensors[name].shard} and {shard}"
                )
            tensors[name] = info
    for name, shard in weight_map.items():
        if name not in shards[shard].tensors:
            raise AblationError(f"{index_path}: maps {name!r} to {shard!r}, whose header lacks it")
    unindexed = sorted(
        p.name for p in root.glob("*.safetensors") if p.is_file() and p.name not in shards
    )
    return ShardIndex(root, shards, tensors, index_path, unindexed)


def read_tensor(fd: int, info: TensorInfo) -> torch.Tensor:
    """One tensor from an open file descriptor, via pread: no mmap, so no file pages in RSS."""
    torch_dtype = DTYPES[info.dtype][0]
    if torch_dtype is None:
        raise AblationError(
            f"{info.shard}: tensor {info.name!r} has dtype {info.dtype}, "
            "which this torch cannot represent"
        )
    buf = bytearray(info.nbytes)
    view = memoryview(buf)
    done = 0
    while done < info.nbytes:
        n = os.preadv(fd, [view[done:]], info.start + done)
        if n == 0:
            raise AblationError(f"{info.shard}: unexpected end of file reading {info.name!r}")
        done += n
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=torch_dtype)
    return torch.frombuffer(buf, dtype=torch_dtype).reshape(info.shape)


class ShardFiles:
    """Read-only descriptors of a checkpoint's shards, opened on first use, closed together:
    for readers that pick single tensors across shards (plans, restores, scales elsewhere)."""

    def __init__(self, root: Path) -> None:
        self.root, self.fds = root, {}

    def fd(self, shard: str) -> int:
        if shard not in self.fds:
            self.fds[shard] = os.open(self.root / shard, os.O_RDONLY)
        return self.fds[shard]

    def read(self, info: TensorInfo) -> torch.Tensor:
        return read_tensor(self.fd(info.shard), info)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def __enter__(self) -> ShardFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_tensor(fd: int, info: TensorInfo, tensor: torch.Tensor) -> None:
    """Overwrite a tensor's byte range in place; the new bytes must be exactly as long."""
    t = tensor.detach().to("cpu").contiguous()
    if t.dtype != DTYPES[info.dtype][0] or tuple(t.shape) != info.shape:
        raise ValueError(f"{info.name}: edit changed dtype/shape to {t.dtype}{tuple(t.shape)}")
    data = memoryview(t.reshape(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], info.start + done)


# copy_file_range cannot serve this pair of files (across filesystems, an old kernel, a
# filesystem without support): the pread/pwrite loop can
_NO_RANGE_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF}


def copy_range(
    fd_in: int, fd_out: int, offset: int, length: int, progress: Callable[[int], None] | None = None
) -> None:
    """Copy [offset, offset + length) to the same offsets, in the kernel (copy_file_range: a
    reflink where the filesystem shares extents), falling back to pread/pwrite."""
    chunk = 64 * 1024 * 1024
    done = 0
    use_range = hasattr(os, "copy_file_range")
    while done < length:
        count = min(chunk, length - done)
        pos = offset + done
        if use_range:
            try:
                n = os.copy_file_range(fd_in, fd_out, count, pos, pos)
            except OSError as exc:
                if exc.errno not in _NO_RANGE_COPY:
                    raise  # a full disk or an I/O error is the same with pwrite
                use_range = False
                continue
        else:
            data = os.pread(fd_in, count, pos)
            n = len(data)
            written = 0
            while written < n:
                written += os.pwrite(fd_out, data[written:], pos + written)
        if n == 0:
            raise AblationError(f"unexpected end of input at byte {pos}")
        done += n
        if progress:
            progress(n)


def copy_file(src: Path, dst: Path, progress: Callable[[int], None] | None = None) -> None:
    """Copy a whole file in the kernel."""
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        size = os.fstat(fin.fileno()).st_size
        copy_range(fin.fileno(), fout.fileno(), 0, size, progress)
