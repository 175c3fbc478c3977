"""Every inconsistency between a rule and an adapter raises RelayoutError naming where and what.

Each message must name the rule file, the rule, the tensor key (with the block prefix), the axis,
the expected and the actual size where those apply. The checks use pytest.raises and pytest.fail
(no bare `assert` on the engine's behaviour), and the whole file runs again under `python -O`
(test_errors_still_raise_under_O), so no `assert` in relayout/ can have been guarding them.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from relayout.compiler import compile_inverse, compile_plan
from relayout.errors import RelayoutError
from relayout.execute import forward, inverse
from relayout.ruleset import load_rules

RULES = load_rules().rules
E, R, H, I = 3, 2, 5, 4
BLOCK = "base_model.model.model.layers.7.mlp.experts."
ROOT = Path(__file__).resolve().parent.parent


def expect(call, *words: str) -> str:
    """Run `call`; it must raise RelayoutError (a ValueError) whose message contains every word."""
    with pytest.raises(RelayoutError) as info:
        call()
    if not isinstance(info.value, ValueError):
        pytest.fail("RelayoutError must be a ValueError")
    message = str(info.value)
    missing = [w for w in words if w not in message]
    if missing:
        pytest.fail(f"message lacks {missing}:\n{message}")
    return message


def where(rule: str, layout: str) -> tuple[str, ...]:
    """The words every compile error starts with: rule file name, rule, layout."""
    return (f"{rule}.yaml", f"rule {rule}", f"layout {layout}")


def peft3d(**override) -> dict:
    shapes = {"base_layer.lora_A.weight": (E * R, H), "base_layer.lora_B.weight": (2 * I, R * E),
              "lora_A.weight": (E * R, I), "lora_B.weight": (H, R * E)}
    shapes.update(override)
    return {k: v for k, v in shapes.items() if v is not None}


def plan3d(shapes, ranks=None, known=None, rule="qwen3_moe", units=("gate_up", "down"), layout="peft-3d"):
    return lambda: compile_plan(RULES[rule], layout, units, shapes, ranks=ranks, known=known, block=BLOCK)


RANKS = {"gate_up": R, "down": R}


@pytest.mark.parametrize("rule, group", [("qwen3_moe", "(two i)"), ("gpt_oss", "(i two)")])
def test_odd_gate_up_dim(rule, group):
    expect(plan3d(peft3d(**{"base_layer.lora_B.weight": (2 * I + 1, R * E)}), RANKS, rule=rule),
           *where(rule, "peft-3d"), f"'{BLOCK}base_layer.lora_B.weight'", f"axis i of {group}",
           "expected a positive multiple of 2", "got 9")


def test_odd_gate_up_dim_swapped():
    # swapped: the 2I side is lora_A's columns
    expect(plan3d({"lora_A.weight": (E * R, 7), "lora_B.weight": (H, R * E)}, {"gate_up": R},
                  units=("gate_up",), layout="peft-3d-swapped"),
           *where("qwen3_moe", "peft-3d-swapped"), f"'{BLOCK}lora_A.weight' dim 1", "axis i", "multiple of 2", "got 7")


def test_er_not_divisible_by_rank():
    # adapter_config says r = 4; lora_A has E*r = 6 rows
    expect(plan3d(peft3d(), {"gate_up": 4, "down": R}), *where("qwen3_moe", "peft-3d"),
           f"'{BLOCK}base_layer.lora_A.weight' dim 0", "axis e", "expected a positive multiple of 4", "got 6")


def test_blockdiag_rank_must_be_even():
    # peft-3d-blockdiag: the configured rank is 2r; 3 cannot be split into gate and up halves
    expect(plan3d(peft3d(**{"base_layer.lora_A.weight": (E * 3, H), "base_layer.lora_B.weight": (2 * I, 3 * E)}),
                  {"gate_up": 3, "down": R}, layout="peft-3d-blockdiag"),
           *where("qwen3_moe", "peft-3d-blockdiag"), "rank", "r", "multiple of 2", "got 3")


@pytest.mark.parametrize("ranks, known", [(RANKS, None), ({"gate_up": R}, {"e": E}), (None, {"e": E})])
def test_rank_disagrees_between_a_and_b(ranks, known):
    # down lora_A says r = 2 (6 rows, 3 experts), lora_B has 9 = 3 * 3 columns
    expect(plan3d(peft3d(**{"lora_B.weight": (H, 3 * E)}), ranks, known), *where("qwen3_moe", "peft-3d"),
           f"'{BLOCK}lora_B.weight' dim 1", "axis (r e)", "expected 6 (r=2, e=3)", "got 9")


def test_expert_count_disagrees_with_model():
    expect(plan3d(peft3d(), RANKS, {"e": 2}), *where("qwen3_moe", "peft-3d"),
           f"'{BLOCK}base_layer.lora_A.weight' dim 0", "axis (e r)", "expected 4 (e=2, r=2)", "got 6")


def test_hidden_size_disagrees_between_units():
    # H is shared by every unit: gate_up lora_A says 5, down lora_B says 6
    expect(plan3d(peft3d(**{"lora_B.weight": (H + 1, R * E)}), RANKS), *where("qwen3_moe", "peft-3d"),
           f"'{BLOCK}lora_B.weight' dim 0", "axis (h)", "expected 5", "got 6")


def test_tensor_not_accounted_for():
    expect(plan3d(peft3d(**{"lora_embedding_A": (R, 3)}), RANKS), *where("qwen3_moe", "peft-3d"),
           "does not account for", f"'{BLOCK}lora_embedding_A'")


def test_unit_tensor_not_accounted_for():
    # only down requested, but gate_up's tensors (under base_layer.) are there too
    expect(plan3d(peft3d(), {"down": R}, units=("down",)), *where("qwen3_moe", "peft-3d"), "does not account for",
           f"'{BLOCK}base_layer.lora_A.weight', '{BLOCK}base_layer.lora_B.weight'")


@pytest.mark.parametrize("key, unit", [("lora_B.weight", "down"), ("base_layer.lora_A.weight", "gate_up")])
def test_missing_tensor(key, unit):
    expect(plan3d(peft3d(**{key: None}), RANKS), *where("qwen3_moe", "peft-3d"),
           f"tensor '{BLOCK}{key}' is missing", f"unit {unit} needs it")


def test_missing_expert_in_2d():
    shapes = {f"{e}.{p}.lora_{x}.weight": ((R, H) if x == "A" else (I, R)) for e in range(E)
              for p in ("gate_proj", "up_proj") for x in "AB"}
    del shapes["1.up_proj.lora_B.weight"]
    expect(lambda: compile_plan(RULES["mixtral"], "peft-2d", ("gate", "up"), {k.replace("gate_proj", "w1").replace("up_proj", "w3"): v for k, v in shapes.items()}, block=BLOCK),
           *where("mixtral", "peft-2d"), f"tensor '{BLOCK}1.w3.lora_B.weight' is missing", "unit up")


def test_2d_expert_count_disagrees_with_model():
    shapes = {f"{e}.down_proj.lora_{x}.weight": ((R, I) if x == "A" else (H, R)) for e in range(4) for x in "AB"}
    expect(lambda: compile_plan(RULES["qwen3_moe"], "peft-2d", ("down",), shapes, known={"e": E}, block=BLOCK),
           *where("qwen3_moe", "peft-2d"), "4 experts", f"'{BLOCK}'", "has 3")


@pytest.mark.parametrize("shape, got", [((H, R * E, 1), "[5, 6, 1]"), ((H * R * E,), "[30]")])
def test_wrong_number_of_dims(shape, got):
    expect(plan3d(peft3d(**{"lora_B.weight": shape}), RANKS), *where("qwen3_moe", "peft-3d"),
           f"'{BLOCK}lora_B.weight'", "expected 2 dimensions (h (r e))", f"got shape {got}")


def test_per_expert_shapes_differ():
    shapes = {f"{e}.{p}.lora_{x}.weight": ((R, H) if x == "A" else (I, R)) for e in range(E)
              for p in ("gate_proj", "up_proj") for x in "AB"}
    shapes["2.up_proj.lora_A.weight"] = (R, H + 2)
    expect(lambda: compile_plan(RULES["qwen3_moe"], "peft-2d", ("gate", "up"), shapes, block=BLOCK),
           *where("qwen3_moe", "peft-2d"), f"'{BLOCK}2.up_proj.lora_A.weight'", "shape [2, 7]",
           f"differs from '{BLOCK}0.up_proj.lora_A.weight' [2, 5]")


def test_unbindable_axes_without_rank():
    # neither the config rank nor the number of experts: (e r) = 6 cannot be factored
    expect(plan3d(peft3d()), *where("qwen3_moe", "peft-3d"), f"'{BLOCK}base_layer.lora_A.weight' dim 0",
           "cannot bind axes e, r of (e r) = 6", "adapter_config.json r")


def test_units_not_in_layout():
    expect(plan3d(peft3d(), RANKS, units=("gate", "up")), *where("qwen3_moe", "peft-3d"),
           "units ['gate', 'up']", "['gate_up', 'down']")
    expect(plan3d(peft3d(), RANKS, units=()), *where("qwen3_moe", "peft-3d"), "non-empty")


def test_unknown_layout():
    expect(plan3d(peft3d(), RANKS, layout="peft-4d"), "qwen3_moe.yaml", "rule qwen3_moe", "no layout 'peft-4d'", "peft-3d")


# ----------------------------------------------------------------------------------------------
# Inverse: what a layout cannot hold.

def normalized(units=("gate_up", "down"), seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    shapes = {"w1.lora_a": (E, R, H), "w1.lora_b": (E, I, R), "w3.lora_a": (E, R, H), "w3.lora_b": (E, I, R),
              "w2.lora_a": (E, R, I), "w2.lora_b": (E, H, R)}
    wanted = {"gate_up": ("w1", "w3"), "down": ("w2",)}
    return {k: torch.randn(*s, generator=g) for k, s in shapes.items() if k[:2] in sum((wanted[u] for u in units), ())}


@pytest.mark.parametrize("layout, key", [("peft-3d", "base_layer.lora_A.weight"),
                                         ("peft-3d-swapped", "base_layer.lora_B.weight"),
                                         ("named-3d", "gate_up_proj.lora_A.weight")])
def test_inverse_shared_a_that_differs(layout, key):
    x = normalized()  # w1.lora_a != w3.lora_a
    plan = compile_inverse(RULES["qwen3_moe"], layout, {k: v.shape for k, v in x.items()}, block=BLOCK)
    expect(lambda: inverse(plan, x, block=BLOCK), *where("qwen3_moe", layout), f"'{BLOCK}{key}'",
           "w1.lora_a and w3.lora_a differ")


def test_inverse_shared_a_that_agrees_is_fine_and_blockdiag_keeps_them_apart():
    x = normalized()
    x["w3.lora_a"] = x["w1.lora_a"].clone()
    plan = compile_inverse(RULES["qwen3_moe"], "peft-3d", {k: v.shape for k, v in x.items()})
    inverse(plan, x)
    y = normalized()
    inverse(compile_inverse(RULES["qwen3_moe"], "peft-3d-blockdiag", {k: v.shape for k, v in y.items()}), y)


@pytest.mark.parametrize("target, key", [("w1.lora_a", "gate_up_proj.lora_A.weight"), ("w2.lora_b", "down_proj.lora_B.weight")])
def test_inverse_shared_outer_that_differs_over_experts(target, key):
    x = normalized()
    x["w3.lora_a"] = x["w1.lora_a"] = x["w1.lora_a"][:1].expand(E, R, H).clone()
    x["w2.lora_b"] = x["w2.lora_b"][:1].expand(E, H, R).clone()
    x[target] = x[target].clone()
    x[target][E - 1] += 1
    if target == "w1.lora_a":
        x["w3.lora_a"] = x["w1.lora_a"]
    plan = compile_inverse(RULES["qwen3_moe"], "shared-outer", {k: v.shape for k, v in x.items()}, block=BLOCK)
    expect(lambda: inverse(plan, x, block=BLOCK), *where("qwen3_moe", "shared-outer"), f"'{BLOCK}{key}'",
           "shared by all values of axis e")


def test_inverse_partial_unit():
    x = normalized()
    del x["w3.lora_b"]
    expect(lambda: compile_inverse(RULES["qwen3_moe"], "peft-3d", {k: v.shape for k, v in x.items()}),
           *where("qwen3_moe", "peft-3d"), "unit gate_up needs", "w3.lora_b", "has only")


def test_inverse_normalized_sizes_disagree():
    x = {k: v.shape for k, v in normalized().items()}
    x["w3.lora_b"] = (E, I + 1, R)
    expect(lambda: compile_inverse(RULES["qwen3_moe"], "peft-3d", x), *where("qwen3_moe", "peft-3d"),
           "normalized w3.lora_b", "axis i", "expected 4", "got 5")


def test_inverse_layout_cannot_hold_targets():
    x = {k: v.shape for k, v in normalized().items()}
    x["w9.lora_a"] = (E, R, H)
    expect(lambda: compile_inverse(RULES["qwen3_moe"], "peft-3d", x), *where("qwen3_moe", "peft-3d"),
           "cannot hold normalized tensor(s) w9.lora_a")


@pytest.mark.parametrize("layout, key", [("peft-3d-blockdiag", "lora_B.weight"), ("peft-3d-blockdiag-swapped", "lora_A.weight")])
def test_non_block_diagonal_read_as_blockdiag(layout, key):
    two_r = 2 * R
    shapes = ({"lora_A.weight": (E * two_r, H), "lora_B.weight": (2 * I, two_r * E)} if layout == "peft-3d-blockdiag"
              else {"lora_A.weight": (E * two_r, 2 * I), "lora_B.weight": (H, two_r * E)})
    plan = compile_plan(RULES["qwen3_moe"], layout, ("gate_up",), shapes, ranks={"gate_up": two_r}, block=BLOCK)
    g = torch.Generator().manual_seed(1)
    src = {k: torch.randn(*s, generator=g) for k, s in shapes.items()}
    expect(lambda: forward(plan, src, block=BLOCK), *where("qwen3_moe", layout), f"'{BLOCK}{key}'",
           "not block-diagonal over (two, twob)")
    # one stray value off the blocks is enough
    x = normalized(("gate_up",))
    clean = inverse(compile_inverse(RULES["qwen3_moe"], layout, {k: v.shape for k, v in x.items()}), x)
    forward(plan, clean)
    clean[key][tuple((clean[key] == 0).nonzero()[0].tolist())] = 0.5
    expect(lambda: forward(plan, clean, block=BLOCK), "1 non-zero values off the diagonal blocks")


# ----------------------------------------------------------------------------------------------
# No assert guards user data: the source has none, and the errors above raise under python -O.

def test_no_assert_statements_in_engine():
    for folder in ("relayout", "runtime"):
        for path in sorted((ROOT / folder).glob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            asserts = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Assert)]
            if asserts:
                pytest.fail(f"{path.name}: assert at line(s) {asserts}; raise RelayoutError instead")


def test_errors_still_raise_under_O():
    if not __debug__:
        pytest.skip("already running under -O")
    proc = subprocess.run([sys.executable, "-O", "-m", "pytest", __file__, "-o", "addopts=", "-q", "-p", "no:cacheprovider",
                           "-k", "not under_O", "-W", "ignore::DeprecationWarning", "-W", "ignore::pytest.PytestConfigWarning"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"under python -O:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}")
    if " passed" not in proc.stdout:
        pytest.fail(f"nothing ran under -O:\n{proc.stdout[-2000:]}")

