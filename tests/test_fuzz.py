"""Property-based fuzzing of every reader of untrusted bytes: the safetensors header parser, the
index, the orders loader, the .refuse reader and the records read back. Each generated input
either loads or raises the one user-error type: never another exception, never a hang (a
deadline per example), never a write (the directory is unchanged afterwards).

Examples are derandomized (the same inputs on every CI run, so a red run reproduces); set
HYPOTHESIS_PROFILE=explore for a longer, random search on your own machine.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from ablation import checkpoint, orders, record, refuse
from ablation.checkpoint import DTYPES
from ablation.errors import AblationError

settings.register_profile(
    "ci",
    max_examples=200,
    deadline=2000,  # ms per example: a parser that hangs fails here
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("explore", max_examples=5000, deadline=5000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@contextmanager
def sandbox() -> Iterator[Path]:
    """A fresh directory per example; whatever the reader does, it must leave it as it was."""
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        yield root


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def loads_or_user_error(fn: Callable[[], object], root: Path) -> object | None:
    before = snapshot(root)
    try:
        result = fn()
    except AblationError as exc:
        assert str(exc), "a user error must say something"
        assert "\n" not in str(exc), "a user error is one line"
        result = None
    assert snapshot(root) == before, "a reader wrote"
    return result


# ---------------------------------------------------------------- safetensors headers

ints = st.one_of(
    st.integers(-3, 64), st.integers(-(2**70), 2**70), st.booleans(), st.floats(), st.none()
)
json_scalar = st.one_of(st.none(), st.booleans(), ints, st.text(max_size=8))
junk = st.recursive(
    json_scalar,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
entry = st.one_of(
    st.fixed_dictionaries(
        {
            "dtype": st.one_of(st.sampled_from(sorted(DTYPES)), junk),
            "shape": st.one_of(st.lists(ints, max_size=3), junk),
            "data_offsets": st.one_of(st.lists(ints, min_size=2, max_size=2), junk),
        }
    ),
    junk,
)
header_doc = st.dictionaries(st.text(max_size=12), entry, max_size=5) | st.fixed_dictionaries(
    {"__metadata__": junk}
)


@given(doc=header_doc, tail=st.binary(max_size=256), declared=st.none() | st.integers(0, 2**64 - 1))
def test_header_parser(doc, tail, declared):
    raw = json.dumps(doc).encode()
    with sandbox() as root:
        path = root / "x.safetensors"
        length = len(raw) if declared is None else declared
        path.write_bytes(struct.pack("<Q", length) + raw + tail)
        header = loads_or_user_error(lambda: checkpoint.read_header(path), root)
    if header is not None:  # what loads is consistent: every tensor inside the file, disjoint
        spans = sorted((t.start, t.end) for t in header.tensors.values())
        for t in header.tensors.values():
            assert 8 + len(raw) <= t.start <= t.end <= header.size
            numel = 1
            for d in t.shape:
                numel *= d
            assert t.nbytes == numel * DTYPES[t.dtype][1]
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans) if a[0] < a[1])


def valid_shard(root: Path) -> bytes:
    save_file(
        {"a": torch.ones(3, 4), "b": torch.zeros(5, dtype=torch.int8)},
        root / "v.safetensors",
        metadata={"format": "pt"},
    )
    return (root / "v.safetensors").read_bytes()


@given(
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
    cut=st.none() | st.integers(0, 10_000),
)
def test_header_parser_on_damaged_shards(flips, cut):
    with sandbox() as root:
        data = bytearray(valid_shard(root))
        for pos, value in flips:
            data[pos % len(data)] = value
        if cut is not None:
            data = data[: cut % (len(data) + 1)]
        path = root / "x.safetensors"
        path.write_bytes(bytes(data))
        loads_or_user_error(lambda: checkpoint.read_header(path), root)


# ---------------------------------------------------------------- the index

shard_name = st.one_of(
    st.sampled_from(
        ["v.safetensors", "../v.safetensors", "/etc/hostname", "", ".", "..", "sub/v.safetensors"]
    ),
    st.text(max_size=12),
    junk,
)


@given(
    weight_map=st.one_of(st.dictionaries(st.sampled_from(["a", "b", "c"]), shard_name), junk),
    extra=st.dictionaries(st.text(max_size=5), junk, max_size=2),
)
@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
def test_index(weight_map, extra):
    with sandbox() as root:
        model = root / "model"
        model.mkdir()
        valid_shard(model)
        (root / "v.safetensors").write_bytes((model / "v.safetensors").read_bytes())  # a decoy
        (model / checkpoint.INDEX_NAME).write_text(json.dumps({**extra, "weight_map": weight_map}))
        index = loads_or_user_error(lambda: checkpoint.open_index(model), root)
    if index is not None:  # every shard it opened is a plain name inside the model directory
        assert all(h.path.parent == model for h in index.shards.values())


# ---------------------------------------------------------------- orders

KEYS = ["model", "measurements", "output", "method", "projected", "scale", "components"]
ENTRY_KEYS = ["layer", "layers", "kernel", "measurement", "scale", "sparsity", "rows"]
yaml_value = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**66), 2**66),
        st.floats(),
        st.text(max_size=10),
        st.sampled_from(["0-3", "1,2,5-6", "0-99999999999", "3-1", "attn_out", "writers"]),
    ),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from([*ENTRY_KEYS, "peak", "width", "x"]), inner, max_size=4)
    ),
    max_leaves=10,
)
orders_doc = st.fixed_dictionaries(
    {
        "model": st.just("m"),
        "measurements": st.just("m.refuse"),
        "output": st.just("out"),
        "ablate": st.lists(
            st.dictionaries(st.sampled_from([*ENTRY_KEYS, "kernel", "components"]), yaml_value),
            max_size=3,
        )
        | yaml_value,
    },
    optional={k: yaml_value for k in KEYS[3:]},
)


@given(doc=orders_doc | st.dictionaries(st.sampled_from(KEYS), yaml_value) | yaml_value)
def test_orders_loader(doc):
    with sandbox() as root:
        path = root / "orders.yaml"
        path.write_text(yaml.safe_dump(doc, allow_unicode=True))
        loaded = loads_or_user_error(lambda: orders.load(path), root)
    if loaded is not None:
        assert loaded.layers and all(0 <= o.layer <= orders.MAX_LAYER for o in loaded.layers)


@given(text=st.text(max_size=300) | st.binary(max_size=300))
def test_orders_loader_on_any_text(text):
    with sandbox() as root:
        path = root / "orders.yaml"
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)
        loads_or_user_error(lambda: orders.load(path), root)


def test_orders_billion_laughs_and_deep_nesting():
    laughs = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
    with sandbox() as root:
        for text, message in (
            (laughs, "too large"),
            ("[" * 5000 + "]" * 5000, "YAML"),
            (
                "model: m\nmeasurements: m\noutput: o\nablate: [{layers: 0-9999999999999}]\n",
                "beyond",
            ),
        ):
            path = root / "orders.yaml"
            path.write_text(text)
            try:
                orders.load(path)
            except AblationError as exc:
                assert message in str(exc)
            else:
                raise AssertionError(f"loaded: {text[:40]}")


# ---------------------------------------------------------------- .refuse files

KINDS = ["harmful", "harmless", "refuse", "refusenorm", "basis", "harmful_proj", "junk"]


@given(
    parts=st.dictionaries(
        st.tuples(st.sampled_from(KINDS), st.integers(0, 3)),
        st.tuples(st.lists(st.integers(0, 5), max_size=3), st.sampled_from(["f32", "bf16", "i8"])),
        max_size=10,
    ),
    metadata=st.dictionaries(
        st.sampled_from(["format", "format_version", "model", "x"]),
        st.sampled_from(["refuse", "1", "2", "", "m"]) | st.text(max_size=5),
        max_size=4,
    ),
)
def test_refuse_reader(parts, metadata):
    dtypes = {"f32": torch.float32, "bf16": torch.bfloat16, "i8": torch.int8}
    tensors = {
        f"{kind}_{layer}": torch.ones(shape, dtype=dtypes[dt])
        for (kind, layer), (shape, dt) in parts.items()
    }
    with sandbox() as root:
        path = root / "m.refuse"
        save_file(tensors, str(path), metadata=metadata)
        meas = loads_or_user_error(lambda: refuse.load(path), root)
    if meas is not None:
        hidden = meas.hidden_size
        for m in meas.layers.values():
            assert m.harmful.shape == m.harmless.shape == m.refusenorm.shape == (hidden,)


@given(
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
    cut=st.none() | st.integers(0, 10_000),
    legacy=st.booleans(),
)
def test_refuse_reader_on_damaged_files(flips, cut, legacy):
    layer = {k: torch.ones(4) for k in ("harmful", "harmless", "refuse", "refusenorm")}
    with sandbox() as root:
        path = root / "m.refuse"
        if legacy:
            torch.save({f"{k}_0": v for k, v in layer.items()}, path)
        else:
            refuse.save(path, refuse.Measurements({0: refuse.LayerMeasurement(**layer)}, {}))
        data = bytearray(path.read_bytes())
        for pos, value in flips:
            data[pos % len(data)] = value
        if cut is not None:
            data = data[: cut % (len(data) + 1)]
        path.write_bytes(bytes(data))
        loads_or_user_error(lambda: refuse.load(path), root)


# ---------------------------------------------------------------- records read back


@given(doc=junk | st.fixed_dictionaries({"edits": junk, "orders": junk, "refuse": junk}))
def test_record_reader(doc):
    with sandbox() as root:
        (root / record.RECORD).write_text(json.dumps(doc))
        loads_or_user_error(lambda: record.read(root), root)
