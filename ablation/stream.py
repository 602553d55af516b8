"""Running a model that does not fit in memory: every prompt through one decoder layer at a
time. The model is a skeleton on the meta device (transformers' own classes, no weights); its
embeddings, final norm and head are loaded once, and each decoder layer is materialized from
its byte ranges in the shards (through the codecs for quantized checkpoints), run on every
batch, and dropped, while a reader thread fetches the next layer's bytes. Peak memory is about
two decoder layers plus the prompts' hidden states, and each weight byte is read once a pass.

A layer is called exactly as the model calls it: the arguments the model's forward builds for
it (attention masks per attention type, rotary embeddings, position ids ...) are captured by
running that forward once per batch with every decoder layer replaced by a stub. The head is
run the same way, with the last stub returning the streamed final states."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from tqdm import tqdm

from ablation import activations, architecture, quant
from ablation.checkpoint import (
    DTYPES,
    ShardFiles,
    TensorInfo,
    check_shard_names,
    open_index,
    read_json_object,
)
from ablation.errors import AblationError
from ablation.live import Layout
from ablation.system import human_bytes, pin_mmap_threshold

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Load:
    """One checkpoint tensor's place in the model: the parameter (or buffer) it fills, the
    index into it (one expert of a fused tensor), and, when quantized, how to decode it."""

    param: str
    index: tuple
    info: TensorInfo  # as stored (the codes when quantized)
    shape: tuple[int, ...]  # as the model holds it
    coded: architecture.Coded | None = None


@dataclass
class Batch:
    owner: int  # which prompt set
    chunk: list[int]  # the prompts' indices in their set
    ids: torch.Tensor  # [b, seq]
    mask: torch.Tensor  # [b, seq]


@dataclass
class _Call:
    """What the model passes decoder layer l besides the hidden state, for one batch."""

    args: tuple
    kwargs: dict


@dataclass
class Stats:
    bytes_read: int = 0
    read_seconds: float = 0.0  # the reader thread's time in pread + decoding
    wait_seconds: float = 0.0  # compute waiting for the reader
    compute_seconds: float = 0.0
    passes: int = 0
    layers_loaded: int = 0
    peak_device: int = 0
    largest_layer: int = 0  # bytes of the largest materialized decoder layer

    def lines(self) -> list[str]:
        return [
            f"streamed   {self.passes} pass(es) over {self.layers_loaded} layer loads, "
            f"read {human_bytes(self.bytes_read)} "
            f"(reader {self.read_seconds:.1f} s, waited {self.wait_seconds:.1f} s), "
            f"compute {self.compute_seconds:.1f} s",
            f"largest layer {human_bytes(self.largest_layer)}"
            + (f"; peak GPU {human_bytes(self.peak_device)}" if self.peak_device else ""),
        ]


def _device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise AblationError(f"--device {device!r}: {exc}") from exc


def _dtype(dtype: str, config, index_dtypes: list[str]) -> torch.dtype:
    """The dtype the model runs in: as transformers resolves "auto" (the config's dtype, else
    the checkpoint's first float dtype), or the one asked for."""
    if dtype != "auto":
        return getattr(torch, dtype)
    for cfg in (config.get_text_config(), config):
        d = getattr(cfg, "dtype", None)
        if isinstance(d, torch.dtype):
            return d
        if isinstance(d, str) and isinstance(getattr(torch, d, None), torch.dtype):
            return getattr(torch, d)
    for name in index_dtypes:
        t = DTYPES[name][0]
        if t.is_floating_point and t.itemsize >= 2:
            return t
    return torch.float32


def _decoder_layers(model, num_layers: int) -> tuple[str, torch.nn.ModuleList]:
    """The ModuleList of decoder layers: the one of `num_layers` modules in the text decoder."""
    found = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.ModuleList) and len(m) == num_layers
    ]
    if len(found) > 1:
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        path = next((n for n, m in model.named_modules() if m is decoder), None)
        if path is not None:
            found = [(n, m) for n, m in found if n.startswith(path + ".") or not path]
    if len(found) != 1:
        raise AblationError(
            f"cannot tell the decoder layers of {type(model).__name__}: "
            f"{len(found)} lists of {num_layers} modules"
        )
    return found[0]


class Streamer:
    """A model held as a skeleton, run one decoder layer at a time over a set of batches."""

    def __init__(self, model_dir: Path, dtype: str = "auto", device: str | None = None) -> None:
        import transformers

        check_shard_names(model_dir)
        pin_mmap_threshold()  # freed layers go back to the system, not to a growing heap
        self.root = model_dir
        self.index = open_index(model_dir)
        raw = read_json_object(model_dir / "config.json", "config.json")
        try:
            config = transformers.AutoConfig.from_pretrained(model_dir)
        except (OSError, ValueError) as exc:
            raise AblationError(
                f"model {model_dir}: cannot read its config ({str(exc).splitlines()[0]})"
            ) from exc
        self.device = _device(device)
        self.dtype = _dtype(dtype, config, [t.dtype for t in self.index.tensors.values()])
        with torch.device("meta"):
            try:
                model = transformers.AutoModelForCausalLM.from_config(config, dtype=self.dtype)
            except ValueError:  # a multimodal checkpoint: its text stack runs
                model = transformers.AutoModelForImageTextToText.from_config(
                    config, dtype=self.dtype
                )
        self.model = model.eval()
        self.num_layers = int(config.get_text_config().num_hidden_layers)
        self.layers_path, self.layers = _decoder_layers(model, self.num_layers)
        self.scheme = quant.detect(raw)
        self.arch = architecture.resolve(raw, self.index) if self.scheme else None
        self.layout = Layout(model)
        self.layer_loads: list[list[Load]] = [[] for _ in range(self.num_layers)]
        self.outer_loads: list[Load] = []
        self._assign()
        self.stats = Stats()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="layer-reader")
        self._materialize_outer()

    # -- where each checkpoint tensor goes --------------------------------------------------

    def _assign(self) -> None:
        coded: dict[str, architecture.Coded] = {}
        if self.arch is not None:
            for info in self.index.tensors.values():
                c = self.arch.coded(info)
                if c is not None:
                    coded[info.name] = c
        companions = {c.scale.name for c in coded.values()}
        unused: list[str] = []
        loaded: set[str] = set()
        prefix = self.layers_path + "."
        for name, info in sorted(self.index.tensors.items()):
            if name in companions:
                continue
            c = coded.get(name)
            if c is None and info.dtype.startswith("F8"):
                raise AblationError(
                    f"tensor {name!r} is float8, but config.json has no quantization_config "
                    "to say how it is scaled"
                )
            shape = tuple(info.shape) if c is None else c.shape
            if c is not None and c.swap:
                shape = (*shape[:-2], shape[-1], shape[-2])
            found = self.layout.locate(c.name if c else name, shape)
            if found is None:
                unused.append(name)
                continue
            load = Load(found[0], found[1], info, shape, c)
            loaded.add(load.param)
            if load.param.startswith(prefix):
                layer = int(load.param[len(prefix) :].split(".", 1)[0])
                self.layer_loads[layer].append(load)
            else:
                self.outer_loads.append(load)
        if unused:
            LOG.info(
                "%d checkpoint tensors are not part of the model (as transformers ignores "
                "them): %s",
                len(unused),
                ", ".join(unused[:6]) + (" ..." if len(unused) > 6 else ""),
            )
        tied = set(getattr(self.model, "all_tied_weights_keys", None) or {})
        missing = sorted(set(self.layout.params) - loaded - tied)
        if missing:
            raise AblationError(
                f"model {self.root}: the checkpoint has no tensor for "
                + ", ".join(missing[:6])
                + (f" (+{len(missing) - 6} more)" if len(missing) > 6 else "")
                + "; cannot run it layer by layer"
            )
        for layer, loads in enumerate(self.layer_loads):
            if not loads:
                raise AblationError(f"model {self.root}: no tensor of decoder layer {layer}")

    # -- materializing ------------------------------------------------------------------------

    def _read(self, files: ShardFiles, loads: list[Load]) -> list[tuple[Load, torch.Tensor]]:
        """The tensors of `loads` from the shards, decoded to the model's dtype when coded."""
        out = []
        for load in loads:
            t = files.read(load.info)
            self.stats.bytes_read += load.info.nbytes
            if load.coded is not None and self.scheme is not None:
                c = load.coded
                scale = files.read(c.scale)
                self.stats.bytes_read += c.scale.nbytes
                t = quant.values(self.scheme, t, scale, c.block, torch.float32)
                if c.swap:
                    t = t.transpose(-1, -2)
                t = t.to(self.dtype)
            out.append((load, t))
        return out

    def _fetch(self, loads: list[Load]) -> list[tuple[Load, torch.Tensor]]:
        start = time.perf_counter()
        with ShardFiles(self.root) as files:
            got = self._read(files, loads)
        self.stats.read_seconds += time.perf_counter() - start
        return got

    def _fill(self, module: torch.nn.Module, tensors: list[tuple[Load, torch.Tensor]]) -> None:
        """Allocate `module` on the device, compute its non-persistent buffers (rotary
        frequencies, embedding scales) as transformers' own init does, then copy the
        checkpoint's tensors in."""
        module.to_empty(device=self.device)
        for sub in module.modules():
            if sub._non_persistent_buffers_set:
                self.model._init_weights(sub)
        with torch.no_grad():
            for load, t in tensors:
                self.layout.tensor(load.param, load.index, load.info.name, load.shape).copy_(t)

    def _materialize_outer(self) -> None:
        parent_path, _, attr = self.layers_path.rpartition(".")
        parent = self.model.get_submodule(parent_path)
        setattr(parent, attr, torch.nn.ModuleList())  # hide the layers from to_empty
        try:
            self._fill(self.model, self._fetch(self.outer_loads))
        finally:
            setattr(parent, attr, self.layers)
        if hasattr(self.model, "tie_weights"):
            self.model.tie_weights()

    # -- running --------------------------------------------------------------------------------

    @contextmanager
    def _stubs(self, fn: Callable[[int], Callable]) -> Iterator[None]:
        """Every decoder layer's forward replaced by fn(layer)."""
        for layer, module in enumerate(self.layers):
            module.forward = fn(layer)
        try:
            yield
        finally:
            for module in self.layers:
                del module.forward

    def _model_call(self, b: Batch, **kw):
        return self.model(
            input_ids=b.ids,
            attention_mask=b.mask,
            position_ids=activations.positions_of(b.mask),
            use_cache=False,
            logits_to_keep=1,
            **kw,
        )

    def _capture(self, b: Batch) -> tuple[torch.Tensor, list[_Call]]:
        """The hidden state entering layer 0 and every layer's other arguments, from the
        model's own forward with the layers stubbed out."""
        calls: list[_Call | None] = [None] * self.num_layers
        first: list[torch.Tensor] = []

        def stub(layer: int) -> Callable:
            def forward(hidden_states, *args, **kwargs):
                if layer == 0:
                    first.append(hidden_states)
                calls[layer] = _Call(args, kwargs)
                return hidden_states

            return forward

        with self._stubs(stub):
            self._model_call(b)
        if not first or any(c is None for c in calls):
            raise AblationError(
                f"{type(self.model).__name__} does not call each of its {self.num_layers} "
                "decoder layers once: it cannot be run layer by layer"
            )
        return first[0], calls  # type: ignore[return-value]

    def run(
        self,
        batches: list[Batch],
        visit: Callable[[int, int, torch.Tensor], None] | None = None,
        progress: tqdm | None = None,
        before_batch: Callable[[int], None] | None = None,
    ) -> list[torch.Tensor]:
        """One pass: every decoder layer over every batch. visit(layer, batch, h) sees each
        batch's state entering each layer; returns the states after the last layer, per batch."""
        n = self.num_layers
        self.stats.passes += 1
        states, calls = [], []
        with torch.inference_mode():
            for b in batches:
                h, c = self._capture(b)
                states.append(h)
                calls.append(c)
            pending: Future | None = self._pool.submit(self._fetch, self.layer_loads[0])
            for layer in range(n):
                start = time.perf_counter()
                tensors = pending.result() if pending is not None else []
                self.stats.wait_seconds += time.perf_counter() - start
                module = self.layers[layer]
                self._fill(module, tensors)
                size = sum(t.numel() * t.element_size() for t in module.parameters())
                self.stats.largest_layer = max(self.stats.largest_layer, size)
                self.stats.layers_loaded += 1
                del tensors
                pending = (
                    self._pool.submit(self._fetch, self.layer_loads[layer + 1])
                    if layer + 1 < n
                    else None
                )
                start = time.perf_counter()
                for i in range(len(batches)):
                    if visit is not None:
                        visit(layer, i, states[i])
                    if before_batch is not None:
                        before_batch(i)
                    out = module(states[i], *calls[i][layer].args, **calls[i][layer].kwargs)
                    if isinstance(out, tuple):
                        raise AblationError(
                            f"decoder layer {layer} returns a tuple, not its hidden state: "
                            "this model cannot be run layer by layer"
                        )
                    states[i] = out
                if before_batch is not None:
                    before_batch(-1)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                    self.stats.peak_device = max(
                        self.stats.peak_device, torch.cuda.max_memory_allocated(self.device)
                    )
                self.stats.compute_seconds += time.perf_counter() - start
                module.to(device="meta")
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix_str(f"read {human_bytes(self.stats.bytes_read)}")
        return states

    def head(self, batches: list[Batch], states: list[torch.Tensor]) -> list[torch.Tensor]:
        """Logits at the last position [b, vocab] of each batch from its final states: the
        model's own forward (final norm, head, soft-capping ...) with the last stub returning
        the streamed states."""
        out = []
        with torch.inference_mode():
            for b, h in zip(batches, states, strict=True):

                def stub(layer: int, h=h) -> Callable:
                    last = layer == self.num_layers - 1
                    return lambda hidden_states, *a, **k: h if last else hidden_states

                with self._stubs(stub):
                    out.append(self._model_call(b).logits[:, -1].float())
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def make_batches(
    seqs: list[list[int]], pad_id: int, batch_size: int, device, owner: int = 0
) -> list[Batch]:
    """The same length-sorted, left-padded batches as the in-memory path."""
    out = []
    for chunk in activations.batches(seqs, batch_size):
        ids, mask = activations.pad([seqs[i] for i in chunk], pad_id, device)
        out.append(Batch(owner, chunk, ids, mask))
    return out


def collect(
    streamer: Streamer,
    sets: list[list[list[int]]],
    pad_id: int,
    batch_size: int,
    position: str = "last-prompt",
    keep_states: bool = True,
    num_experts: int | None = None,
    top_k: int | None = None,
) -> list[activations.Collected]:
    """activations.collect for several prompt sets in one stream of the weights: the state
    entering every decoder layer at the last prompt token (or at the first generated token:
    a first full pass picks that token, a second runs prompt + token)."""
    activations.check_position(position)
    tokens = [sum(len(s) for s in seqs) for seqs in sets]
    if position == "first-generated":
        logits = last_logits(streamer, sets, pad_id, batch_size, "next token")
        sets = [
            [[*s, t] for s, t in zip(seqs, lg.argmax(-1).tolist(), strict=True)]
            for seqs, lg in zip(sets, logits, strict=True)
        ]
    batches = _all_batches(streamer, sets, pad_id, batch_size)
    accs = [activations.Accumulator(len(s), keep_states) for s in sets]
    counts: list[dict[int, torch.Tensor]] = [{} for _ in sets]
    hidden = int(streamer.model.config.get_text_config().hidden_size)
    for acc, n in zip(accs, tokens, strict=True):
        acc.shape(streamer.num_layers, hidden)
        acc.tokens = n
    routers = activations.RouterCounts(streamer.model, num_experts, top_k)

    def visit(layer: int, i: int, h: torch.Tensor) -> None:
        b = batches[i]
        accs[b.owner].add(b.chunk, h[:, -1, :].unsqueeze(1), slice(layer, layer + 1))

    def before_batch(i: int) -> None:
        if i < 0:
            routers.mask = None
            return
        b = batches[i]
        routers.counts = counts[b.owner]
        mask = b.mask.bool()
        if position == "first-generated":  # routes are counted over the prompt's tokens
            mask = mask.clone()
            mask[:, -1] = False
        routers.mask = mask.reshape(-1)

    try:
        with tqdm(total=streamer.num_layers, unit="layer", desc="measure", disable=None) as bar:
            # the last layer's output is not measured, but its routes are counted
            streamer.run(batches, visit, progress=bar, before_batch=before_batch)
    finally:
        routers.close()
    return [acc.result(c) for acc, c in zip(accs, counts, strict=True)]


def last_logits(
    streamer: Streamer,
    sets: list[list[list[int]]],
    pad_id: int,
    batch_size: int,
    desc: str = "logits",
    visit: Callable[[int, int, torch.Tensor], None] | None = None,
) -> list[torch.Tensor]:
    """The raw next-token logits after each prompt of each set, [n, vocab] per set in input
    order (float32, on the CPU): activations.next_token_logits in one stream of the weights
    (visit as for Streamer.run)."""
    batches = _all_batches(streamer, sets, pad_id, batch_size)
    with tqdm(total=streamer.num_layers, unit="layer", desc=desc, disable=None) as bar:
        states = streamer.run(batches, visit, progress=bar)
    logits = streamer.head(batches, states)
    vocab = logits[0].shape[-1]
    out = [torch.zeros((len(s), vocab), dtype=torch.float32) for s in sets]
    for b, lg in zip(batches, logits, strict=True):
        out[b.owner][torch.tensor(b.chunk)] = lg.cpu()
    return out


def _all_batches(
    streamer: Streamer, sets: list[list[list[int]]], pad_id: int, batch_size: int
) -> list[Batch]:
    """Every set's batches, formed per set as the in-memory path forms them."""
    out = []
    for k, seqs in enumerate(sets):
        if not seqs:
            raise AblationError("no prompts to run")
        out.extend(make_batches(seqs, pad_id, batch_size, streamer.device, k))
    return out


def fits(model_dir: Path, device: str | None) -> bool:
    """Whether the checkpoint's weights fit in the memory a loaded model would use (RAM, plus
    the free memory of the GPUs when it would go there), with a margin for the run."""
    try:
        size = open_index(model_dir).total_bytes
    except AblationError:  # not a safetensors checkpoint: only the in-memory path runs it
        return True
    room = psutil.virtual_memory().available
    if torch.cuda.is_available() and (device in (None, "auto") or str(device).startswith("cuda")):
        room += sum(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
    return size < 0.8 * room
