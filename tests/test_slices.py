"""Exact slices on torch.arange inputs for the layouts that are easy to get wrong.

Every source element is distinct, so a wrong permutation shows which element moved.
Sizes: E=3, r=2, H=5, I=4 (2I != H, I != H, all different) unless a case says otherwise.
"""
from __future__ import annotations

import pytest
import torch

from relayout.compiler import compile_inverse, compile_plan
from relayout.errors import RelayoutError
from relayout.execute import forward, inverse
from relayout.ruleset import load_rules

RULES = load_rules().rules
E, R, H, I = 3, 2, 5, 4


def arange(*shape: int, start: int = 0) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    return torch.arange(start, start + n, dtype=torch.float32).reshape(shape)


def run(rule: str, layout: str, units: tuple[str, ...], src: dict, ranks: dict) -> dict:
    plan = compile_plan(RULES[rule], layout, units, {k: v.shape for k, v in src.items()}, ranks=ranks)
    out = forward(plan, src)
    back = inverse(compile_inverse(RULES[rule], layout, {k: v.shape for k, v in out.items()}), out)
    assert set(back) == set(src) and all(torch.equal(back[k], src[k]) for k in src), "inverse did not restore the source"
    return out


def test_rank_major_b_expert_major_a():
    # down: A [E*r, I] row e*r + k; B [H, r*E] column k*E + e (rank-major, expert fastest)
    A, B = arange(E * R, I), arange(H, R * E, start=1000)
    out = run("qwen3_moe", "peft-3d", ("down",), {"lora_A.weight": A, "lora_B.weight": B}, {"down": R})
    for e in range(E):
        for k in range(R):
            assert torch.equal(out["w2.lora_a"][e, k], A[e * R + k])
            assert torch.equal(out["w2.lora_b"][e, :, k], B[:, k * E + e])
    # spelled out for E=3, r=2: expert 1 takes B columns 1 and 4, not 2 and 3 (expert-major misreading)
    assert out["w2.lora_b"][1].tolist() == B[:, [1, 4]].tolist()
    assert out["w2.lora_b"][1, 0, 1].item() == 1004.0


def test_concatenated_gate_up():
    # Qwen3-MoE: gate rows [0, I), up rows [I, 2I) of B [2I, r*E]; one A for both
    A, B = arange(E * R, H), arange(2 * I, R * E, start=1000)
    out = run("qwen3_moe", "peft-3d", ("gate_up",), {"lora_A.weight": A, "lora_B.weight": B}, {"gate_up": R})
    for e in range(E):
        for k in range(R):
            assert torch.equal(out["w1.lora_b"][e, :, k], B[:I, k * E + e])
            assert torch.equal(out["w3.lora_b"][e, :, k], B[I:, k * E + e])
            assert torch.equal(out["w1.lora_a"][e, k], A[e * R + k])
    assert torch.equal(out["w1.lora_a"], out["w3.lora_a"])


def test_interleaved_gate_up_gpt_oss():
    # GPT-OSS: gate at even rows, up at odd rows of B [2I, r*E]
    A, B = arange(E * R, H), arange(2 * I, R * E, start=1000)
    out = run("gpt_oss", "peft-3d", ("gate_up",), {"lora_A.weight": A, "lora_B.weight": B}, {"gate_up": R})
    for e in range(E):
        for k in range(R):
            assert torch.equal(out["w1.lora_b"][e, :, k], B[0::2, k * E + e])
            assert torch.equal(out["w3.lora_b"][e, :, k], B[1::2, k * E + e])
    assert out["w1.lora_b"][0, :, 0].tolist() == [1000.0, 1012.0, 1024.0, 1036.0]  # rows 0, 2, 4, 6 of column 0
    assert out["w3.lora_b"][0, :, 0].tolist() == [1006.0, 1018.0, 1030.0, 1042.0]  # rows 1, 3, 5, 7


def test_interleaved_gate_up_swapped_gpt_oss():
    # GPT-OSS from PEFT 0.19.0: lora_A [E*r, 2I] on the output side, interleaved along 2I
    A, B = arange(E * R, 2 * I), arange(H, R * E, start=1000)
    out = run("gpt_oss", "peft-3d-swapped", ("gate_up",), {"lora_A.weight": A, "lora_B.weight": B}, {"gate_up": R})
    for e in range(E):
        for k in range(R):
            assert torch.equal(out["w1.lora_b"][e, :, k], A[e * R + k, 0::2])
            assert torch.equal(out["w3.lora_b"][e, :, k], A[e * R + k, 1::2])
            assert torch.equal(out["w1.lora_a"][e, k], B[:, k * E + e])


def test_swapped_orientation():
    # lora_A acts on the output side: A_2d = B_e^T, B_2d = A_e^T
    gA, gB = arange(E * R, 2 * I), arange(H, R * E, start=1000)   # gate_up: A [E*r, 2I], B [H, r*E]
    dA, dB = arange(E * R, H, start=2000), arange(I, R * E, start=3000)  # down: A [E*r, H], B [I, r*E]
    src = {"base_layer.lora_A.weight": gA, "base_layer.lora_B.weight": gB, "lora_A.weight": dA, "lora_B.weight": dB}
    out = run("qwen3_moe", "peft-3d-swapped", ("gate_up", "down"), src, {"gate_up": R, "down": R})
    for e in range(E):
        for k in range(R):
            assert torch.equal(out["w1.lora_a"][e, k], gB[:, k * E + e])
            assert torch.equal(out["w1.lora_b"][e, :, k], gA[e * R + k, :I])
            assert torch.equal(out["w3.lora_b"][e, :, k], gA[e * R + k, I:])
            assert torch.equal(out["w2.lora_a"][e, k], dB[:, k * E + e])
            assert torch.equal(out["w2.lora_b"][e, :, k], dA[e * R + k])


def _blockdiag_b(interleaved: bool) -> torch.Tensor:
    """B [2I, 2r*E]: arange, zero where a gate row meets an up rank or an up row a gate rank."""
    B = arange(2 * I, 2 * R * E, start=1000)
    rows_up = (torch.arange(2 * I) % 2 == 1) if interleaved else (torch.arange(2 * I) >= I)
    cols_up = torch.arange(2 * R * E) // E >= R  # column k*E + e, k in [0, 2r): up ranks are k >= r
    B[rows_up[:, None] != cols_up[None, :]] = 0
    return B


@pytest.mark.parametrize("rule, interleaved", [("qwen3_moe", False), ("gpt_oss", True)])
def test_blockdiag(rule, interleaved):
    # A [E*2r, H]: row e*2r + k, gate ranks k < r, up ranks k >= r; B block-diagonal, rank-major over 2r
    A, B = arange(E * 2 * R, H), _blockdiag_b(interleaved)
    out = run(rule, "peft-3d-blockdiag", ("gate_up",), {"lora_A.weight": A, "lora_B.weight": B}, {"gate_up": 2 * R})
    gate_rows = slice(0, None, 2) if interleaved else slice(0, I)
    up_rows = slice(1, None, 2) if interleaved else slice(I, 2 * I)
    for e in range(E):
        for k in range(R):
            assert torch.equal(out["w1.lora_a"][e, k], A[e * 2 * R + k])
            assert torch.equal(out["w3.lora_a"][e, k], A[e * 2 * R + R + k])
            assert torch.equal(out["w1.lora_b"][e, :, k], B[gate_rows, k * E + e])
            assert torch.equal(out["w3.lora_b"][e, :, k], B[up_rows, (R + k) * E + e])
    assert out["w1.lora_b"].all() and out["w3.lora_b"].all()  # only the diagonal blocks were kept


def test_blockdiag_swapped():
    # lora_A [E*2r, 2I] holds the block-diagonal 2D B (transposed); lora_B [H, 2r*E] holds [A_gate; A_up]
    A = _blockdiag_b(False).T.reshape(2 * R, E, 2 * I).transpose(0, 1).reshape(E * 2 * R, 2 * I)  # row e*2r + k
    B = arange(H, 2 * R * E, start=5000)
    out = run("qwen3_moe", "peft-3d-blockdiag-swapped", ("gate_up",), {"lora_A.weight": A, "lora_B.weight": B},
              {"gate_up": 2 * R})
    for e in range(E):
        for k in range(R):
            assert torch.equal(out["w1.lora_b"][e, :, k], A[e * 2 * R + k, :I])
            assert torch.equal(out["w3.lora_b"][e, :, k], A[e * 2 * R + R + k, I:])
            assert torch.equal(out["w1.lora_a"][e, k], B[:, k * E + e])
            assert torch.equal(out["w3.lora_a"][e, k], B[:, (R + k) * E + e])
    assert out["w1.lora_b"].all() and out["w3.lora_b"].all()


@pytest.mark.parametrize("rule, names", [("qwen3_moe", ("gate_proj", "up_proj", "down_proj")), ("mixtral", ("w1", "w3", "w2"))])
def test_2d_stacking_order(rule, names):
    # 12 experts: expert 10 must land at index 10 (numeric order, not "0, 1, 10, 11, 2, ...")
    n = 12
    src, start = {}, 0
    for e in range(n):
        for proj, (a, b) in zip(names, [((R, H), (I, R)), ((R, H), (I, R)), ((R, I), (H, R))]):
            src[f"{e}.{proj}.lora_A.weight"] = arange(*a, start=start)
            src[f"{e}.{proj}.lora_B.weight"] = arange(*b, start=start + 100)
            start += 1000
    out = run(rule, "peft-2d", ("gate", "up", "down"), src, {"gate": R, "up": R, "down": R})
    for e in range(n):
        for proj, w in zip(names, ("w1", "w3", "w2")):
            assert torch.equal(out[f"{w}.lora_a"][e], src[f"{e}.{proj}.lora_A.weight"])
            assert torch.equal(out[f"{w}.lora_b"][e], src[f"{e}.{proj}.lora_B.weight"])
    assert out["w1.lora_a"][10, 0, 0].item() == 30000.0  # expert 10, gate A: the 31st tensor written


def test_2d_partial_units():
    src = {f"{e}.down_proj.lora_{x}.weight": arange(*s, start=100 * e) for e in range(E)
           for x, s in (("A", (R, I)), ("B", (H, R)))}
    out = run("qwen3_moe", "peft-2d", ("down",), src, {"down": R})
    assert sorted(out) == ["w2.lora_a", "w2.lora_b"]
    assert torch.equal(out["w2.lora_b"][2], src["2.down_proj.lora_B.weight"])


def _peft3d_shapes(units):
    shapes = {"gate_up": {"lora_A.weight": (E * R, H), "lora_B.weight": (2 * I, R * E)},
              "down": {"lora_A.weight": (E * R, I), "lora_B.weight": (H, R * E)}}
    both = len(units) == 2
    return {("base_layer." if both and u == "gate_up" else "") + k: s for u in units for k, s in shapes[u].items()}


@pytest.mark.parametrize("units, keys", [
    (("gate_up", "down"), ["base_layer.lora_A.weight", "base_layer.lora_B.weight", "lora_A.weight", "lora_B.weight"]),
    (("gate_up",), ["lora_A.weight", "lora_B.weight"]),
    (("down",), ["lora_A.weight", "lora_B.weight"]),
])
def test_base_layer_nesting(units, keys):
    # both fused parameters targeted: gate_up (inner wrapper) under base_layer., down plain; one target: no base_layer.
    shapes = _peft3d_shapes(units)
    assert sorted(shapes) == keys
    src = {k: arange(*s, start=1000 * n) for n, (k, s) in enumerate(sorted(shapes.items()))}
    plan = compile_plan(RULES["qwen3_moe"], "peft-3d", units, shapes, ranks={u: R for u in units})
    assert sorted(plan.source_keys) == keys
    out = forward(plan, src)
    if "down" in units:
        assert torch.equal(out["w2.lora_a"][1, 0], src["lora_A.weight"][1 * R])
    if units == ("gate_up", "down"):
        assert torch.equal(out["w1.lora_a"][1, 0], src["base_layer.lora_A.weight"][1 * R])
    elif "gate_up" in units:
        assert torch.equal(out["w1.lora_a"][1, 0], src["lora_A.weight"][1 * R])
    inv = compile_inverse(RULES["qwen3_moe"], "peft-3d", {k: v.shape for k, v in out.items()})
    assert sorted(inverse(inv, out)) == keys


def test_nesting_is_checked_against_shapes():
    # gate_up and down swapped between base_layer. and plain keys: the shapes say so (2I != H)
    shapes = _peft3d_shapes(("gate_up", "down"))
    swapped = {k.removeprefix("base_layer.") if k.startswith("base_layer.") else "base_layer." + k: s
               for k, s in shapes.items()}
    with pytest.raises(RelayoutError, match=r"tensor 'base_layer\.lora_[AB]\.weight'"):
        compile_plan(RULES["qwen3_moe"], "peft-3d", ("gate_up", "down"), swapped, ranks={"gate_up": R, "down": R})


def test_named_3d():
    gA, gB = arange(E, R, H), arange(E, 2 * I, R, start=1000)
    dA, dB = arange(E, R, I, start=2000), arange(E, H, R, start=3000)
    src = {"gate_up_proj.lora_A.weight": gA, "gate_up_proj.lora_B.weight": gB,
           "down_proj.lora_A.weight": dA, "down_proj.lora_B.weight": dB}
    out = run("qwen3_moe", "named-3d", ("gate_up", "down"), src, {"gate_up": R, "down": R})
    assert torch.equal(out["w1.lora_a"], gA) and torch.equal(out["w3.lora_a"], gA)
    assert torch.equal(out["w1.lora_b"], gB[:, :I]) and torch.equal(out["w3.lora_b"], gB[:, I:])
    assert torch.equal(out["w2.lora_a"], dA) and torch.equal(out["w2.lora_b"], dB)


def test_shared_outer():
    gA, gB = arange(1, R, H), arange(E, 2 * I, R, start=1000)
    dA, dB = arange(E, R, I, start=2000), arange(1, H, R, start=3000)
    src = {"gate_up_proj.lora_A.weight": gA, "gate_up_proj.lora_B.weight": gB,
           "down_proj.lora_A.weight": dA, "down_proj.lora_B.weight": dB}
    out = run("gpt_oss", "shared-outer", ("gate_up", "down"), src, {"gate_up": R, "down": R})
    for e in range(E):
        assert torch.equal(out["w1.lora_a"][e], gA[0]) and torch.equal(out["w3.lora_a"][e], gA[0])
        assert torch.equal(out["w2.lora_b"][e], dB[0])
    assert torch.equal(out["w1.lora_b"], gB[:, 0::2]) and torch.equal(out["w3.lora_b"], gB[:, 1::2])
    assert torch.equal(out["w2.lora_a"], dA)
