"""Property tests: every packaged rule, every layout: relayout <-> inverse is exact, and deltas agree.

For random sizes (E, r, H, I in 1..7, primes included) and random unit subsets, source tensors are
built from random normalized tensors through `compile_inverse` (the layout decides what it can hold),
and also drawn directly at random. Then:
  (a) forward(inverse(x)) == x and inverse(forward(src)) == src, exactly;
  (b) the per-expert deltas B_e @ A_e computed from the SOURCE layout by the slow reference below
      (plain loops over experts, written from formats.md, not from the rule files) equal the deltas
      computed from the normalized tensors.
Data are random integers stored as float64, so every product is exact and compared with torch.equal.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from relayout.compiler import compile_inverse, compile_plan
from relayout.execute import forward, inverse
from relayout.ruleset import load_rules

RULES = load_rules().rules
CASES = [(name, layout) for name, rule in sorted(RULES.items()) for layout in rule.layout_names]

# Architecture facts the reference relies on, written from formats.md (not read from the rule files).
INTERLEAVED = {"gpt_oss"}  # gate at even, up at odd rows of gate_up; all others: gate [0, I), up [I, 2I)
PROJ_NAMES = {"mixtral": ("w1", "w3", "w2")}  # per-expert (2D) names of gate, up, down
DEFAULT_PROJ = ("gate_proj", "up_proj", "down_proj")
FUSED = {"gate_up": "gate_up_proj", "down": "down_proj"}
KNOWN_RULES = {"qwen3_moe", "deepseek_v3", "glm4_moe", "gpt_oss", "llama4", "mixtral", "olmoe",
               "qwen3_5_moe", "qwen3_next"}
# Layout facts: which units it has, and what its fused form forces on the normalized tensors.
LAYOUT_UNITS = {
    "peft-2d": ("gate", "up", "down"),
    "peft-3d": ("gate_up", "down"), "peft-3d-swapped": ("gate_up", "down"),
    "peft-3d-blockdiag": ("gate_up", "down"), "peft-3d-blockdiag-swapped": ("gate_up", "down"),
    "named-3d": ("gate_up", "down"), "shared-outer": ("gate_up", "down"),
}
PEFT_3D = {"peft-3d", "peft-3d-swapped", "peft-3d-blockdiag", "peft-3d-blockdiag-swapped"}  # (e r) A, (r e) B
SWAPPED = {"peft-3d-swapped", "peft-3d-blockdiag-swapped"}  # lora_A acts on the output side
BLOCKDIAG = {"peft-3d-blockdiag", "peft-3d-blockdiag-swapped"}  # gate_up rank 2r, block-diagonal 2D B
SHARED_A = {"peft-3d", "peft-3d-swapped", "named-3d", "shared-outer"}  # one A for gate and up
SHARED_OUTER = {"shared-outer"}  # gate_up A and down B equal over experts
TARGETS = {"gate": ("w1.lora_a", "w1.lora_b"), "up": ("w3.lora_a", "w3.lora_b"), "down": ("w2.lora_a", "w2.lora_b"),
           "gate_up": ("w1.lora_a", "w1.lora_b", "w3.lora_a", "w3.lora_b")}
ROLE_OF = {"w1": "gate", "w3": "up", "w2": "down"}
SIZES = st.sampled_from([1, 2, 3, 4, 5, 7])


def test_every_rule_and_layout_is_covered():
    assert set(RULES) == KNOWN_RULES, "a packaged rule is new or gone: add its facts to this file"
    for name, layout in CASES:
        assert layout in LAYOUT_UNITS, f"{name}: layout {layout} has no reference in this file"
        assert RULES[name].layout(layout).units == LAYOUT_UNITS[layout], (name, layout)


# ----------------------------------------------------------------------------------------------
# Slow reference: per-expert deltas from the SOURCE layout (formats.md sections 1-2).

def _split_gate_up(d: torch.Tensor, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A [2I, ...] gate_up delta -> (gate [I, ...], up [I, ...])."""
    if rule in INTERLEAVED:
        return d[0::2], d[1::2]
    half = d.shape[0] // 2
    return d[:half], d[half:]


def _key(units: tuple[str, ...], unit: str, name: str) -> str:
    """PEFT nesting: with both fused parameters targeted, gate_up (inner) sits under base_layer."""
    return ("base_layer." if unit == "gate_up" and "down" in units else "") + name


def reference_deltas(rule: str, layout: str, units: tuple[str, ...], src: dict, E: int) -> dict:
    """(role, expert) -> delta [out, in] in the model's orientation, by loops over experts."""
    out = {}
    if layout == "peft-2d":
        names = dict(zip(("gate", "up", "down"), PROJ_NAMES.get(rule, DEFAULT_PROJ)))
        for unit in units:
            for e in range(E):
                a, b = src[f"{e}.{names[unit]}.lora_A.weight"], src[f"{e}.{names[unit]}.lora_B.weight"]
                out[unit, e] = b @ a
        return out
    for unit in units:
        for e in range(E):
            if layout in PEFT_3D:
                A, B = src[_key(units, unit, "lora_A.weight")], src[_key(units, unit, "lora_B.weight")]
                rank = A.shape[0] // E
                a_e = A.reshape(E, rank, A.shape[1])[e]         # rows e*r + k
                b_e = B.reshape(B.shape[0], rank, E)[:, :, e]   # columns k*E + e
                if layout in SWAPPED:                           # lora_A acts on the output side
                    a_e, b_e = b_e.T, a_e.T
                d = b_e @ a_e                                   # blockdiag: B_e zero off the blocks
            elif layout == "named-3d":
                A, B = src[f"{FUSED[unit]}.lora_A.weight"], src[f"{FUSED[unit]}.lora_B.weight"]
                d = B[e] @ A[e]
            elif layout == "shared-outer":
                A, B = src[f"{FUSED[unit]}.lora_A.weight"], src[f"{FUSED[unit]}.lora_B.weight"]
                d = B[e] @ A[0] if unit == "gate_up" else B[0] @ A[e]
            else:
                raise AssertionError(f"no reference for layout {layout}")
            if unit == "gate_up":
                out["gate", e], out["up", e] = _split_gate_up(d, rule)
            else:
                out[unit, e] = d
    return out


def expected_source_shapes(rule: str, layout: str, units, E, r, H, I) -> dict:
    """Key -> shape of each source tensor, per formats.md (in = H for gate_up, I for down)."""
    dims = {"gate": (H, I), "up": (H, I), "down": (I, H), "gate_up": (H, 2 * I)}  # (in, out)
    out = {}
    for unit in units:
        n_in, n_out = dims[unit]
        if layout == "peft-2d":
            name = dict(zip(("gate", "up", "down"), PROJ_NAMES.get(rule, DEFAULT_PROJ)))[unit]
            for e in range(E):
                out[f"{e}.{name}.lora_A.weight"], out[f"{e}.{name}.lora_B.weight"] = (r, n_in), (n_out, r)
        elif layout in PEFT_3D:
            rank = 2 * r if layout in BLOCKDIAG and unit == "gate_up" else r
            if layout in SWAPPED:
                n_in, n_out = n_out, n_in
            out[_key(units, unit, "lora_A.weight")] = (E * rank, n_in)
            out[_key(units, unit, "lora_B.weight")] = (n_out, rank * E)
        else:  # named-3d, shared-outer
            shared_a, shared_b = layout == "shared-outer" and unit == "gate_up", layout == "shared-outer" and unit == "down"
            out[f"{FUSED[unit]}.lora_A.weight"] = (1 if shared_a else E, r, n_in)
            out[f"{FUSED[unit]}.lora_B.weight"] = (1 if shared_b else E, n_out, r)
    return out


def normalized_deltas(x: dict) -> dict:
    out = {}
    for w, role in ROLE_OF.items():
        if f"{w}.lora_a" in x:
            for e in range(x[f"{w}.lora_a"].shape[0]):
                out[role, e] = x[f"{w}.lora_b"][e] @ x[f"{w}.lora_a"][e]
    return out


def _outer_2d(layout: str, units, src: dict, E: int, e: int) -> torch.Tensor:
    """The 2D B [2I, 2r] of expert e in a blockdiag layout (A_e^T when swapped)."""
    if layout in SWAPPED:
        A = src[_key(units, "gate_up", "lora_A.weight")]
        return A.reshape(E, A.shape[0] // E, A.shape[1])[e].T
    B = src[_key(units, "gate_up", "lora_B.weight")]
    return B.reshape(B.shape[0], B.shape[1] // E, E)[:, :, e]


def _blockdiag_check(rule: str, layout: str, units, src: dict, E: int) -> None:
    """blockdiag sources: per expert, gate rows use only the first r of the 2r ranks, up rows only the last r."""
    if "gate_up" not in units:
        return
    for e in range(E):
        b = _outer_2d(layout, units, src, E, e)
        gate, up = _split_gate_up(b, rule)
        half = b.shape[1] // 2
        assert not gate[:, half:].any() and not up[:, :half].any(), f"expert {e}: 2D B is not block-diagonal"


# ----------------------------------------------------------------------------------------------
# Strategies and data.

def _ints(gen: torch.Generator, *shape: int) -> torch.Tensor:
    """Random non-zero integers as float64: matmuls of them are exact."""
    x = torch.randint(1, 10, shape, generator=gen) * (torch.randint(0, 2, shape, generator=gen) * 2 - 1)
    return x.to(torch.float64)


def random_normalized(layout: str, units, E, r, H, I, gen) -> dict:
    shapes = {"w1.lora_a": (E, r, H), "w1.lora_b": (E, I, r), "w3.lora_a": (E, r, H), "w3.lora_b": (E, I, r),
              "w2.lora_a": (E, r, I), "w2.lora_b": (E, H, r)}
    wanted = [t for u in units for t in TARGETS[u]]
    x = {t: _ints(gen, *shapes[t]) for t in wanted}
    if layout in SHARED_A and "w1.lora_a" in x:
        x["w3.lora_a"] = x["w1.lora_a"].clone()
    if layout in SHARED_OUTER:
        for t in ("w1.lora_a", "w2.lora_b"):
            if t in x:
                x[t] = x[t][:1].expand_as(x[t]).clone()
        if "w3.lora_a" in x:
            x["w3.lora_a"] = x["w1.lora_a"].clone()
    return x


@st.composite
def problems(draw, layout: str):
    E, r, H, I = draw(SIZES), draw(SIZES), draw(SIZES), draw(SIZES)
    all_units = LAYOUT_UNITS[layout]
    subsets = [s for n in range(1, len(all_units) + 1) for s in itertools.combinations(all_units, n)]
    units = draw(st.sampled_from(subsets))
    seed = draw(st.integers(0, 2**31 - 1))
    return E, r, H, I, units, seed


def _same(a: dict, b: dict, what: str) -> None:
    assert set(a) == set(b), f"{what}: keys {sorted(a)} != {sorted(b)}"
    for k in a:
        assert a[k].shape == b[k].shape, f"{what}: {k}: shape {tuple(a[k].shape)} != {tuple(b[k].shape)}"
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("rule_name, layout", CASES)
@SETTINGS
@given(data=st.data())
def test_inverse_then_forward_is_exact_and_keeps_deltas(rule_name, layout, data):
    rule = RULES[rule_name]
    E, r, H, I, units, seed = data.draw(problems(layout))
    note(f"seed={seed} rule={rule_name} ({rule.file}) layout={layout} units={units} E={E} r={r} H={H} I={I}")
    gen = torch.Generator().manual_seed(seed)
    x = random_normalized(layout, units, E, r, H, I, gen)
    inv = compile_inverse(rule, layout, {k: v.shape for k, v in x.items()})
    src = inverse(inv, x)
    note(f"source shapes: { {k: tuple(v.shape) for k, v in src.items()} }")
    assert {k: tuple(v.shape) for k, v in src.items()} == expected_source_shapes(rule_name, layout, units, E, r, H, I)
    if layout in BLOCKDIAG:
        _blockdiag_check(rule_name, layout, units, src, E)
    plan = compile_plan(rule, layout, units, {k: v.shape for k, v in src.items()},
                        ranks=dict(inv.config_ranks), known={"e": E})
    _same(forward(plan, src), x, "forward(inverse(x)) vs x")
    _same(reference_deltas(rule_name, layout, units, src, E), normalized_deltas(x), "deltas: source vs normalized")


@pytest.mark.parametrize("rule_name, layout", CASES)
@SETTINGS
@given(data=st.data())
def test_forward_then_inverse_is_exact_on_random_sources(rule_name, layout, data):
    """Sources drawn directly at random (any values the layout can hold), compiled from shapes + config rank."""
    rule = RULES[rule_name]
    E, r, H, I, units, seed = data.draw(problems(layout))
    note(f"seed={seed} rule={rule_name} ({rule.file}) layout={layout} units={units} E={E} r={r} H={H} I={I}")
    gen = torch.Generator().manual_seed(seed)
    shapes = expected_source_shapes(rule_name, layout, units, E, r, H, I)
    src = {k: _ints(gen, *s) for k, s in shapes.items()}
    if layout in BLOCKDIAG and "gate_up" in units:  # zero the off-diagonal blocks, per formats.md
        rows = (torch.arange(2 * I) % 2) if rule_name in INTERLEAVED else (torch.arange(2 * I) >= I).long()
        if layout in SWAPPED:  # A [(e 2r), 2I]
            key = _key(units, "gate_up", "lora_A.weight")
            A = src[key].reshape(E, 2, r, 2 * I)
            for half in (0, 1):
                A[:, half][..., rows != half] = 0
            src[key] = A.reshape(E * 2 * r, 2 * I)
        else:  # B [2I, (2r e)]
            key = _key(units, "gate_up", "lora_B.weight")
            B = src[key].reshape(2 * I, 2, r, E)
            for half in (0, 1):
                B[rows != half, half] = 0
            src[key] = B.reshape(2 * I, 2 * r * E)
        _blockdiag_check(rule_name, layout, units, src, E)
    note(f"source shapes: { {k: tuple(v) for k, v in shapes.items()} }")
    cfg_rank = 2 * r if layout in BLOCKDIAG else r
    ranks = {u: (cfg_rank if u == "gate_up" else r) for u in units}
    plan = compile_plan(rule, layout, units, shapes, ranks=ranks, known={"e": E})
    x = forward(plan, src)
    assert {t: tuple(v.shape) for t, v in x.items()} == {
        **{t: (E, r, H) for t in ("w1.lora_a", "w3.lora_a") if t in x}, **{t: (E, I, r) for t in ("w1.lora_b", "w3.lora_b") if t in x},
        **({"w2.lora_a": (E, r, I), "w2.lora_b": (E, H, r)} if "down" in units else {})}
    _same(reference_deltas(rule_name, layout, units, src, E), normalized_deltas(x), "deltas: source vs normalized")
    back = compile_inverse(rule, layout, {k: v.shape for k, v in x.items()})
    _same(inverse(back, x), src, "inverse(forward(src)) vs src")
