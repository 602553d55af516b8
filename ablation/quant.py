"""Quantized weights as their logical float values and back (pure tensor math, no files).

A checkpoint stored in FP8 keeps, beside each float8_e4m3fn weight W [out, in], a grid of scales:
the logical weight is W * s with one s per block (DeepSeek-V3/R1, Kimi-K2, Qwen3-FP8: 128x128
blocks in `weight_scale_inv`), per output channel or per tensor (compressed-tensors FP8 in
`weight_scale`, [out, 1] or [1]). Both are one codec with a block size: a channel is a
(1, in) block, a tensor an (out, in) block. The rewriter dequantizes a slab of whole blocks and
whole hidden-axis vectors, edits it with the float kernels, and quantizes it back here:

- scale per block from the edited block's absmax over 448 (e4m3's largest value), rounded to
  the scale's stored dtype (and up to a power of two for `scale_fmt: ue8m0`), so
  dequantize(quantize(x)) is a fixed point of the codec;
- blocks whose values the edit left exactly as they were keep their original bytes;
- every other element is stored as one of the two e4m3 values around its edited value
  (`grid_bracket`), but not simply the nearer one: an edit moves each element by less than half
  a grid step, so plain rounding snaps most of them back and restores much of the removed
  component (|r . v| / |v| near 1e-2, ~50x what bf16 storage leaves). Two shifted roundings
  (each vector shifted along r by what the last rounding left along r) remove most of it; then
  error feedback flips single elements to their other neighbour, cheapest per projection fixed
  first, on the vectors still above the level bf16 would leave, up to five rounds. The scales
  stay those of the absmax; no element moves more than one grid step from its edited value
  (what `verify` checks).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from ablation import edits
from ablation.errors import AblationError

E4M3_MAX = 448.0
SUPPORTED = (
    "fp8 with block scales (quant_method fp8: weight + weight_scale_inv)",
    "compressed-tensors fp8, per channel, per tensor or per block (weight + weight_scale)",
)


@dataclass(frozen=True)
class Fp8:
    """One FP8 scheme of a checkpoint: the companion scale's suffix, the block (None: derived
    per tensor from the scale grid: per channel or per tensor) and power-of-two scales."""

    name: str
    scale_suffix: str  # the scale tensor is the weight's name with .weight replaced by this
    block: tuple[int, int] | None
    ue8m0: bool = False

    def scale_name(self, weight: str) -> str:
        return weight.removesuffix(".weight") + self.scale_suffix

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


def detect(config: dict) -> Fp8 | None:
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
        return Fp8("fp8", ".weight_scale_inv", _block(qc.get("weight_block_size")), _ue8m0(qc))
    if method == "compressed-tensors":
        return _compressed_tensors(qc)
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


def _compressed_tensors(qc: dict) -> Fp8:
    """compressed-tensors: every weight scheme of its config groups must be 8-bit float."""
    groups = qc.get("config_groups") or {}
    schemes = [g.get("weights") or {} for g in groups.values() if isinstance(g, dict)]
    if not schemes:
        raise AblationError("config.json: compressed-tensors config without config_groups")
    blocks = set()
    for w in schemes:
        kind = f"{w.get('type', '?')}{w.get('num_bits', '?')}"
        if kind != "float8":
            raise AblationError(
                f"config.json: compressed-tensors {kind} weights ({qc.get('format')}) cannot "
                "be edited in place yet; supported: " + "; ".join(SUPPORTED)
            )
        strategy = w.get("strategy", "tensor")
        if strategy not in ("tensor", "channel", "block"):
            raise AblationError(f"config.json: compressed-tensors strategy {strategy!r}")
        blocks.add(_block(w.get("block_structure")) if strategy == "block" else None)
    if len(blocks) > 1:
        raise AblationError("config.json: compressed-tensors groups with different blocks")
    return Fp8("compressed-tensors", ".weight_scale", blocks.pop(), _ue8m0(qc))


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
    q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype=torch.float32
) -> torch.Tensor:
    """q [..., out, in] float8 and its scales [..., R, C] -> the logical weight (exact in
    float64, one rounding in float32)."""
    rows, cols = q.shape[-2:]
    return q.to(dtype) * _expand(_grid(scale, q.shape).to(dtype), block, rows, cols)


def _scales(
    w: torch.Tensor, block: tuple[int, int], like: torch.Tensor, ue8m0: bool
) -> torch.Tensor:
    """Per-block absmax / 448, rounded to the stored scale dtype: [..., R, C] in that dtype."""
    return _from_amax(_block_reduce(w.abs(), block, "amax"), like, ue8m0)


def quantize(
    w: torch.Tensor, like_scale: torch.Tensor, block: tuple[int, int], ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The logical weight [..., out, in] -> (float8 q, scales in like_scale's dtype and
    shape): round to nearest on a per-block grid."""
    rows, cols = w.shape[-2:]
    s = _scales(w, block, like_scale, ue8m0)
    dt = torch.float64 if w.dtype == torch.float64 else torch.float32
    x = w.to(dt) / _expand(s.to(dt), block, rows, cols)
    q = x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, s.reshape(like_scale.shape)


SHIFT_ROUNDS = 2  # shifted roundings: most of the leftover projection goes
FEEDBACK_ROUNDS = 5  # then single flips: each round leaves at most half its last flip
FEEDBACK_CANDIDATES = 64  # per vector and round: the cheapest flips, by an estimate


def grid_bracket(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The e4m3 values just below and just above t (equal on the grid), from the grid's shape
    instead of float8 conversions (5x cheaper on a CPU): normals (1 + m/8) 2^e have spacing
    2^(e-3), subnormals 2^-9; the grid stops at +-448."""
    t = t.clamp(-E4M3_MAX, E4M3_MAX)
    gap = torch.exp2(torch.floor(torch.log2(t.abs().clamp_min(2.0**-6))) - 3)
    lo = torch.floor(t / gap) * gap
    return lo, torch.where(lo == t, lo, lo + gap)


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
    # and k flips must be able to cancel it: none smaller than leftover / k
    e = err.abs().unsqueeze(1)
    useful = (step * err.unsqueeze(1) < 0) & (step.abs() < 2 * e) & (step.abs() >= e / k)
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


def edit_fp8(
    q: torch.Tensor,
    scale: torch.Tensor,
    block: tuple[int, int],
    ue8m0: bool,
    d: torch.Tensor,
    axis: int,
    spec: edits.EditSpec,
) -> tuple[torch.Tensor, torch.Tensor, Residue]:
    """The edit of a float8 weight q [..., out, in] with its scales, slab by slab: dequantize,
    edit with the float kernel, quantize, feed the rounding back. Returns new (q, scale) in
    the stored dtypes and shapes, and the residues. Sparse surgery (rows < 1) ranks vectors
    across the whole tensor, so it takes the tensor as one slab. When a block is wider than a
    slab (per-channel scales of a writer, a per-tensor scale), a first pass edits every slab
    for the blocks' new absmax only, and the second edits again (the same bytes: the edit is
    deterministic) and rounds on those scales: twice the edit, memory one slab."""
    q, scale = q.clone(), scale.clone()
    grid = _grid(scale, q.shape)
    single = d.ndim == 1 or (d.ndim == 2 and d.shape[0] == 1)
    cols = axis == q.ndim - 2  # vectors are columns: slabs are edited transposed, as rows
    cuts, split = _slabs(tuple(q.shape), axis, block, whole=spec.rows < 1.0)
    fixed = None
    if split:
        amax = torch.zeros(grid.shape, dtype=torch.float32, device=q.device)
        touched = torch.zeros(grid.shape, dtype=torch.bool, device=q.device)
        for cut, cut_s in cuts:
            q_slab, s_slab = q[cut], grid[cut_s]
            if cols:  # the orientation of the second pass: the very same float edit
                orig, x, _ = _edited(q_slab.T.contiguous(), s_slab.T, block[::-1], d, spec)
                orig, x = orig.T, x.T
            else:
                orig, x, _ = _edited(q_slab, s_slab, block, d, spec)
            changed = x != orig
            amax[cut_s] = torch.maximum(amax[cut_s], _block_reduce(x.abs(), block, "amax"))
            touched[cut_s] |= _block_reduce(changed, block, "any")
        new_grid = torch.where(touched, _from_amax(amax, grid, ue8m0), grid)
        fixed = (new_grid, ~touched)
    res = Residue()
    source = grid.clone()  # slabs sharing a block read its old scale, not the one written
    for cut, cut_s in cuts:
        q_slab, s_slab = q[cut], source[cut_s]
        given = (fixed[0][cut_s], fixed[1][cut_s]) if fixed else None
        if cols:
            given = (given[0].T, given[1].T) if given else None
            new_q, new_s, stages = _edit_rows(
                q_slab.T.contiguous(), s_slab.T, block[::-1], ue8m0, d, single, spec, given
            )
            new_q, new_s = new_q.T, new_s.T
        else:
            new_q, new_s, stages = _edit_rows(q_slab, s_slab, block, ue8m0, d, single, spec, given)
        q[cut] = new_q
        grid[cut_s] = new_s
        res.update(**stages)
    return q, grid.reshape(scale.shape), res


def _edited(
    q: torch.Tensor, s: torch.Tensor, block: tuple[int, int], d: torch.Tensor, spec
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A slab's values, their float edit (vectors as rows) and its residue |Q v'| / |v'|."""
    orig = dequantize(q, s, block)
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


def _from_amax(amax: torch.Tensor, like: torch.Tensor, ue8m0: bool) -> torch.Tensor:
    """Scales from block absmax, in the stored scale dtype."""
    s = amax.double() / E4M3_MAX
    if ue8m0:
        s = torch.exp2(torch.ceil(torch.log2(s.clamp_min(2.0**-127))))
    return torch.where(amax > 0, s, torch.ones_like(s)).to(like.dtype)


def _edit_rows(
    q: torch.Tensor,
    s: torch.Tensor,
    block: tuple[int, int],
    ue8m0: bool,
    d: torch.Tensor,
    single: bool,
    spec: edits.EditSpec,
    given: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """One slab q [n, hidden] (whole vectors as rows) and its scales [R, C]: whole blocks, or
    (given) the new scales and which blocks keep their bytes, found over the whole tensor.
    The rounding works on grid values in float32 and converts to float8 once (conversions
    dominate the cost on a CPU)."""
    basis = edits.as_basis(d)
    orig, x, rel = _edited(q, s, block, d, spec)
    new_s = _scales(x, block, s, ue8m0) if given is None else given[0]
    per = _expand(new_s.float(), block, *x.shape)
    t = x / per  # the edit in grid units
    lo, hi = grid_bracket(t)
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
    new_q = v.to(torch.float8_e4m3fn)  # exact: every value is on the grid
    new_q = torch.where(keep, q.view(torch.uint8), new_q.view(torch.uint8))
    stages = {
        "float": rel,
        "bf16": _rel(x.to(torch.bfloat16), basis),
        "rtn": rtn,
        "stored": _rel(torch.where(keep, orig, v * per), basis),
    }
    return new_q.view(torch.float8_e4m3fn), new_s, stages


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
