"""Plan execution: source tensors -> normalized tensors and back, one rearrange per source tensor, on any device."""
from __future__ import annotations

from typing import Mapping

import einops
import torch

from relayout.compiler import Op, Plan
from relayout.errors import RelayoutError


def _axis_pos(side: str, axis: str) -> int:
    return side.split().index(axis)


def forward_op(op: Op, tensors: Mapping[str, torch.Tensor], block: str = "", fresh: bool = True) -> dict[str, torch.Tensor]:
    """One op: its source tensor(s) -> its targets. fresh: outputs never share memory with inputs or each other."""
    sources = [tensors[k] for k in op.keys]
    x = torch.stack(sources) if op.stacked else sources[0]
    sizes = dict(op.sizes)
    pattern = f"{op.lhs} -> {op.rhs}"
    y = einops.repeat(x, pattern, **sizes) if op.repeated else einops.rearrange(x, pattern, **sizes)
    if op.diagonal is not None:
        y = _take_diagonal(y, op, block)
    parts = y.unbind(_axis_pos(_rhs_after_diag(op), op.split)) if op.split else [y] * len(op.targets)
    out = {t: _contiguous(p) for t, p in zip(op.targets, parts)}
    if fresh:
        taken = {src.untyped_storage().data_ptr() for src in sources}
        for t, value in out.items():
            if value.untyped_storage().data_ptr() in taken:
                out[t] = value = value.clone()
            taken.add(value.untyped_storage().data_ptr())
    return out


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    """t.contiguous(), in two cheap passes on CPU when the innermost axis is strided in memory.

    Rank-major PEFT B tensors ('(r e)' -> 'e ... r') put a small axis (r) innermost that is strided by E in
    memory; torch's CPU copy gathers such a permutation element by element (~0.4 GB/s for bf16). Moving that
    axis innermost first (a batched 2D transpose), then permuting whole rows, gives the same tensor ~4x faster.
    """
    if t.is_contiguous() or t.device.type != "cpu" or t.dim() < 2 or t.numel() < 1 << 16 \
            or t.stride(-1) == 1 or 0 in t.stride():
        return t.contiguous()
    last = t.dim() - 1
    memory_order = sorted(range(t.dim()), key=lambda d: (-t.stride(d), d))
    q = [d for d in memory_order if d != last] + [last]
    staged = t.permute(q).contiguous()  # input memory order, with the output's innermost axis moved innermost
    return staged.permute([q.index(d) for d in range(t.dim())]).contiguous()


def _rhs_after_diag(op: Op) -> str:
    return " ".join(a for a in op.rhs.split() if not (op.diagonal and a == op.diagonal[1]))


def _take_diagonal(y: torch.Tensor, op: Op, block: str) -> torch.Tensor:
    """y (op.rhs axes, e.g. two twob e i r) -> its diagonal blocks (two e i r); raises if another block is non-zero."""
    a, b = _axis_pos(op.rhs, op.diagonal[0]), _axis_pos(op.rhs, op.diagonal[1])
    moved = y.movedim((a, b), (0, 1))
    n = moved.shape[0]
    off = [(k, j) for k in range(n) for j in range(n) if k != j]
    # Views of the off-diagonal blocks, no copy; stops at the first non-zero block (a dense 3D adapter's first).
    if any(bool(moved[k, j].any()) for k, j in off):
        bad = sum(int(torch.count_nonzero(moved[k, j])) for k, j in off)
        raise RelayoutError(f"tensor '{block}{op.keys[0]}': not block-diagonal over ({op.diagonal[0]}, {op.diagonal[1]}): "
                            f"{bad} non-zero values off the diagonal blocks")
    return torch.stack([moved[k, k] for k in range(n)]).movedim(0, a)


def forward(plan: Plan, tensors: Mapping[str, torch.Tensor], block: str = "", fresh: bool = True) -> dict[str, torch.Tensor]:
    """Source tensors of one block (relative keys) -> normalized targets ('w1.lora_a', ...), on their device.

    fresh=False lets targets share memory with the sources and with each other (gate and up of a shared A):
    for callers that only read the result, such as a writer.
    """
    out: dict[str, torch.Tensor] = {}
    try:
        for op in plan.ops:
            out.update(forward_op(op, tensors, block, fresh))
    except RelayoutError as exc:
        raise RelayoutError(f"{plan.file}: rule {plan.rule}, layout {plan.layout}: {exc}") from None
    return out


def _gather_targets(op: Op, normalized: Mapping[str, torch.Tensor], block: str) -> torch.Tensor:
    """The op's targets as one tensor over op.rhs without the second diagonal axis: stacked along split, else one."""
    if op.split:
        return torch.stack([normalized[t] for t in op.targets], dim=_axis_pos(_rhs_after_diag(op), op.split))
    first = normalized[op.targets[0]]
    for other in op.targets[1:]:
        if not torch.equal(first, normalized[other]):
            raise RelayoutError(f"layout stores one tensor for {', '.join(op.targets)} ('{block}{op.keys[0]}'), "
                                f"but {op.targets[0]} and {other} differ: write a layout that keeps them apart "
                                f"(peft-2d, or peft-3d-blockdiag)")
    return first


def _put_diagonal(y: torch.Tensor, op: Op) -> torch.Tensor:
    """Inverse of _take_diagonal: y (e.g. two e i r) -> op.rhs axes (two twob e i r), zero off the diagonal blocks."""
    a, b = _axis_pos(op.rhs, op.diagonal[0]), _axis_pos(op.rhs, op.diagonal[1])
    n = y.shape[a]
    full = y.new_zeros((n,) + y.shape).movedim(0, b)  # insert the second diagonal axis at its place
    moved, src = full.movedim((a, b), (0, 1)), y.movedim(a, 0)
    for k in range(n):
        moved[k, k] = src[k]
    return full


def _unrepeat(y: torch.Tensor, op: Op, block: str) -> tuple[torch.Tensor, str]:
    """y (op.rhs axes) -> size 1 along each repeated axis (e of a '1 r h -> e r h' source), and its new axes text."""
    rhs = op.rhs.split()
    for axis in op.repeated:
        pos = rhs.index(axis)
        first = y.narrow(pos, 0, 1)
        if not torch.equal(y, first.expand_as(y)):
            raise RelayoutError(f"'{block}{op.keys[0]}' is shared by all values of axis {axis}, "
                                f"but the normalized tensors differ along it")
        y, rhs[pos] = first, "1"
    return y, " ".join(rhs)


def inverse(plan: Plan, normalized: Mapping[str, torch.Tensor], block: str = "") -> dict[str, torch.Tensor]:
    """Normalized targets -> the plan's source tensors (relative keys); raises where the layout cannot hold them."""
    try:
        return _inverse(plan, normalized, block)
    except RelayoutError as exc:
        raise RelayoutError(f"{plan.file}: rule {plan.rule}, layout {plan.layout}: {exc}") from None


def _inverse(plan: Plan, normalized: Mapping[str, torch.Tensor], block: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for op in plan.ops:
        y = _gather_targets(op, normalized, block)
        if op.diagonal is not None:
            y = _put_diagonal(y, op)
        y, rhs = _unrepeat(y, op, block)
        used = set(rhs.split()) | set(op.lhs.replace("(", " ").replace(")", " ").split())
        x = einops.rearrange(y, f"{rhs} -> {op.lhs}", **{a: n for a, n in op.sizes if a in used}).contiguous()
        parts = x.unbind(0) if op.stacked else [x]
        out.update({k: p.contiguous() for k, p in zip(op.keys, parts)})
    return out
