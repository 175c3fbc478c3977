"""Semantic checks of a resolved rule (after the schema): patterns, axes, names, sizes -> Rule."""
from __future__ import annotations

import string
from typing import TYPE_CHECKING

from relayout.errors import RelayoutError
from relayout.patterns import Pattern, parse
from relayout.rule import KEY_FIELDS, NORMALIZED, FusedParam, Layout, Problem, Rule, TensorRule

if TYPE_CHECKING:
    from relayout.ruleset import Resolved


class _Collector:
    def __init__(self, res: "Resolved"):
        self.res = res
        self.problems: list[Problem] = []

    def add(self, path: str, message: str) -> None:
        file, line = self.res.locate(path)
        self.problems.append(Problem(file, line, path, message))


def _substitute(text: str, templates: dict[str, str]) -> str:
    """Replace {name} template references in a pattern; unknown names raise."""
    out = []
    for literal, name, spec, conv in string.Formatter().parse(text):
        out.append(literal)
        if name is None:
            continue
        if name not in templates:
            raise RelayoutError(f"unknown template {{{name}}} (defined: {', '.join(sorted(templates)) or 'none'})")
        out.append(templates[name])
    return "".join(out)


def _check_key(key: str, data: dict, add, path: str) -> None:
    try:
        fields = [(name, spec) for _, name, spec, _ in string.Formatter().parse(key) if name is not None]
    except ValueError as exc:
        add(path, f"key template {key!r}: {exc}")
        return
    roles = {p["role"] for p in data.get("fused", [])}
    for name, _ in fields:
        base, _, index = name.partition("[")
        index = index.rstrip("]")
        if base not in KEY_FIELDS:
            add(path, f"key template {key!r}: unknown field {{{name}}} (allowed: expert, nest, proj[...], fused[...])")
        elif base == "proj" and index not in data.get("projections", {}):
            add(path, f"key template {key!r}: projection {index!r} is not declared in projections")
        elif base == "fused" and index not in roles:
            add(path, f"key template {key!r}: fused role {index!r} is not declared in fused")


def _check_tensor(t: dict, pattern: Pattern, axes: dict[str, int], bound_elsewhere: set[str], add, path: str) -> None:
    targets = [t["to"]] if isinstance(t["to"], str) else list(t["to"])
    lhs, rhs = set(pattern.lhs.axes), set(pattern.rhs.axes)
    split, diagonal = t.get("split"), t.get("diagonal")
    dropped = {diagonal[1]} if diagonal else set()
    for axis in sorted(lhs - rhs):
        add(path + ".pattern", f"axis {axis!r} is on the left of {pattern.text()!r} but not on the right: data would be lost")
    for axis in sorted(rhs - lhs - set(axes) - bound_elsewhere):
        add(path + ".pattern", f"axis {axis!r} appears only on the right of {pattern.text()!r} and nothing binds its size "
                               f"(declare it under axes or bind it from another tensor)")
    if split is not None:
        if split not in rhs:
            add(path + ".split", f"split axis {split!r} is not on the right of {pattern.text()!r}")
        elif axes.get(split) != len(targets):
            add(path + ".split", f"split axis {split!r} must have a declared size equal to the {len(targets)} targets, "
                                 f"got {axes.get(split)}")
    if diagonal is not None:
        a, b = diagonal
        if a not in rhs or b not in rhs:
            add(path + ".diagonal", f"diagonal axes {a!r}, {b!r} must both be on the right of {pattern.text()!r}")
        elif axes.get(a) is None or axes.get(a) != axes.get(b):
            add(path + ".diagonal", f"diagonal axes {a!r}, {b!r} need equal declared sizes, got {axes.get(a)} and {axes.get(b)}")
    kept = tuple(a for a in pattern.rhs.axes if a != split and a not in dropped)
    for target in targets:
        if kept != NORMALIZED[target]:
            add(path + ".to", f"{target} is ({' '.join(NORMALIZED[target])}) in the normalized layout, "
                              f"but {pattern.text()!r} produces ({' '.join(kept)})")
    if len(pattern.rhs.dims) != len(pattern.rhs.axes):
        add(path + ".pattern", f"the right side of {pattern.text()!r} must list plain axes, no groups")


def _check_unit_names(layout: dict, data: dict, add, path: str) -> None:
    """Units name the modules whose rank/alpha apply: projections in per-expert layouts, fused roles otherwise."""
    if any("{expert}" in t["key"] for t in layout["tensors"]):
        allowed, what = set(data.get("projections", {})), "projection"
    else:
        allowed, what = {p["role"] for p in data.get("fused", [])}, "fused role"
    for i, t in enumerate(layout["tensors"]):
        if t["unit"] not in allowed:
            add(f"{path}.tensors[{i}].unit", f"unit {t['unit']!r} is not a declared {what} "
                                              f"({', '.join(sorted(allowed)) or 'none'})")


def _build_layout(name: str, layout: dict, data: dict, c: _Collector) -> Layout | None:
    path = f"$.layouts.{name}"
    templates, axes = data.get("templates", {}), data.get("axes", {})
    if "tensors" not in layout:
        c.add(path, f"layout {name!r} has no tensors")
        return None
    parsed: list[Pattern | None] = []
    for i, t in enumerate(layout["tensors"]):
        try:
            parsed.append(parse(_substitute(t["pattern"], templates)))
        except RelayoutError as exc:
            c.add(f"{path}.tensors[{i}].pattern", str(exc))
            parsed.append(None)
    lhs_axes = {a for p in parsed if p is not None for a in p.lhs.axes}
    produced: dict[str, int] = {}
    tensors = []
    for i, (t, pattern) in enumerate(zip(layout["tensors"], parsed)):
        tpath = f"{path}.tensors[{i}]"
        _check_key(t["key"], data, c.add, tpath + ".key")
        if pattern is None:
            continue
        _check_tensor(t, pattern, axes, lhs_axes, c.add, tpath)
        targets = (t["to"],) if isinstance(t["to"], str) else tuple(t["to"])
        for target in targets:
            if target in produced:
                c.add(tpath + ".to", f"{target} is already produced by tensors[{produced[target]}]")
            produced.setdefault(target, i)
        tensors.append(TensorRule(t["unit"], t["key"], pattern, targets, t.get("split"),
                                  tuple(t["diagonal"]) if "diagonal" in t else None))
    units = {t["unit"] for t in layout["tensors"]}
    _check_unit_names(layout, data, c.add, path)
    for unit, product in layout.get("rank", {}).items():
        if unit not in units:
            c.add(f"{path}.rank.{unit}", f"unit {unit!r} has no tensors in layout {name!r}")
        unit_axes = {a for t, p in zip(layout["tensors"], parsed) if p is not None and t["unit"] == unit for a in p.lhs.axes}
        for axis in product.split():
            if axis not in unit_axes:
                c.add(f"{path}.rank.{unit}", f"rank axis {axis!r} does not appear in unit {unit!r}'s patterns")
    if layout.get("orientation") and not all("{nest}" in t["key"] for t in layout["tensors"]):
        c.add(f"{path}.orientation", "orientation applies to PEFT 3D layouts only (keys with {nest})")
    if len(tensors) != len(layout["tensors"]):
        return None
    experts = tuple(layout.get("experts", data.get("experts", ())))
    rank = tuple((u, tuple(p.split())) for u, p in layout.get("rank", {}).items())
    return Layout(name, layout.get("description", ""), experts, layout.get("orientation"), rank, tuple(tensors))


def _check_top(data: dict, c: _Collector) -> None:
    if data.get("abstract"):
        return
    for required in ("architectures", "experts", "projections", "layouts"):
        if not data.get(required):
            c.add("$", f"rule {data['name']!r} serves architectures but has no {required!r} (own or inherited)")
    roles = [p["role"] for p in data.get("fused", [])]
    for role in sorted({r for r in roles if roles.count(r) > 1}):
        c.add("$.fused", f"fused role {role!r} is declared twice")
    projections = data.get("projections", {})
    if data.get("gated", True) and "gate" not in projections:
        c.add("$.projections", "a gated MoE needs a gate projection")
    orientation = data.get("peft_orientation", [])
    for i, entry in enumerate(orientation[:-1]):
        if "until" not in entry:
            c.add(f"$.peft_orientation[{i}]", "only the last entry may omit 'until'")
    if orientation and "until" in orientation[-1]:
        c.add(f"$.peft_orientation[{len(orientation) - 1}]", "the last entry must omit 'until' (it covers later versions)")


def build_rule(res: "Resolved") -> tuple[Rule | None, list[Problem]]:
    """Check a resolved rule; return the Rule (None for abstract or broken rules) and every problem."""
    data, c = res.data, _Collector(res)
    _check_top(data, c)
    layouts = [_build_layout(name, layout, data, c) for name, layout in data.get("layouts", {}).items()]
    if c.problems or data.get("abstract"):
        return None, c.problems
    rule = Rule(
        name=data["name"], file=res.origin["name"].file,
        architectures=tuple(data["architectures"]), model_types=tuple(data.get("model_types", ())),
        gated=data.get("gated", True), experts=tuple(data["experts"]),
        projections=tuple(data["projections"].items()),
        fused=tuple(FusedParam(**p) for p in data.get("fused", ())),
        axes=tuple(data.get("axes", {}).items()),
        peft_orientation=tuple((e.get("until"), e["swap"]) for e in data.get("peft_orientation", ())),
        model_config=tuple((k, tuple(v)) for k, v in data.get("model_config", {}).items()),
        layouts=tuple(layouts),
    )
    return rule, c.problems
