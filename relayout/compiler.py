"""Rule + real shapes -> Plan: bind every axis to a size, or raise a RelayoutError that says where and why."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from relayout.errors import RelayoutError
from relayout.patterns import parse
from relayout.rule import NORMALIZED, Layout, Rule, TensorRule

GLOBAL_AXES = ("e", "h", "i")  # shared by every unit of a block; any other undeclared axis is local to its unit


@dataclass(frozen=True)
class Op:
    """One source tensor (or one stack of per-expert tensors) -> its normalized targets, all sizes bound."""

    unit: str
    keys: tuple[str, ...]            # relative source keys; several = stacked along a new leading axis e
    lhs: str                         # bound source side of the pattern
    rhs: str                         # normalized side (plain axes)
    sizes: tuple[tuple[str, int], ...]
    targets: tuple[str, ...]
    split: str | None
    diagonal: tuple[str, str] | None
    repeated: tuple[str, ...]        # axes only on the normalized side: broadcast forward, checked equal backward
    stacked: bool = False            # keys are per-expert tensors, stacked along a new leading axis e

    @property
    def source_shape(self) -> tuple[int, ...]:
        """Shape of the source tensor (of the stack, for per-expert keys)."""
        sizes = dict(self.sizes)
        return tuple(math.prod(sizes[a] for a in dim if a != "1") for dim in parse(f"{self.lhs} -> {self.rhs}").lhs.dims)


@dataclass(frozen=True)
class Plan:
    """A compiled relayout of one expert block: apply it to any layer's tensors of the same shapes."""

    rule: str
    file: str
    layout: str
    units: tuple[str, ...]
    ops: tuple[Op, ...]
    sizes: tuple[tuple[str, int], ...]      # global axes (e, h, i, declared) and per-unit ranks 'r@unit'
    config_ranks: tuple[tuple[str, int], ...]  # unit -> rank as the adapter's config states it

    def size(self, axis: str) -> int:
        return dict(self.sizes)[axis]

    def rank(self, unit: str) -> int:
        """The normalized rank of a unit."""
        return dict(self.sizes)[f"r@{unit}"]

    def config_rank(self, unit: str) -> int:
        return dict(self.config_ranks)[unit]

    @property
    def source_keys(self) -> tuple[str, ...]:
        return tuple(k for op in self.ops for k in op.keys)

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(t for op in self.ops for t in op.targets)


def _shown(axis: str) -> str:
    """An axis as the rule file names it ('r@gate_up' is axis r of unit gate_up)."""
    return axis.split("@")[0]


def _group(group: tuple[str, ...]) -> str:
    return "(" + " ".join(_shown(a) for a in group) + ")"


class _Solver:
    """Fixpoint binding of axis sizes from (axes group, size) constraints."""

    def __init__(self, where: str, known: dict[str, int]):
        self.where = where
        self.known = dict(known)
        self.pending: list[tuple[str, tuple[str, ...], int]] = []

    def add(self, label: str, group: tuple[str, ...], size: int) -> None:
        self.pending.append((label, group, size))
        self.solve()

    def _describe(self, group: tuple[str, ...]) -> str:
        return ", ".join(f"{_shown(a)}={self.known[a]}" for a in group if a in self.known)

    def solve(self) -> None:
        progress = True
        while progress:
            progress = False
            for item in list(self.pending):
                label, group, size = item
                unknown = [a for a in group if a != "1" and a not in self.known]
                product = math.prod(self.known.get(a, 1) for a in group if a != "1")
                if len(unknown) > 1:
                    continue
                self.pending.remove(item)
                progress = True
                if not unknown and product != size:
                    raise RelayoutError(f"{self.where}: {label}: axis {_group(group)}: expected {product} "
                                        f"({self._describe(group) or 'unit axis'}), got {size}")
                if unknown and (product == 0 or size % product or size == 0):
                    raise RelayoutError(f"{self.where}: {label}: axis {_shown(unknown[0])} of {_group(group)}: expected a "
                                        f"positive multiple of {product} ({self._describe(group)}), got {size}")
                if unknown:
                    self.known[unknown[0]] = size // product

    def unbound(self) -> None:
        for label, group, size in self.pending:
            missing = [a for a in group if a not in self.known and a != "1"]
            raise RelayoutError(f"{self.where}: {label}: cannot bind axes {', '.join(map(_shown, missing))} of {_group(group)} "
                                f"= {size}: give the adapter's rank (adapter_config.json r) or the model's num_experts")


def _local(axis: str, unit: str, declared: dict[str, int]) -> str:
    return axis if axis in GLOBAL_AXES or axis in declared or axis == "1" else f"{axis}@{unit}"


def _nest(rule: Rule, unit: str, units: tuple[str, ...]) -> str:
    """PEFT nests one wrapper per targeted parameter in model order: inner ones are saved under base_layer."""
    order = [p.role for p in rule.fused if p.role in units]
    return "base_layer." * (len(order) - 1 - order.index(unit)) if unit in order else ""


def _key_fields(rule: Rule, t: TensorRule, units: tuple[str, ...]) -> dict:
    """The values of a key template's fields other than {expert}."""
    return dict(proj=dict(rule.projections), fused={p.role: p.name for p in rule.fused}, nest=_nest(rule, t.unit, units))


def render_keys(rule: Rule, t: TensorRule, units: tuple[str, ...], experts: int | None) -> tuple[str, ...]:
    """Relative source keys of one tensor rule ({expert} expanded over 0..experts-1)."""
    fields = _key_fields(rule, t, units)
    if "{expert}" not in t.key:
        return (t.key.format(expert="", **fields),)
    return tuple(t.key.format(expert=e, **fields) for e in range(experts or 0))


def count_experts(rule: Rule, layout: Layout, units: tuple[str, ...], keys) -> int | None:
    """For per-expert keys: the number of experts the keys name (None if no key of these units has {expert}).

    1 + the highest expert index, but never more than the indices found: a stray index (experts.3000000.) then
    leaves a key the rendered keys do not account for, instead of rendering millions of keys.
    """
    t = next((t for t in layout.tensors if t.unit in units and "{expert}" in t.key), None)
    if t is None:
        return None
    prefix, _, suffix = t.key.format(expert="\0", **_key_fields(rule, t, units)).partition("\0")
    found = {k[len(prefix):len(k) - len(suffix)] for k in keys
             if len(k) > len(prefix) + len(suffix) and k.startswith(prefix) and k.endswith(suffix)}
    indices = {int(f) for f in found if f.isascii() and f.isdigit()}
    return min(1 + max(indices, default=-1), len(indices))


def layout_keys(rule: Rule, layout: Layout, units: tuple[str, ...], keys) -> set[str]:
    """The relative keys `units` of `layout` consume, for as many experts as the block's `keys` name."""
    experts = count_experts(rule, layout, units, keys)
    return {k for t in layout.tensors if t.unit in units for k in render_keys(rule, t, units, experts)}


def _check_units(layout: Layout, units: tuple[str, ...], where: str) -> tuple[str, ...]:
    unknown = [u for u in units if u not in layout.units]
    if unknown or not units:
        raise RelayoutError(f"{where}: units {list(units)} are not a non-empty subset of {list(layout.units)}")
    return tuple(u for u in layout.units if u in units)


def _bind(rule, layout, units, shapes, ranks, known, block, where, experts):
    declared = dict(rule.axes)
    solver = _Solver(where, {**declared, **known})
    for unit in units:
        if unit in ranks:
            group = tuple(_local(a, unit, declared) for a in layout.rank_axes(unit))
            solver.add(f"unit {unit} rank (adapter config r = {ranks[unit]})", group, ranks[unit])
    for t in layout.tensors:
        if t.unit not in units:
            continue
        keys = render_keys(rule, t, units, experts)
        for key in keys:
            if key not in shapes:
                raise RelayoutError(f"{where}: tensor '{block}{key}' is missing (unit {t.unit} needs it)")
        shape = tuple(shapes[keys[0]])
        for key in keys[1:]:
            if tuple(shapes[key]) != shape:
                raise RelayoutError(f"{where}: tensor '{block}{key}': shape {list(shapes[key])} differs from "
                                    f"'{block}{keys[0]}' {list(shape)}")
        if layout.per_expert and "{expert}" in t.key:
            shape = (len(keys),) + shape
        label = f"tensor '{block}{keys[0]}'"
        if len(shape) != len(t.pattern.lhs.dims):
            raise RelayoutError(f"{where}: {label}: expected {len(t.pattern.lhs.dims)} dimensions "
                                f"({t.pattern.lhs.text()}), got shape {list(shape)}")
        for n, (group, size) in enumerate(zip(t.pattern.lhs.dims, shape)):
            solver.add(f"{label} dim {n}", tuple(_local(a, t.unit, declared) for a in group), size)
    solver.unbound()
    return solver.known


@functools.lru_cache(maxsize=256)
def _compile(rule: Rule, layout_name: str, units: tuple[str, ...], shapes: tuple, ranks: tuple,
             known: tuple, block: str) -> Plan:
    layout = rule.layout(layout_name)
    where = f"{rule.file}: rule {rule.name}, layout {layout_name}"
    units = _check_units(layout, units, where)
    shapes, ranks = dict(shapes), dict(ranks)
    experts = count_experts(rule, layout, units, shapes)
    if experts is not None and dict(known).get("e", experts) != experts:
        raise RelayoutError(f"{where}: keys name {experts} experts under '{block}', the model has {dict(known)['e']}")
    extra = sorted(set(shapes) - layout_keys(rule, layout, units, shapes))
    if extra:  # before binding: an unconsumed key is the problem to name, not the sizes it leaves unknown
        raise RelayoutError(f"{where}: the rule does not account for tensor(s) " + ", ".join(f"'{block}{k}'" for k in extra))
    sizes = _bind(rule, layout, units, shapes, ranks, dict(known), block, where, experts)
    declared = dict(rule.axes)
    ops = []
    for t in layout.tensors:
        if t.unit not in units:
            continue
        axes = set(t.pattern.lhs.axes) | set(t.pattern.rhs.axes)
        bound = tuple(sorted((a, sizes[_local(a, t.unit, declared)]) for a in axes))
        ops.append(Op(t.unit, render_keys(rule, t, units, experts), t.pattern.lhs.text(), t.pattern.rhs.text(), bound,
                      t.targets, t.split, t.diagonal,
                      tuple(a for a in t.pattern.rhs.axes if a not in t.pattern.lhs.axes), "{expert}" in t.key))
    out_sizes = {a: sizes[a] for a in GLOBAL_AXES if a in sizes}
    out_sizes.update({f"r@{u}": sizes[f"r@{u}"] for u in units})
    cfg = tuple((u, math.prod(sizes[_local(a, u, declared)] for a in layout.rank_axes(u))) for u in units)
    return Plan(rule.name, rule.file, layout_name, units, tuple(ops), tuple(sorted(out_sizes.items())), cfg)


def compile_plan(rule: Rule, layout: str, units, shapes: dict, ranks: dict | None = None,
                 known: dict | None = None, block: str = "") -> Plan:
    """Bind a layout of `rule` to real shapes.

    shapes: relative key (under the experts module) -> shape, exactly the tensors of one expert block;
    ranks: unit -> the rank adapter_config.json gives it; known: sizes already known (e, h, i) from the model.
    Plans are cached by these (hashable) arguments.
    """
    return _compile(rule, layout, tuple(units), tuple(sorted((k, tuple(v)) for k, v in shapes.items())),
                    tuple(sorted((ranks or {}).items())), tuple(sorted((known or {}).items())), block)


def compile_inverse(rule: Rule, layout: str, normalized: dict, block: str = "") -> Plan:
    """Plan for writing normalized tensors (target -> shape) back in `layout`; the units follow from the targets."""
    lay = rule.layout(layout)
    where = f"{rule.file}: rule {rule.name}, layout {layout}"
    units = []
    for unit in lay.units:
        wanted = [tg for t in lay.tensors if t.unit == unit for tg in t.targets]
        have = [tg for tg in wanted if tg in normalized]
        if have and len(have) != len(wanted):
            raise RelayoutError(f"{where}: unit {unit} needs {', '.join(wanted)} together; the adapter has only "
                                f"{', '.join(have)}")
        units.append(unit) if have else None
    leftover = sorted(set(normalized) - {tg for t in lay.tensors if t.unit in units for tg in t.targets})
    if leftover or not units:
        raise RelayoutError(f"{where}: layout cannot hold normalized tensor(s) {', '.join(leftover) or '(none given)'}")
    sizes: dict[str, int] = {}
    for unit in units:
        for target in dict.fromkeys(tg for t in lay.tensors if t.unit == unit for tg in t.targets):
            for axis, size in zip(NORMALIZED[target], normalized[target]):
                name = axis if axis in GLOBAL_AXES else f"{axis}@{unit}"
                if sizes.setdefault(name, size) != size:
                    raise RelayoutError(f"{where}: normalized {target}: axis {axis}: expected {sizes[name]}, got {size}")
    declared = dict(rule.axes)
    shapes = {}
    experts = sizes.get("e")
    for t in lay.tensors:
        if t.unit in units:
            bound = {a: sizes.get(_local(a, t.unit, declared), declared.get(a)) for a in t.pattern.lhs.axes}
            shape = tuple(math.prod(bound[a] for a in g if a != "1") for g in t.pattern.lhs.dims)
            for key in render_keys(rule, t, tuple(units), experts):
                shapes[key] = shape[1:] if "{expert}" in t.key else shape
    ranks = {u: math.prod(sizes.get(_local(a, u, declared), declared.get(a)) for a in lay.rank_axes(u)) for u in units}
    return compile_plan(rule, layout, units, shapes, ranks, {a: sizes[a] for a in GLOBAL_AXES}, block)
