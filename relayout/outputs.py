"""Normalized blocks -> output specs: per target format, the keys, shapes and PEFT config of the written adapter."""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

import torch

from relayout.adapter import PEFT_PREFIX, Adapter
from relayout.compiler import Plan, compile_inverse
from relayout.detect import Block, Detected, expected_orientation, module_name
from relayout.errors import RelayoutError
from relayout.rule import NORMALIZED, Rule

FORMATS = ("peft-2d", "peft-3d", "normalized")
PROJECTIONS = ("w1", "w3", "w2")
LATEST_PEFT = "0.21.2"


def normalized_shapes(plan: Plan) -> dict[str, tuple[int, ...]]:
    """Target -> shape of a plan's normalized output, from its bound sizes (no data needed)."""
    sizes = dict(plan.sizes)
    out = {}
    for op in plan.ops:
        for target in op.targets:
            out[target] = tuple(sizes[a] if a in sizes else sizes[f"r@{op.unit}"] for a in NORMALIZED[target])
    return out


def projection_scaling(block: Block) -> dict[str, float]:
    """Normalized projection (w1, w3, w2) -> PEFT scale of the source unit that feeds it."""
    return {t.split(".")[0]: block.scaling[op.unit] for op in block.plan.ops for t in op.targets}


def shares_gate_up_a(plan: Plan) -> bool:
    """Whether the source stores one A for gate and up (so w1.lora_a == w3.lora_a by construction)."""
    return any({"w1.lora_a", "w3.lora_a"} <= set(op.targets) and not op.split for op in plan.ops)


@dataclass
class TargetBlock:
    """One block of the output: the inverse plan (None for 'normalized') and the output keys' prefix."""

    block: Block
    plan: Plan | None
    prefix: str
    ranks: dict[str, tuple[int, float]]  # output module -> (rank, scale)


def _same_wrapper(source: str, candidates: tuple[str, ...], layer: int) -> str:
    """The target experts path that keeps the source's wrapper prefix (e.g. model.language_model)."""
    head = source.split(f"layers.{layer}.")[0]
    for template in candidates:
        if template.split("layers.{layer}")[0] == head:
            return template.replace("{layer}", str(layer))
    return candidates[0].replace("{layer}", str(layer))


def _target_layout(rule: Rule, fmt: str, shared: bool, peft_version: str) -> str:
    if fmt == "peft-2d":
        return "peft-2d"
    orientation = expected_orientation(rule, "gate_up", peft_version) or "input"
    return ("peft-3d" if shared else "peft-3d-blockdiag") + ("-swapped" if orientation == "output" else "")


def plan_target(det: Detected, block: Block, fmt: str, shared: bool, peft_version: str) -> TargetBlock:
    """How one source block is written in `fmt`."""
    rule = det.rule
    if fmt == "normalized":
        return TargetBlock(block, None, f"layers.{block.layer}.", {})
    layout = rule.layout(_target_layout(rule, fmt, shared, peft_version))
    path = _same_wrapper(block.experts, layout.experts or rule.experts, block.layer)
    shapes = normalized_shapes(block.plan)
    if fmt == "peft-3d" and any(t.startswith(("w1", "w3")) for t in shapes) and not {"w1.lora_a", "w3.lora_a"} <= set(shapes):
        raise RelayoutError(f"{block.experts}: a fused gate_up LoRA needs both gate and up; the adapter has only "
                            f"{sorted(shapes)}: write peft-2d instead")
    plan = compile_inverse(rule, layout.name, shapes, PEFT_PREFIX + path + ".")
    scales = projection_scaling(block)
    ranks = {}
    for unit in plan.units:
        proj = next(t.split(".")[0] for op in plan.ops if op.unit == unit for t in op.targets)
        for e in range(plan.size("e") if layout.per_expert else 1):
            ranks[module_name(path, rule, layout, unit, e)] = (plan.config_rank(unit), scales[proj])
    return TargetBlock(block, plan, PEFT_PREFIX + path + ".", ranks)


def output_specs(target: TargetBlock, dtype: torch.dtype) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Full output key -> (dtype, shape) for one block, in write order."""
    if target.plan is None:
        shapes = normalized_shapes(target.block.plan)
        return {f"{target.prefix}{t}": (dtype, shapes[t]) for t in sorted(shapes, key=_norm_order)}
    return {f"{target.prefix}{k}": (dtype, s) for op in target.plan.ops for k, s in _op_shapes(op)}


def _op_shapes(op):
    shape = op.source_shape
    return [(k, shape[1:] if op.stacked else shape) for k in op.keys]


def _norm_order(target: str) -> tuple[int, str]:
    return PROJECTIONS.index(target.split(".")[0]), target


def _alpha(rank: int, scale: float, rslora: bool) -> float:
    alpha = scale * (math.sqrt(rank) if rslora else rank)
    return int(round(alpha)) if abs(alpha - round(alpha)) < 1e-9 else alpha


def _compress(values: dict[str, float | int], default: float | int) -> dict[str, float | int]:
    """Module -> value as few PEFT patterns as possible: one per layer-independent name when layers agree.

    Grouping sees every module, also those at the default (which get no pattern), so a name-wide pattern is
    only written when no layer of that name needs the default.
    """
    groups: dict[str, set] = {}
    for module, value in values.items():
        groups.setdefault(re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(module)), set()).add(value)
    out = {}
    for module, value in values.items():
        if value == default:
            continue
        general = re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(module))
        if len(groups[general]) == 1:
            out[general] = value
        else:
            out[re.escape(module)] = value
    return out


def peft_config(adapter: Adapter, det: Detected, targets: list[TargetBlock], fmt: str, peft_version: str) -> dict:
    """adapter_config.json for the output: target_modules/parameters, and r/alpha patterns that keep every scale."""
    rslora = bool(adapter.config.get("use_rslora"))
    modules: dict[str, tuple[int, float]] = {}
    for target in targets:
        modules.update(target.ranks)
    for key in det.passthrough:
        if key.endswith(".lora_A.weight"):
            name = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
            rank = adapter.rank(name)
            modules[name] = (rank, adapter.scaling(name, rank))
    ranks = {m: r for m, (r, _) in modules.items()}
    alphas = {m: _alpha(r, s, rslora) for m, (r, s) in modules.items()}
    r, alpha = Counter(ranks.values()).most_common(1)[0][0], Counter(alphas.values()).most_common(1)[0][0]
    config = dict(adapter.config)
    # init_lora_weights=True: a module PEFT wraps but the file does not hold (an expert projection of a layer
    # this adapter never adapted) starts with B = 0 and changes nothing, instead of random values.
    config.update(r=r, lora_alpha=alpha, peft_version=peft_version, init_lora_weights=True,
                  rank_pattern=_compress(ranks, r), alpha_pattern=_compress(alphas, alpha))
    rule = det.rule
    expert_names = set(dict(rule.projections).values())
    passthrough_names = {k.removeprefix(PEFT_PREFIX).split(".lora_")[0].rsplit(".", 1)[-1]
                         for k in det.passthrough if ".lora_" in k}
    old = config.get("target_modules") or []
    old = [old] if isinstance(old, str) else list(old)
    keep = sorted({m for m in old if m not in expert_names or m in passthrough_names} | passthrough_names)
    if fmt == "peft-2d":
        config["target_modules"] = sorted(set(keep) | expert_names)
        config.pop("target_parameters", None)
    else:
        config["target_modules"] = keep or None
        config["target_parameters"] = _target_parameters(rule, targets)
    return config


def _target_parameters(rule: Rule, targets: list[TargetBlock]) -> list[str]:
    """PEFT target_parameters: 'mlp.experts.gate_up_proj' when every block has the unit, else one entry per block.

    A name-wide entry makes PEFT wrap that parameter in every layer, so a unit only some blocks adapt (gate_up
    in layer 0, down everywhere) is listed by full path, and PEFT creates no LoRA the file does not hold.
    """
    paths: dict[str, list[str]] = {}   # suffix (under layers.{l}.) -> full block paths
    have: dict[tuple[str, str], list[str]] = {}
    for t in targets:
        path = t.prefix.removeprefix(PEFT_PREFIX).rstrip(".")
        suffix = path.split(f"layers.{t.block.layer}.")[-1]
        paths.setdefault(suffix, []).append(path)
        for unit in t.plan.units:
            have.setdefault((suffix, rule.fused_param(unit).name), []).append(path)
    out = set()
    for (suffix, name), where in have.items():
        out.update([f"{suffix}.{name}"] if len(where) == len(paths[suffix]) else [f"{p}.{name}" for p in where])
    return sorted(out)
