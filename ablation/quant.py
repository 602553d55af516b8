"""Quantized weights as their logical float values and back (pure tensor math, no files).

A quantized checkpoint stores, for each weight W [..., out, in], codes on a small grid of values
and beside them a grid of scales: the logical weight is code * s with one s per block of
elements. The formats differ in the grid, the block and how codes and scales are packed:

- FP8 with block scales (DeepSeek-V3/R1, Kimi-K2, Qwen3-FP8): float8_e4m3fn codes, 128x128
  blocks, float32 scales in `weight_scale_inv` (powers of two with `scale_fmt: ue8m0`);
- compressed-tensors FP8: e4m3 codes, one scale per output channel ([out, 1]), per tensor ([1])
  or per block, in `weight_scale`;
- compressed-tensors INT4 pack-quantized (Kimi-K2-Thinking's experts): integer codes -8..7,
  eight to an int32 (`weight_packed` [out, in/8], element i in bits 4i..4i+3, offset by 8), one
  scale per group of `group_size` inputs in `weight_scale` [out, in/group] (symmetric);
- MXFP4 (gpt-oss experts): e2m1 codes, two to a byte (`*_blocks` [..., out, in/32, 16], the
  even element in the low nibble), one power-of-two scale per 32 inputs (`*_scales`
  [..., out, in/32], e8m0: 2^(s - 127)).

Packed scales run along the input axis, stored last; a tensor the model applies as x @ W
(gpt-oss's fused experts, [..., in, out]) is therefore stored transposed, and its hidden axis
moves with it (architecture.py maps it). Float8 codes are the parameter as the model holds it.
The rewriter unpacks one weight to a byte per code, dequantizes a slab of whole blocks and whole
hidden-axis vectors, edits it with the float kernels, and quantizes it back here:

- scale per block from the edited block's absmax over the grid's largest value, rounded to the
  scale's stored dtype (and up to a power of two for ue8m0 and e8m0), so
  dequantize(quantize(x)) is a fixed point of the codec;
- blocks whose values the edit left exactly as they were keep their original codes and scale;
- every other element is stored as one of the two grid values around its edited value
  (`Grid.bracket`), but not simply the nearer one: an edit moves each element by less than half
  a grid step, so plain rounding snaps most of them back and restores much of the removed
  component (|r . v| / |v| near 1e-2 for e4m3, ~50x what bf16 storage leaves). Two shifted
  roundings (each vector shifted along r by what the last rounding left along r) remove most of
  it; then error feedback flips single elements to their other neighbour, cheapest per
  projection fixed first, on the vectors still above the level bf16 would leave, up to twelve
  rounds (4-bit grids need the most). The scales stay those of the absmax; no element moves more
  than one grid step from its edited value (what `verify` checks).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from ablation import edits
from ablation.errors import AblationError

SUPPORTED = (
    "fp8 with block scales (quant_method fp8: weight + weight_scale_inv)",
    "compressed-tensors fp8, per channel, per tensor or per block (weight + weight_scale)",
    "compressed-tensors int4 pack-quantized, symmetric, per group or channel "
    "(weight_packed + weight_scale)",
    "mxfp4 (quant_method mxfp4: *_blocks + *_scales)",
)


@dataclass(frozen=True)
class Grid:
    """The values one code can take, in units of its scale: a float grid (normals
    (1 + m / 2^mantissa) 2^e down to `tiny`, evenly spaced below it) or the integers. A code is
    the value itself in `code_dtype`, or (`table`) an index into the list of values."""

    name: str
    lowest: float
    highest: float
    mantissa: int | None  # None: the integers
    tiny: float = 1.0
    code_dtype: torch.dtype = torch.uint8
    table: tuple[float, ...] | None = None  # sign in the top bit, magnitudes ascending below

    def bracket(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The grid values just below and just above t (equal on the grid), from the grid's
        shape instead of conversions (5x cheaper on a CPU); the grid stops at its ends."""
        t = t.clamp(self.lowest, self.highest)
        if self.mantissa is None:
            lo = torch.floor(t)
            return lo, torch.where(lo == t, lo, lo + 1)
        gap = torch.exp2(torch.floor(torch.log2(t.abs().clamp_min(self.tiny))) - self.mantissa)
        lo = torch.floor(t / gap) * gap
        return lo, torch.where(lo == t, lo, lo + gap)

    def nearest(self, t: torch.Tensor) -> torch.Tensor:
        lo, hi = self.bracket(t)
        return torch.where(t - lo <= hi - t, lo, hi)

    def decode(self, codes: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """Codes (one byte each) -> their values."""
        if self.table is None:
            return codes.to(dtype)
        return torch.tensor(self.table, dtype=dtype, device=codes.device)[codes.long()]

    def encode(self, v: torch.Tensor) -> torch.Tensor:
        """Values on the grid -> codes (exact)."""
        if self.table is None:
            return v.to(self.code_dtype)
        half = len(self.table) // 2
        mags = torch.tensor(self.table[:half], dtype=v.dtype, device=v.device)
        idx = torch.bucketize(v.abs(), mags)  # exact: every magnitude is one of them
        return (idx + half * (v < 0)).to(self.code_dtype)


E4M3 = Grid("e4m3", -448.0, 448.0, 3, 2.0**-6, torch.float8_e4m3fn)
INT4 = Grid("int4", -8.0, 7.0, None, code_dtype=torch.int8)
E2M1 = Grid(
    "e2m1",
    -6.0,
    6.0,
    1,
    1.0,
    table=(0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0),
)
E4M3_MAX = E4M3.highest


@dataclass(frozen=True)
class Packing:
    """How codes sit in the stored words: `per_word` 4-bit codes to a word (the first in the
    lowest bits, stored as code + `offset`), the weight's input axis spread over the last
    `axes` stored axes (MXFP4: [..., out, in/32, 16]); per_word 1: a code per element."""

    dtype: str  # the stored words' safetensors dtype
    per_word: int = 1
    offset: int = 0
    axes: int = 1

    def logical_shape(self, stored: tuple[int, ...]) -> tuple[int, ...]:
        """The weight's shape [..., out, in] from its codes' stored shape."""
        lead = stored[: len(stored) - self.axes]
        return (*lead, math.prod(stored[len(stored) - self.axes :]) * self.per_word)

    def unpack(self, stored: torch.Tensor, code_dtype: torch.dtype) -> torch.Tensor:
        """Stored words -> one byte per code, shaped as the weight [..., out, in]."""
        if self.per_word == 1:
            return stored
        words = stored.reshape(*stored.shape[: stored.ndim - self.axes], -1).to(torch.int32)
        shifts = torch.arange(0, 4 * self.per_word, 4, dtype=torch.int32, device=stored.device)
        nib = (words.unsqueeze(-1) >> shifts) & 0x0F  # [..., in / per_word, per_word]
        return (nib - self.offset).to(code_dtype).reshape(*words.shape[:-1], -1)

    def pack(self, codes: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """One byte per code [..., out, in] -> words shaped and typed as `like`."""
        if self.per_word == 1:
            return codes
        shifts = torch.arange(0, 4 * self.per_word, 4, dtype=torch.int64, device=codes.device)
        nib = (codes.to(torch.int64) + self.offset).reshape(*codes.shape[:-1], -1, self.per_word)
        word = (nib << shifts).sum(dim=-1)  # unsigned, below 2^(4 per_word)
        bits = 8 * like.element_size()
        if not like.dtype.is_signed:
            return word.to(like.dtype).reshape(like.shape)
        signed = torch.where(word >= 2 ** (bits - 1), word - 2**bits, word)
        return signed.to(like.dtype).reshape(like.shape)


FLOAT8 = Packing("F8_E4M3")
NIBBLES = Packing("U8", per_word=2, axes=2)  # MXFP4 blocks: [..., out, in/32, 16]
INT32_NIBBLES = Packing("I32", per_word=8, offset=8)  # compressed-tensors pack-quantized


@dataclass(frozen=True)
class Scheme:
    """One quantization of a checkpoint: its grid, where a weight's codes and scales are
    stored (templates over the weight's name and its stem, the name without ".weight"), how the
    codes are packed, the block (None: derived per tensor from the scale grid: per channel or
    per tensor), power-of-two scales, and the dtypes its scales may have (uint8: e8m0
    exponents, 2^(s - 127))."""

    name: str
    grid: Grid
    data: str  # e.g. "{name}" (the weight itself), "{stem}.weight_packed", "{name}_blocks"
    scale: str  # e.g. "{stem}.weight_scale_inv"
    block: tuple[int, int] | None
    ue8m0: bool = False
    packing: Packing = FLOAT8
    scale_dtypes: tuple[str, ...] = ("F32", "BF16", "F16", "F8_E8M0")

    @property
    def input_last(self) -> bool:
        """Whether the codes hold the weight with its input axis last whatever the model's
        layout (packed groups run along the input); float8 codes are the parameter itself."""
        return self.packing.per_word > 1

    def _fill(self, template: str, weight: str) -> str:
        return template.format(name=weight, stem=weight.removesuffix(".weight"))

    def data_name(self, weight: str) -> str:
        return self._fill(self.data, weight)

    def scale_name(self, weight: str) -> str:
        return self._fill(self.scale, weight)

    def weight_name(self, data_name: str) -> str:
        """The weight's name back from the name of its codes (the inverse of data_name)."""
        key, _, rest = self.data.removeprefix("{").partition("}")
        name = data_name.removesuffix(rest) if rest else data_name
        return name if key == "name" else name + ".weight"

    def unpack(self, stored: torch.Tensor) -> torch.Tensor:
        return self.packing.unpack(stored, self.grid.code_dtype)

    def pack(self, codes: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self.packing.pack(codes, like)

    def scale_values(self, stored: torch.Tensor) -> torch.Tensor:
        """Stored scales -> a float tensor holding them exactly (e8m0 bytes: 2^(s - 127))."""
        if stored.dtype == torch.uint8:
            return torch.exp2(stored.float() - 127)
        return stored

    def store_scales(self, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if like.dtype == torch.uint8:
            return (torch.log2(values.float()).round() + 127).clamp(0, 254).to(torch.uint8)
        return values.to(like.dtype)

    def block_of(self, shape: tuple[int, ...], grid: tuple[int, ...], name: str) -> tuple[int, int]:
        """The (rows, cols) block of a weight [..., out, in] whose scales have shape `grid`;
        a scale grid that does not tile the weight is a user error naming both."""
        out, inn = shape[-2], shape[-1]
        lead = tuple(shape[:-2])
        if self.block is not None:
            want = (*lead, -(-out // self.block[0]), -(-inn // self.block[1]))
            block = self.block
        elif len(grid) <= 1 and math.prod(grid) == 1:  # per tensor: [] or [1]
            return out, inn
        else:  # per channel [out, 1] (or any grid that tiles the weight exactly)
            g = tuple(grid[-2:]) if len(grid) >= 2 else (grid[0], 1)
            if out % g[0] or inn % g[1]:
                raise AblationError(
                    f"tensor {name!r} {list(shape)}: its scale grid {list(grid)} does not tile it"
                )
            want, block = (*lead, *g), (out // g[0], inn // g[1])
        if tuple(grid) != want:
            raise AblationError(
                f"tensor {name!r} {list(shape)}: its scale has shape {list(grid)}, "
                f"but {list(block)} blocks need {list(want)}"
            )
        return block


def detect(config: dict) -> Scheme | None:
    """The checkpoint's quantization scheme from config.json's quantization_config (None when
    it has none); a scheme this tool cannot edit is a user error listing what it can."""
    qc = config.get("quantization_config") or (config.get("text_config") or {}).get(
        "quantization_config"
    )
    if not qc:
        return None
    if not isinstance(qc, dict):
        raise AblationError("config.json: quantization_config is not an object")
    method = qc.get("quant_method")
    if method == "fp8":
        fmt = qc.get("fmt", "e4m3")
        if fmt not in ("e4m3", "float8_e4m3fn"):
            raise AblationError(f"config.json: fp8 format {fmt!r} is not supported (want e4m3)")
        block = _block(qc.get("weight_block_size"))
        return Scheme("fp8", E4M3, "{name}", "{stem}.weight_scale_inv", block, _ue8m0(qc))
    if method == "compressed-tensors":
        return _compressed_tensors(qc)
    if method == "mxfp4":
        return Scheme(
            "mxfp4", E2M1, "{name}_blocks", "{name}_scales", (1, 32), True, NIBBLES, ("U8",)
        )
    raise AblationError(
        f"config.json: quantization {method!r} cannot be edited in place; supported: "
        + "; ".join(SUPPORTED)
    )


def _block(value: object) -> tuple[int, int] | None:
    if value is None:
        return None
    if not (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(v, int) and v > 0 for v in value)
    ):
        raise AblationError(f"config.json: weight block size {value!r} is not [rows, cols]")
    return int(value[0]), int(value[1])


def _ue8m0(qc: dict) -> bool:
    return qc.get("scale_fmt") == "ue8m0"


def _compressed_tensors(qc: dict) -> Scheme:
    """compressed-tensors: every weight scheme of its config groups must be one this tool
    edits (8-bit float, or symmetric 4-bit integers packed in int32), and all the same."""
    groups = qc.get("config_groups") or {}
    schemes = [g.get("weights") or {} for g in groups.values() if isinstance(g, dict)]
    if not schemes:
        raise AblationError("config.json: compressed-tensors config without config_groups")
    found = {_compressed_scheme(w, qc) for w in schemes}
    if len(found) > 1:
        raise AblationError("config.json: compressed-tensors groups with different schemes")
    return found.pop()


def _compressed_scheme(w: dict, qc: dict) -> Scheme:
    kind = f"{w.get('type', '?')}{w.get('num_bits', '?')}"
    strategy = w.get("strategy", "tensor")
    if kind == "float8":
        if strategy not in ("tensor", "channel", "block"):
            raise AblationError(f"config.json: compressed-tensors strategy {strategy!r}")
        block = _block(w.get("block_structure")) if strategy == "block" else None
        return Scheme(
            "compressed-tensors", E4M3, "{name}", "{stem}.weight_scale", block, _ue8m0(qc)
        )
    if kind == "int4" and qc.get("format") == "pack-quantized":
        if w.get("symmetric") is False:
            raise AblationError(
                "config.json: compressed-tensors int4 with zero points (symmetric: false) "
                "cannot be edited in place; supported: " + "; ".join(SUPPORTED)
            )
        if strategy == "group":
            size = w.get("group_size")
            if not isinstance(size, int) or size <= 0 or size % 8:
                raise AblationError(
                    f"config.json: compressed-tensors int4 group size {size!r} "
                    "(want a positive multiple of 8)"
                )
            block = (1, size)
        elif strategy == "channel":
            block = None
        else:
            raise AblationError(f"config.json: compressed-tensors int4 strategy {strategy!r}")
        return Scheme(
            "compressed-tensors int4",
            INT4,
            "{stem}.weight_packed",
            "{stem}.weight_scale",
            block,
            packing=INT32_NIBBLES,
            scale_dtypes=("F32", "BF16", "F16"),
        )
    raise AblationError(
        f"config.json: compressed-tensors {kind} weights ({qc.get('format')}) cannot "
        "be edited in place; supported: " + "; ".join(SUPPORTED)
    )


def _expand(s: torch.Tensor, block: tuple[int, int], rows: int, cols: int) -> torch.Tensor:
    """Scales [..., R, C] -> one per element [..., rows, cols] (edge blocks cropped)."""
    s = s.repeat_interleave(block[0], dim=-2).repeat_interleave(block[1], dim=-1)
    return s[..., :rows, :cols]


def _grid(scale: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """A scale tensor as [..., R, C] for a weight of `shape` [..., out, in]: a per-tensor
    scale ([] or [1]) is a 1 x 1 grid."""
    lead = tuple(shape[:-2])
    if scale.ndim < 2:
        return scale.reshape(*lead, 1, 1)
    return scale.reshape(*lead, *scale.shape[-2:])


def per_element(scale: torch.Tensor, block: tuple[int, int], shape: torch.Size) -> torch.Tensor:
    """The scale of every element of a weight of `shape` (float64)."""
    return _expand(_grid(scale, shape).double(), block, shape[-2], shape[-1]).expand(shape)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    block: tuple[int, int],
    dtype=torch.float32,
    grid: Grid = E4M3,
) -> torch.Tensor:
    """Codes q [..., out, in] (one per element) and their scale values [..., R, C] -> the
    logical weight (exact in float64, one rounding in float32)."""
    rows, cols = q.shape[-2:]
    return grid.decode(q, dtype) * _expand(_grid(scale, q.shape).to(dtype), block, rows, cols)


def _scales(
    w: torch.Tensor, block: tuple[int, int], like: torch.Tensor, ue8m0: bool, grid: Grid
) -> torch.Tensor:
    """Per-block absmax over the grid's largest value, rounded to the stored scale dtype:
    [..., R, C] in that dtype."""
    return _from_amax(_block_reduce(w.abs(), block, "amax"), like, ue8m0, grid)


def quantize(
    w: torch.Tensor,
    like_scale: torch.Tensor,
    block: tuple[int, int],
    ue8m0: bool = False,
    grid: Grid = E4M3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The logical weight [..., out, in] -> (codes, scales in like_scale's dtype and shape):
    round to nearest on a per-block grid."""
    rows, cols = w.shape[-2:]
    s = _scales(w, block, like_scale, ue8m0, grid)
    dt = torch.float64 if w.dtype == torch.float64 else torch.float32
    x = w.to(dt) / _expand(s.to(dt), block, rows, cols)
    return grid.encode(grid.nearest(x)), s.reshape(like_scale.shape)


def values(
    scheme: Scheme,
    stored: torch.Tensor,
    scale: torch.Tensor,
    block: tuple[int, int],
    dtype=torch.float32,
) -> torch.Tensor:
    """A weight's logical values [..., out, in] from its stored codes and scales."""
    return dequantize(scheme.unpack(stored), scheme.scale_values(scale), block, dtype, scheme.grid)


def edit_stored(
    scheme: Scheme,
    stored: torch.Tensor,
    scale: torch.Tensor,
    block: tuple[int, int],
    d: torch.Tensor,
    axis: int,
    spec: edits.EditSpec,
) -> tuple[torch.Tensor, torch.Tensor, Residue]:
    """`edit` on a weight as the checkpoint stores it: (new codes, new scales) in the stored
    dtypes and shapes, and the residues."""
    q, s, res = edit(
        scheme.unpack(stored),
        scheme.scale_values(scale),
        block,
        scheme.ue8m0,
        d,
        axis,
        spec,
        scheme.grid,
    )
    return scheme.pack(q, stored), scheme.store_scales(s, scale), res


SHIFT_ROUNDS = 2  # shifted roundings: most of the leftover projection goes
FEEDBACK_ROUNDS = 12  # then single flips: each round leaves at most half its last flip
FEEDBACK_CANDIDATES = 64  # per vector and round: the cheapest flips, by an estimate


def grid_bracket(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The e4m3 values just below and just above t (equal on the grid)."""
    return E4M3.bracket(t)


def feedback(
    v: torch.Tensor,
    t: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    s: torch.Tensor,
    r: torch.Tensor,
) -> torch.Tensor:
    """Re-round a few elements of each vector so that its projection on r matches the float
    edit's. All [n, hidden], in grid units: v the chosen values (each lo or hi), t the float
    edit, lo/hi the grid values around t; s the per-element scales; r: [hidden] unit. Returns
    new values, still each lo or hi. Per vector, the flips (lo <-> hi) that move the leftover
    projection towards zero are ranked by added error per projection fixed; the cheapest k are
    taken while they bring it closer to zero."""
    rs = r.to(v) * s  # [n, hidden]: projection per grid unit
    err = ((v - t) * rs).sum(dim=1)  # [n]: leftover projection, in weight units
    alt = torch.where(v == lo, hi, lo)
    step = (alt - v) * rs  # what a flip does to the projection
    cost = ((alt - t).abs() - (v - t).abs()) * s  # added rounding error
    k = min(FEEDBACK_CANDIDATES, step.shape[1])
    # a flip helps when it moves the projection towards zero by less than twice the leftover,
    # and k flips must be able to cancel it: none smaller than leftover / k, unless fewer than
    # k flips are that large (a coarse grid, a large leftover): then the k largest
    e = err.abs().unsqueeze(1)
    ok = (step * err.unsqueeze(1) < 0) & (step.abs() < 2 * e)
    kth = torch.where(ok, step.abs(), 0.0).topk(k, dim=1).values[:, -1:]  # [n, 1]
    useful = ok & (step.abs() >= torch.minimum(e / k, kth)) & (step.abs() > 0)
    rank = torch.where(useful, cost / step.abs().clamp_min(1e-30), torch.inf)
    best = rank.topk(k, dim=1, largest=False).indices  # [n, k], cheapest first
    g = torch.where(useful.gather(1, best), step.gather(1, best).abs(), 0.0)
    before = g.cumsum(dim=1) - g  # projection fixed by the flips ahead of each one
    take = (before + g / 2 < e) & (g > 0)
    return v.scatter(1, best, torch.where(take, alt.gather(1, best), v.gather(1, best)))


SLAB_ELEMENTS = 1 << 20  # elements per dequantized slab (the error feedback holds ~10 copies)


@dataclass
class Residue:
    """Worst |r . v| / |v| over an edited tensor's vectors, at each stage: the float edit, the
    same edit stored as bf16 (the reference), plain round-to-nearest, and what is written."""

    float: float = 0.0
    bf16: float = 0.0
    rtn: float = 0.0
    stored: float = 0.0

    def update(self, **stages: float) -> None:
        for k, v in stages.items():
            setattr(self, k, max(getattr(self, k), v))


def _slabs(
    shape: tuple[int, ...], axis: int, block: tuple[int, int], whole: bool
) -> tuple[list[tuple[tuple, tuple]], bool]:
    """Index tuples into a weight [..., out, in] and its scale grid, each a slab of whole
    vectors along `axis` (one of the last two); and whether slabs cut through blocks. A slab
    holds whole blocks when a block fits the slab budget; a block wider than that (a channel
    or a whole tensor as one block) is cut into slabs that each lie inside one block, and the
    scales are then found in a first pass."""
    lead = shape[:-2]
    other = (len(shape) - 1) if axis == len(shape) - 2 else (len(shape) - 2)
    k = other - (len(shape) - 2)  # 0: slabs of rows, 1: slabs of columns
    unit, length = block[k], shape[other]
    budget = max(1, SLAB_ELEMENTS // max(1, shape[axis]))  # vectors per slab
    split = False
    if whole or length <= budget:
        per = length
    elif unit <= budget:
        per = budget // unit * unit
    else:  # the largest divisor of the block width within budget: slabs never straddle blocks
        per = max(n for n in range(1, budget + 1) if unit % n == 0)
        split = per < unit
    cuts = []
    for idx in itertools.product(*(range(n) for n in lead)):
        for a in range(0, length, per):
            cut = slice(a, min(a + per, length))
            cut_s = slice(a // unit, -(-min(a + per, length) // unit))
            pair = (
                ((*idx, cut, slice(None)), (*idx, cut_s, slice(None)))
                if k == 0
                else ((*idx, slice(None), cut), (*idx, slice(None), cut_s))
            )
            cuts.append(pair)
    return cuts, split


def edit(
    q: torch.Tensor,
    scale: torch.Tensor,
    block: tuple[int, int],
    ue8m0: bool,
    d: torch.Tensor,
    axis: int,
    spec: edits.EditSpec,
    fmt: Grid = E4M3,
) -> tuple[torch.Tensor, torch.Tensor, Residue]:
    """The edit of a quantized weight, codes q [..., out, in] (one byte each) with its scale
    values, slab by slab: dequantize, edit with the float kernel, quantize, feed the rounding
    back. Returns new (codes, scales) in the given dtypes and shapes, and the residues. Sparse
    surgery (rows < 1) ranks vectors across the whole tensor, so it takes the tensor as one
    slab. When a block is wider than a slab (per-channel scales of a writer, a per-tensor
    scale), a first pass edits every slab
    for the blocks' new absmax only, and the second edits again (the same bytes: the edit is
    deterministic) and rounds on those scales: twice the edit, memory one slab."""
    q, scale = q.clone(), scale.clone()
    sgrid = _grid(scale, q.shape)
    single = d.ndim == 1 or (d.ndim == 2 and d.shape[0] == 1)
    cols = axis == q.ndim - 2  # vectors are columns: slabs are edited transposed, as rows
    cuts, split = _slabs(tuple(q.shape), axis, block, whole=spec.rows < 1.0)
    fixed = None
    if split:
        amax = torch.zeros(sgrid.shape, dtype=torch.float32, device=q.device)
        touched = torch.zeros(sgrid.shape, dtype=torch.bool, device=q.device)
        for cut, cut_s in cuts:
            q_slab, s_slab = q[cut], sgrid[cut_s]
            if cols:  # the orientation of the second pass: the very same float edit
                orig, x, _ = _edited(q_slab.T.contiguous(), s_slab.T, block[::-1], d, spec, fmt)
                orig, x = orig.T, x.T
            else:
                orig, x, _ = _edited(q_slab, s_slab, block, d, spec, fmt)
            changed = x != orig
            amax[cut_s] = torch.maximum(amax[cut_s], _block_reduce(x.abs(), block, "amax"))
            touched[cut_s] |= _block_reduce(changed, block, "any")
        new_grid = torch.where(touched, _from_amax(amax, sgrid, ue8m0, fmt), sgrid)
        fixed = (new_grid, ~touched)
    res = Residue()
    source = sgrid.clone()  # slabs sharing a block read its old scale, not the one written
    for cut, cut_s in cuts:
        q_slab, s_slab = q[cut], source[cut_s]
        given = (fixed[0][cut_s], fixed[1][cut_s]) if fixed else None
        if cols:
            given = (given[0].T, given[1].T) if given else None
            new_q, new_s, stages = _edit_rows(
                q_slab.T.contiguous(), s_slab.T, block[::-1], ue8m0, d, single, spec, given, fmt
            )
            new_q, new_s = new_q.T, new_s.T
        else:
            new_q, new_s, stages = _edit_rows(
                q_slab, s_slab, block, ue8m0, d, single, spec, given, fmt
            )
        q[cut] = new_q
        sgrid[cut_s] = new_s
        res.update(**stages)
    return q, sgrid.reshape(scale.shape), res


def _edited(
    q: torch.Tensor, s: torch.Tensor, block: tuple[int, int], d: torch.Tensor, spec, fmt: Grid
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A slab's values, their float edit (vectors as rows) and its residue |Q v'| / |v'|."""
    orig = dequantize(q, s, block, grid=fmt)
    x = orig.clone()
    _, rel = edits.project_out_(x, d, 1, spec)
    return orig, x, rel


def _block_reduce(x: torch.Tensor, block: tuple[int, int], how: str) -> torch.Tensor:
    """Per-block amax (or any) of x [..., rows, cols] starting on a block boundary (edge blocks
    padded): [..., R, C]."""
    rows, cols = x.shape[-2:]
    pad = torch.nn.functional.pad(x, (0, -cols % block[1], 0, -rows % block[0]))
    R, C = pad.shape[-2] // block[0], pad.shape[-1] // block[1]
    tiles = pad.reshape(*pad.shape[:-2], R, block[0], C, block[1])
    return tiles.amax(dim=(-3, -1)) if how == "amax" else tiles.any(dim=-1).any(dim=-2)


def _from_amax(amax: torch.Tensor, like: torch.Tensor, ue8m0: bool, fmt: Grid) -> torch.Tensor:
    """Scales from block absmax, in the stored scale dtype: the block's largest magnitude
    lands on the grid's largest value (powers of two round up, so it lands below)."""
    s = amax.double() / fmt.highest
    if ue8m0:
        s = torch.exp2(torch.ceil(torch.log2(s.clamp_min(2.0**-127))))
    s = torch.where(amax > 0, s, torch.ones_like(s))
    stored = s.to(like.dtype)
    if ue8m0 or stored.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return stored
    # a scale rounded down would push the block's largest value past the grid's
    # end, where it would be clipped: round up instead
    up = torch.nextafter(stored, torch.full_like(stored, math.inf))
    return torch.where(stored.double() < s, up, stored)


def _edit_rows(
    q: torch.Tensor,
    s: torch.Tensor,
    block: tuple[int, int],
    ue8m0: bool,
    d: torch.Tensor,
    single: bool,
    spec: edits.EditSpec,
    given: tuple[torch.Tensor, torch.Tensor] | None = None,
    fmt: Grid = E4M3,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """One slab q [n, hidden] (whole vectors as rows) and its scales [R, C]: whole blocks, or
    (given) the new scales and which blocks keep their bytes, found over the whole tensor.
    The rounding works on grid values in float32 and converts to codes once (conversions
    dominate the cost on a CPU)."""
    basis = edits.as_basis(d)
    orig, x, rel = _edited(q, s, block, d, spec, fmt)
    new_s = _scales(x, block, s, ue8m0, fmt) if given is None else given[0]
    per = _expand(new_s.float(), block, *x.shape)
    t = x / per  # the edit in grid units
    lo, hi = fmt.bracket(t)
    v = torch.where(t - lo <= hi - t, lo, hi)  # round to nearest
    rtn = _rel(v * per, basis)
    changed = x != orig  # [n, hidden]
    if single:
        r = basis[0].to(x)
        v = _shifted_rounding(t, lo, hi, per, r)
        # [n, hidden] @ [hidden] -> [n]: what bf16 storage would leave of the edit's projection;
        # each vector's float8 residue is brought down to that level (or to the slab's median
        # of it: a vector whose bf16 rounding happens to cancel is not chased further)
        bf16 = ((x.to(torch.bfloat16).float() - x) @ r).abs()
        enough = bf16.clamp_min(bf16.median())
        todo = changed.any(dim=1)
        for _ in range(FEEDBACK_ROUNDS):
            todo &= (((v - t) * per) @ r).abs() > enough
            rows = todo.nonzero().squeeze(1)
            if not rows.numel():
                break
            fixed = feedback(v[rows], t[rows], lo[rows], hi[rows], per[rows], r)
            v = v.index_copy(0, rows, fixed)
    kept = ~_block_reduce(changed, block, "any") if given is None else given[1]  # [R, C]
    new_s = torch.where(kept, s, new_s)
    keep = _expand(kept, block, *x.shape)
    new_q = fmt.encode(v)  # exact: every value is on the grid
    new_q = torch.where(keep, q.view(torch.uint8), new_q.view(torch.uint8)).view(q.dtype)
    stages = {
        "float": rel,
        "bf16": _rel(x.to(torch.bfloat16), basis),
        "rtn": rtn,
        "stored": _rel(torch.where(keep, orig, v * per), basis),
    }
    return new_q, new_s, stages


def _shifted_rounding(
    t: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, per: torch.Tensor, r: torch.Tensor
) -> torch.Tensor:
    """Choose lo or hi for every element of t [n, hidden] (grid units), shifting each vector
    along r by what the previous choice left along r. An edit moves each element by less than
    half a grid step, so plain rounding snaps most of them back and restores most of the
    removed component (|r . e| close to |e|, not |e| / sqrt(hidden)); a few shifted roundings
    push the rounding error off r. Scales stay fixed."""
    shift = torch.zeros(t.shape[0], dtype=t.dtype, device=t.device)  # [n]
    v = t
    for _ in range(SHIFT_ROUNDS):
        z = t - torch.outer(shift, r) / per  # [n] x [hidden] -> [n, hidden], in grid units
        v = torch.where(z - lo < hi - z, lo, hi)
        shift = shift + ((v - t) * per) @ r  # [n, hidden] @ [hidden] -> [n]: left along r
    return v


def _rel(w: torch.Tensor, basis: torch.Tensor) -> float:
    """max |Q v| / |v| over the rows of w [n, hidden] (zero rows skipped)."""
    x = w.float()
    coef = (x @ basis.float().to(x.device).T).square().sum(dim=1).sqrt()  # [n, k] -> [n]
    norms = x.square().sum(dim=1).sqrt()
    keep = norms > 0
    return (coef[keep] / norms[keep]).max().item() if keep.any() else 0.0
