"""Check an output against its input and orders, reading bytes from disk (never a loaded model):
every edited tensor has (almost) no component left along its direction and kept its norms where
promised; every other tensor, and every header, is byte-identical to the input."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ablation import edits, quant
from ablation.checkpoint import ShardFiles, TensorInfo, open_index, read_tensor
from ablation.errors import AblationError
from ablation.rewrite import HEAD_SHARD, Edit, Plan

LOG = logging.getLogger(__name__)
COMPARE_CHUNK = 64 * 1024 * 1024


@dataclass
class Report:
    edited: int = 0
    identical: int = 0
    worst_residue: float = 0.0
    worst_norm_change: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def tolerance(dtype: torch.dtype) -> float:
    """One rounding of the stored dtype bounds the residue and the norm change."""
    return max(2 * torch.finfo(dtype).eps, 1e-4)


def verify(plan: Plan, out: Path) -> Report:
    """Edited tensors against the expected edit; quantized weights in their dequantized values."""
    out_index = open_index(out)
    report = Report()
    extra = {HEAD_SHARD} if plan.extra else set()
    if set(out_index.shards) != set(plan.index.shards) | extra:
        raise AblationError(
            f"{out}: shards differ from the input's "
            f"({sorted(set(out_index.shards) ^ (set(plan.index.shards) | extra))[:4]})"
        )
    if plan.extra:
        with ShardFiles(plan.model_dir) as before, ShardFiles(out) as after:
            for e in plan.extra:
                assert e.target.write_as is not None
                written = out_index.tensors.get(e.target.write_as)
                if written is None:
                    report.failures.append(f"{e.target.write_as}: missing from the output")
                    continue
                _check_edit(plan, e, before.read(e.target.info), after.read(written), report)
    total = sum(h.size for h in plan.index.shards.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="verify", disable=None) as bar:
        for shard, header in plan.index.shards.items():
            out_header = out_index.shards[shard]
            if out_header.tensors != header.tensors or out_header.size != header.size:
                report.failures.append(f"{shard}: header or size differs from the input")
                continue
            planned = {e.target.name: e for e in plan.shards[shard]}
            scales = {e.target.scale.name for e in plan.edits if e.target.scale is not None}
            fd_in = os.open(header.path, os.O_RDONLY)
            fd_out = os.open(out_header.path, os.O_RDONLY)
            try:
                if _read(fd_in, 0, _data_start(header)) != _read(fd_out, 0, _data_start(header)):
                    report.failures.append(f"{shard}: header bytes differ")
                for name, info in header.tensors.items():
                    if name in planned and planned[name].target.scale is not None:
                        _check_quantized(plan, planned[name], out, report)
                    elif name in planned:
                        before, after = read_tensor(fd_in, info), read_tensor(fd_out, info)
                        _check_edit(plan, planned[name], before, after, report)
                    elif name in scales:
                        pass  # a quantized weight's scale: checked with its weight
                    elif not _same_bytes(fd_in, fd_out, info):
                        report.failures.append(f"{name}: not planned for editing, but changed")
                    else:
                        report.identical += 1
                    bar.update(info.nbytes)
            finally:
                os.close(fd_in)
                os.close(fd_out)
    return report


def _data_start(header) -> int:
    return min((t.start for t in header.tensors.values()), default=header.size)


def _read(fd: int, offset: int, n: int) -> bytes:
    return os.pread(fd, n, offset)


def _same_bytes(fd_a: int, fd_b: int, info: TensorInfo) -> bool:
    pos = info.start
    while pos < info.end:
        n = min(COMPARE_CHUNK, info.end - pos)
        if os.pread(fd_a, n, pos) != os.pread(fd_b, n, pos):
            return False
        pos += n
    return True


def _check_edit(
    plan: Plan, e: Edit, before: torch.Tensor, after: torch.Tensor, report: Report
) -> None:
    info = e.target.info
    d = plan.directions[e.direction]
    axis = e.target.hidden_axis
    tol = tolerance(after.dtype)
    report.edited += 1
    if e.scale == 1.0 and e.rows == 1.0:
        _, rel = edits.projection_residue(after, d, axis)
        report.worst_residue = max(report.worst_residue, rel)
        if rel > tol:
            report.failures.append(
                f"{info.name}: |v.r|/|v| = {rel:.2e} after the edit (tolerance {tol:.1e})"
            )
    else:
        spec = e.spec()
        want = edits.project_out(before, d, axis, spec).double()
        err = (after.double() - want).abs().max().item() if want.numel() else 0.0
        bound = tol * max(before.double().abs().max().item() if before.numel() else 0.0, 1e-30)
        if err > bound:
            report.failures.append(
                f"{info.name}: differs from the expected partial edit by {err:.2e}"
            )
    if e.norm_preserving:
        change = edits.norm_change(before, after, axis)
        report.worst_norm_change = max(report.worst_norm_change, change)
        if change > tol:
            report.failures.append(
                f"{info.name}: vector norms changed by {change:.2e} (tolerance {tol:.1e})"
            )


def _check_quantized(plan: Plan, e: Edit, out: Path, report: Report) -> None:
    """A quantized weight: the stored values must lie on the grid points around the float edit
    of the input's values (quant.py rounds each element to one of the two grid values around
    it), so |after - want| <= the spacing there, element by element; the residue and the norm
    change are then bounded by the same spacing, per vector."""
    t = e.target
    scheme = plan.arch.quant
    assert t.scale is not None and t.block is not None and scheme is not None
    with ShardFiles(plan.model_dir) as before, ShardFiles(out) as written:
        q0, s0 = before.read(t.info), before.read(t.scale)
        q1, s1 = written.read(t.info), written.read(t.scale)
    want = quant.values(scheme, q0, s0, t.block, torch.float64)
    want = edits.project_out(
        want, plan.directions[e.direction], t.hidden_axis, e.spec(torch.float64)
    )
    after = quant.values(scheme, q1, s1, t.block, torch.float64)
    per = quant.per_element(scheme.scale_values(s1), t.block, after.shape)
    # the expected edit is recomputed here in float64, the rewrite ran in float32 (maybe on a
    # GPU): take the grid points around want widened by a relative 1e-6 on each side
    grid = want / per
    lo = scheme.grid.bracket(grid - 1e-6 * grid.abs())[0]
    hi = scheme.grid.bracket(grid + 1e-6 * grid.abs())[1]
    gap = (hi - lo) * per
    err = (after - want).abs()
    slack = 1e-9 * want.abs() + 1e-30
    report.edited += 1
    if (err > gap + slack).any():
        i = int((err - gap).argmax())
        report.failures.append(
            f"{t.info.name}: element {i} is {err.flatten()[i].item():.3e} from the expected "
            f"edit, more than the {scheme.grid.name} grid spacing there "
            f"({gap.flatten()[i].item():.3e})"
        )
    _, rel = edits.projection_residue(after, plan.directions[e.direction], t.hidden_axis)
    report.worst_residue = max(report.worst_residue, rel)
    if e.norm_preserving:
        report.worst_norm_change = max(
            report.worst_norm_change, edits.norm_change(want, after, t.hidden_axis)
        )
