"""Adapter + rules -> which rule, which expert blocks, which layout each block is in (no user flag needed)."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from relayout.adapter import PEFT_PREFIX, Adapter
from relayout.compiler import Plan, compile_plan, count_experts, layout_keys
from relayout.errors import RelayoutError
from relayout.rule import Layout, Rule
from relayout.ruleset import RuleSet


@dataclass
class Block:
    """One adapted expert block: where it is and the compiled plan that normalizes it."""

    layer: int
    experts: str                 # model-relative experts path of this layer
    keys: dict[str, str]         # relative key -> full adapter key
    plan: Plan
    scaling: dict[str, float]    # unit -> PEFT scale of the source module


@dataclass
class Detected:
    """Everything relayout decided about an adapter."""

    rule: Rule
    how: str                                     # how the architecture was found
    model_config: dict | None
    blocks: list[Block]
    passthrough: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    architecture: str = ""                       # the name that selected the rule (the rule's first for keys)


def _version(text: str | None) -> tuple[int, ...] | None:
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    return tuple(int(x or 0) for x in match.groups()) if match else None


def expected_orientation(rule: Rule, role: str, peft_version: str | None) -> str | None:
    """'input' or 'output': which side PEFT's lora_A acts on for this fused parameter, by PEFT version.

    None when unknown: no parsable version, not a fused role, or a rule without a peft_orientation table.
    """
    version = _version(peft_version)
    if version is None or role not in {p.role for p in rule.fused}:
        return None
    param = rule.fused_param(role)
    swap = next((s for until, s in rule.peft_orientation if until is None or version <= _version(until)), None)
    if swap is None:
        return None
    swapped = {"never": False, "always": True, "if_marked_transposed": param.marked_transposed,
               "if_not_marked_transposed": not param.marked_transposed}[swap]
    d1_is_input = param.storage == "e i o"
    return "input" if d1_is_input != swapped else "output"


def _read_model_config(path: Path) -> dict:
    path = path / "config.json" if path.is_dir() else path
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RelayoutError(f"{path}: cannot read model config: {exc}") from None
    if not isinstance(config, dict):
        raise RelayoutError(f"{path}: a model config is a JSON object, got {type(config).__name__}")
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise RelayoutError(f"{path}: architectures must be a list of strings, got {architectures!r}")
    if not isinstance(config.get("model_type") or "", str):
        raise RelayoutError(f"{path}: model_type must be a string, got {config['model_type']!r}")
    return config


def model_sizes(rule: Rule, config: dict | None) -> dict[str, int]:
    """e, h, i from a model config.json, by the rule's model_config keys."""
    if not config:
        return {}
    spec = dict(rule.model_config)
    scopes = [config] + [config[s] for s in spec.get("sections", ()) if isinstance(config.get(s), dict)]
    sizes = {}
    for axis in ("e", "h", "i"):
        for scope in scopes:
            value = next((scope[k] for k in spec.get(axis, ()) if isinstance(scope.get(k), int)), None)
            if value is not None:
                sizes[axis] = value
                break
    return sizes


def _arch_of(config: dict) -> list[str]:
    return list(config.get("architectures") or []) + [config.get("model_type", "")]


def _rule_from_config(ruleset: RuleSet, config: dict, source: str) -> Rule:
    for name in _arch_of(config):
        try:
            return ruleset.find(name)
        except RelayoutError:
            continue
    raise RelayoutError(f"{source}: no rule serves architectures {_arch_of(config)}; "
                        f"add a rule file with --rules DIR")


def resolve_rule(ruleset: RuleSet, adapter: Adapter, arch: str | None = None,
                 model_config: str | Path | None = None) -> tuple[Rule, str, dict | None]:
    """The rule for an adapter: --arch, then --model-config, then base_model_name_or_path, then the keys."""
    config = _read_model_config(Path(model_config)) if model_config else None
    if arch:
        return ruleset.find(arch), f"--arch {arch}", config
    if config is not None:
        return _rule_from_config(ruleset, config, str(model_config)), f"--model-config {model_config}", config
    base = adapter.config.get("base_model_name_or_path")
    if base and (Path(base) / "config.json").is_file():
        config = _read_model_config(Path(base))
        return _rule_from_config(ruleset, config, base), f"base_model_name_or_path {base}", config
    return _rule_from_keys(ruleset, adapter), "adapter keys", None


def _rule_from_keys(ruleset: RuleSet, adapter: Adapter) -> Rule:
    fits = []
    for rule in ruleset.rules.values():
        blocks = find_blocks(rule, adapter)
        if blocks and any(_key_candidates(rule, b[2]) for b in blocks):
            fits.append(rule)
    if len(fits) == 1:
        return fits[0]
    if not fits:
        raise RelayoutError(f"{adapter.path}: no rule recognises the adapter's expert keys; pass --arch NAME or "
                            f"--model-config PATH/config.json, or add a rule file with --rules DIR")
    names = ", ".join(f"{r.name} ({r.architectures[0]})" for r in fits)
    raise RelayoutError(f"{adapter.path}: the keys fit several architectures: {names}. They may differ in gate/up "
                        f"order or orientation: settle it with --arch NAME or --model-config PATH/config.json")


def _experts_templates(rule: Rule) -> list[str]:
    templates = list(rule.experts) + [t for lay in rule.layouts for t in lay.experts]
    return list(dict.fromkeys(templates))


def find_blocks(rule: Rule, adapter: Adapter) -> list[tuple[int, str, dict[str, str]]]:
    """(layer, experts path, relative key -> full key) for each expert block the rule's paths find."""
    found: dict[tuple[int, str], dict[str, str]] = {}
    regexes = [(t, re.compile("^" + re.escape(t).replace(r"\{layer\}", r"(\d+)") + r"\.(.+)$"))
               for t in _experts_templates(rule)]
    for key in adapter.tensors:
        rel = key.removeprefix(PEFT_PREFIX)
        for template, regex in regexes:
            m = regex.match(rel)
            if m:
                layer = _layer_number(adapter, key, m.group(1))
                found.setdefault((layer, template.replace("{layer}", str(layer))), {})[m.group(2)] = key
                break
    return [(layer, path, keys) for (layer, path), keys in sorted(found.items())]


def _layer_number(adapter: Adapter, key: str, digits: str) -> int:
    """A key's layer index as PEFT writes module names (str of an int): 'layers.01.' or a non-ASCII digit is an error."""
    if not digits.isascii() or str(int(digits)) != digits:
        raise RelayoutError(f"{adapter.path}: tensor '{key}': layer number {digits!r} is not how a model names its "
                            f"layers (no leading zeros, ASCII digits): rename the key (e.g. 'layers.{int(digits)}.')")
    return int(digits)


def _unit_subsets(units: tuple[str, ...]) -> list[tuple[str, ...]]:
    return [tuple(u for i, u in enumerate(units) if mask >> i & 1) for mask in range(1, 1 << len(units))]


def _key_candidates(rule: Rule, keys) -> list[tuple[Layout, tuple[str, ...]]]:
    """(layout, units) whose rendered keys are exactly the block's keys."""
    out = []
    for layout in rule.layouts:
        for units in _unit_subsets(layout.units):
            if layout_keys(rule, layout, units, keys) == set(keys):
                out.append((layout, units))
    return out


def module_name(block_path: str, rule: Rule, layout: Layout, unit: str, expert: int = 0) -> str:
    """The PEFT module (or parameter) name a unit's rank/alpha patterns are matched against."""
    if layout.per_expert:
        return f"{block_path}.{expert}.{dict(rule.projections)[unit]}"
    return f"{block_path}.{rule.fused_param(unit).name}"


def _unit_config(adapter: Adapter, rule: Rule, layout: Layout, units, block_path: str, experts: int | None):
    ranks, scales = {}, {}
    for unit in units:
        names = [module_name(block_path, rule, layout, unit, e) for e in range(experts or 1)]
        values = {(adapter.rank(n), adapter.scaling(n, adapter.rank(n))) for n in names}
        if len(values) > 1:
            raise RelayoutError(f"{adapter.path}: experts of '{names[0]}' have different rank/alpha in "
                                f"rank_pattern/alpha_pattern ({sorted(values)}); relayout needs one per projection")
        (ranks[unit], scales[unit]), = values
    return ranks, scales


def _targeted_here(targets, block_path: str) -> set[str]:
    """Parameter names target_parameters reaches in this block, by PEFT's match (equal, or suffix after a dot).

    A list such as ["model.layers.0.mlp.experts.gate_up_proj", "mlp.experts.down_proj"] adapts gate_up in
    layer 0 only; if no entry matches the block's path, every listed name counts (as before).
    """
    names = [str(t).rsplit(".", 1)[-1] for t in targets]
    here = {n for t, n in zip(map(str, targets), names) if f"{block_path}.{n}" == t
            or f"{block_path}.{n}".endswith(f".{t}")}
    return here or set(names)


def _layout_filter(rule: Rule, adapter: Adapter, layout: Layout, units, block_path: str, template: str,
                   forced: str | None) -> str | None:
    """Why a (layout, units) candidate is ruled out by the config, or None if it stays."""
    if forced and layout.name != forced:
        return f"--layout {forced}"
    if template not in (layout.experts or rule.experts):
        return "experts path"
    targets = adapter.config.get("target_parameters")
    nested = any("{nest}" in t.key for t in layout.tensors)
    if nested and targets:
        names = _targeted_here(targets, block_path)
        if names != {rule.fused_param(u).name for u in units}:
            return "target_parameters"
    return None


def _version_fits(rule: Rule, adapter: Adapter, block: Block) -> bool:
    """Whether a candidate's orientation is the one its peft_version writes (True when unknown or not PEFT 3D)."""
    version, orientation = adapter.config.get("peft_version"), rule.layout(block.plan.layout).orientation
    return not orientation or all(expected_orientation(rule, u, version) in (None, orientation) for u in block.plan.units)


def _is_block_diagonal(adapter: Adapter, block_keys: dict[str, str], plan: Plan) -> bool:
    """Whether the block's data fit the plan's diagonal op (reads only that op's tensors)."""
    from relayout.execute import forward_op  # local: detection reads data for this one check only

    op = next(op for op in plan.ops if op.diagonal)
    tensors = {k: adapter.read(block_keys[k]) for k in op.keys}
    try:
        forward_op(op, tensors, fresh=False)
    except RelayoutError:
        return False
    return True


def detect_block(rule: Rule, adapter: Adapter, layer: int, block_path: str, keys: dict[str, str],
                 known: dict[str, int], forced: str | None = None) -> Block:
    """Choose the one layout that explains a block's keys, shapes and config; raise listing candidates otherwise."""
    template = next(t for t in _experts_templates(rule) if t.replace("{layer}", str(layer)) == block_path)
    prefix = PEFT_PREFIX + block_path + "."
    shapes = {rel: adapter.tensors[full].shape for rel, full in keys.items()}
    candidates, errors = [], []
    for layout, units in _key_candidates(rule, keys):
        reason = _layout_filter(rule, adapter, layout, units, block_path, template, forced)
        if reason:
            errors.append(f"{layout.name} {list(units)}: ruled out by {reason}")
            continue
        try:
            experts = count_experts(rule, layout, units, keys)
            ranks, scales = _unit_config(adapter, rule, layout, units, block_path, experts)
            plan = compile_plan(rule, layout.name, units, shapes, ranks, known, prefix)
        except RelayoutError as exc:
            errors.append(str(exc))
            continue
        candidates.append(Block(layer, block_path, keys, plan, scales))
    if not candidates:
        raise RelayoutError(_no_fit(rule, adapter, keys, shapes, known, prefix, errors, forced))
    return _pick(rule, adapter, candidates, prefix)


def _pick(rule: Rule, adapter: Adapter, candidates: list[Block], prefix: str) -> Block:
    def block_diagonal(b: Block) -> bool:  # the layout has a diagonal op (in the units this block has or not)
        return any(t.diagonal for t in rule.layout(b.plan.layout).tensors)

    if len(candidates) > 1:  # a blockdiag layout without gate_up (down only) is its plain twin: keep the plain name
        candidates = [b for b in candidates if not block_diagonal(b) or any(op.diagonal for op in b.plan.ops)]
    if len(candidates) > 1:
        diag = [b for b in candidates if block_diagonal(b)]
        if diag and _is_block_diagonal(adapter, candidates[0].keys, diag[0].plan):
            candidates = diag
        else:
            candidates = [b for b in candidates if b not in diag]
    if len(candidates) > 1:  # shapes could not decide: peft_version breaks the tie (it can be stale, so not before)
        candidates = [b for b in candidates if _version_fits(rule, adapter, b)] or candidates
    if len(candidates) == 1:
        return candidates[0]
    listed = "; ".join(f"{b.plan.layout} {list(b.plan.units)}" for b in candidates)
    raise RelayoutError(f"{adapter.path}: block '{prefix[:-1]}' fits several layouts: {listed}. Settle it with "
                        f"--model-config PATH/config.json (sizes), a peft_version in adapter_config.json, or --layout NAME")


def _no_fit(rule, adapter, keys, shapes, known, prefix, errors, forced) -> str:
    if errors:
        return f"{adapter.path}: block '{prefix[:-1]}' fits no layout of rule {rule.name}:\n  " + "\n  ".join(errors)
    best, overlap = None, -1
    for layout in rule.layouts:  # no key set matched: compile the closest one to name missing/extra tensors
        if forced and layout.name != forced:
            continue
        for units in _unit_subsets(layout.units):
            wanted = layout_keys(rule, layout, units, keys)
            score = len(wanted & set(keys)) - len(wanted - set(keys)) * 1e-3
            if score > overlap:
                best, overlap = (layout, units), score
    try:
        compile_plan(rule, best[0].name, best[1], shapes, {}, known, prefix)
    except RelayoutError as exc:
        return str(exc)
    return f"{adapter.path}: block '{prefix[:-1]}': keys {sorted(keys)} match no layout of rule {rule.name}"


def detect(ruleset: RuleSet, adapter: Adapter, arch: str | None = None, model_config: str | Path | None = None,
           layout: str | None = None) -> Detected:
    """Rule, blocks and layouts of an adapter; every expert tensor is accounted for or this raises."""
    rule, how, config = resolve_rule(ruleset, adapter, arch, model_config)
    if layout is not None:
        rule.layout(layout)
    known = model_sizes(rule, config)
    blocks = [detect_block(rule, adapter, layer, path, keys, known, layout)
              for layer, path, keys in find_blocks(rule, adapter)]
    if not blocks:
        raise RelayoutError(f"{adapter.path}: no expert LoRA tensors found for rule {rule.name} (experts at "
                            f"{', '.join(_experts_templates(rule))}); there is nothing to relayout")
    consumed = {full for b in blocks for full in b.keys.values()}
    passthrough = [k for k in adapter.tensors if k not in consumed]
    served = rule.architectures + rule.model_types
    name = arch or next((n for n in _arch_of(config or {}) if n in served), rule.architectures[0])
    return Detected(rule, how, config, blocks, passthrough, _notes(rule, adapter, blocks, known), name)


def _notes(rule: Rule, adapter: Adapter, blocks: list[Block], known: dict[str, int]) -> list[str]:
    """Things the user should know: facts relayout could only derive, and config fields the shapes overruled."""
    notes = []
    if "e" not in known and any(not rule.layout(b.plan.layout).per_expert for b in blocks):
        notes.append(f"num_experts {blocks[0].plan.size('e')} was derived from the adapter's rank (r); pass "
                     f"--model-config PATH/config.json to check it against the model")
    stale = sorted({b.plan.layout for b in blocks if not _version_fits(rule, adapter, b)})
    if stale:
        notes.append(f"peft_version {adapter.config.get('peft_version')} implies the other orientation, but the "
                     f"shapes fit only {', '.join(stale)}: the shapes were trusted")
    return notes
