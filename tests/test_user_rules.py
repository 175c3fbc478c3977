"""Users add architectures without touching the package: a rule file in their own folder, found through
`load_rules(extra=[DIR])`, `$RELAYOUT_RULES` or `relayout check --rules DIR`, relayouts their adapters.

ToyMoeForCausalLM is unknown to the package: experts at model.decoder.blocks.{layer}.moe.experts,
projections fc_gate / fc_up / fc_down, fused parameters fc_gate_up / fc_down. Two rule files:
one extends the packaged gated_moe base (inheriting its layouts), one is standalone with its own layout.
"""
from __future__ import annotations

import json
import os
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from relayout.cli import main
from relayout.compiler import compile_inverse, compile_plan
from relayout.errors import RelayoutError
from relayout.execute import forward, inverse
from relayout.rule import RULES_ENV
from relayout.ruleset import load_rules

EXTENDING = textwrap.dedent("""\
    # A user's rule: a toy MoE the package does not know, in the base layouts.
    relayout: 1
    name: toy_moe
    extends: gated_moe
    description: Toy MoE (user rule)
    architectures: [ToyMoeForCausalLM]
    model_types: [toy_moe]
    experts: ["model.decoder.blocks.{layer}.moe.experts"]
    projections: {gate: fc_gate, up: fc_up, down: fc_down}
    fused:
      - {role: gate_up, name: fc_gate_up, storage: "e o i", marked_transposed: false}
      - {role: down, name: fc_down, storage: "e o i", marked_transposed: false}
    """)

STANDALONE = textwrap.dedent("""\
    # A user's rule with its own packing: A rank-major, B expert-major, gate/up interleaved along the last axis.
    relayout: 1
    name: toy_packed
    description: Toy MoE v2 (user rule, no base)
    architectures: [ToyMoeV2ForCausalLM]
    model_types: [toy_moe_v2]
    gated: true
    experts: ["model.decoder.blocks.{layer}.moe.experts"]
    projections: {gate: fc_gate, up: fc_up, down: fc_down}
    fused:
      - {role: gate_up, name: fc_gate_up, storage: "e o i", marked_transposed: false}
      - {role: down, name: fc_down, storage: "e o i", marked_transposed: false}
    axes: {two: 2}
    layouts:
      toy-packed:
        description: the toy trainer's own format
        tensors:
          - {unit: gate_up, key: "{fused[gate_up]}.A", pattern: "(r e) h -> e r h", to: [w1.lora_a, w3.lora_a]}
          - {unit: gate_up, key: "{fused[gate_up]}.B", pattern: "e r (i two) -> two e i r", split: two, to: [w1.lora_b, w3.lora_b]}
          - {unit: down, key: "{fused[down]}.A", pattern: "r e i -> e r i", to: w2.lora_a}
          - {unit: down, key: "{fused[down]}.B", pattern: "(e h) r -> e h r", to: w2.lora_b}
    """)

E, R, H, I = 3, 2, 5, 4
PREFIX = "base_model.model.model.decoder.blocks.{layer}.moe.experts."


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    monkeypatch.delenv(RULES_ENV, raising=False)
    folder = tmp_path / "my_rules"
    folder.mkdir()
    (folder / "toy_moe.yaml").write_text(EXTENDING)
    (folder / "toy_packed.yml").write_text(STANDALONE)
    return folder


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_unknown_without_user_rules(monkeypatch):
    monkeypatch.delenv(RULES_ENV, raising=False)
    with pytest.raises(RelayoutError, match="no rule serves architecture 'ToyMoeForCausalLM'"):
        load_rules().find("ToyMoeForCausalLM")


def _check_found(rs, user_dir) -> None:
    for name, arch, model_type in [("toy_moe", "ToyMoeForCausalLM", "toy_moe"),
                                   ("toy_packed", "ToyMoeV2ForCausalLM", "toy_moe_v2")]:
        rule = rs.find(arch)
        assert rule.name == name and rs.find(model_type) is rule
        assert rule.file.startswith(str(user_dir.resolve()))
        assert rule.experts == ("model.decoder.blocks.{layer}.moe.experts",)
        assert dict(rule.projections) == {"gate": "fc_gate", "up": "fc_up", "down": "fc_down"}
    assert rs.find("Qwen3MoeForCausalLM").name == "qwen3_moe"  # the packaged rules are still there
    assert set(rs.find("ToyMoeForCausalLM").layout_names) >= {"peft-2d", "peft-3d", "named-3d"}  # inherited
    assert rs.find("ToyMoeV2ForCausalLM").layout_names == ("toy-packed",)


def test_load_with_extra(user_dir):
    _check_found(load_rules(extra=[user_dir]), user_dir)
    _check_found(load_rules(extra=[user_dir / "toy_moe.yaml", user_dir / "toy_packed.yml"]), user_dir)


def test_load_with_env(user_dir, monkeypatch, tmp_path):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv(RULES_ENV, os.pathsep.join([str(tmp_path / "empty"), str(user_dir)]))
    _check_found(load_rules(), user_dir)
    monkeypatch.setenv(RULES_ENV, os.pathsep.join([str(tmp_path / "typo"), str(user_dir)]))
    with pytest.raises(RelayoutError, match=r"typo:1::\$: cannot read"):  # a wrong entry is reported, not skipped
        load_rules()


def test_broken_user_rule_is_refused(user_dir):
    (user_dir / "toy_moe.yaml").write_text(EXTENDING.replace("extends: gated_moe", "extends: gated_moe_v9"))
    with pytest.raises(RelayoutError, match=r"toy_moe\.yaml:4::\$\.extends: extends unknown rule 'gated_moe_v9'"):
        load_rules(extra=[user_dir])


def test_relayout_2d_with_user_rule(user_dir):
    rule = load_rules(extra=[user_dir]).find("ToyMoeForCausalLM")
    names = {"fc_gate": ((R, H), (I, R), "w1"), "fc_up": ((R, H), (I, R), "w3"), "fc_down": ((R, I), (H, R), "w2")}
    src, n = {}, 0
    for e in range(E):
        for proj, (a, b, _) in names.items():
            src[f"{e}.{proj}.lora_A.weight"], src[f"{e}.{proj}.lora_B.weight"] = rand(*a, seed=n), rand(*b, seed=n + 1)
            n += 2
    plan = compile_plan(rule, "peft-2d", ("gate", "up", "down"), {k: v.shape for k, v in src.items()},
                        ranks={"gate": R, "up": R, "down": R}, block=PREFIX.format(layer=0))
    out = forward(plan, src)
    for e in range(E):
        for proj, (_, _, w) in names.items():
            assert torch.equal(out[f"{w}.lora_a"][e], src[f"{e}.{proj}.lora_A.weight"])
            assert torch.equal(out[f"{w}.lora_b"][e], src[f"{e}.{proj}.lora_B.weight"])
    back = inverse(compile_inverse(rule, "peft-2d", {k: v.shape for k, v in out.items()}), out)
    assert back.keys() == src.keys() and all(torch.equal(back[k], src[k]) for k in src)


def test_relayout_3d_with_user_rule(user_dir):
    rule = load_rules(extra=[user_dir]).find("toy_moe")
    # named-3d keys use the user's fused names
    src = {"fc_gate_up.lora_A.weight": rand(E, R, H, seed=1), "fc_gate_up.lora_B.weight": rand(E, 2 * I, R, seed=2),
           "fc_down.lora_A.weight": rand(E, R, I, seed=3), "fc_down.lora_B.weight": rand(E, H, R, seed=4)}
    plan = compile_plan(rule, "named-3d", ("gate_up", "down"), {k: v.shape for k, v in src.items()},
                        ranks={"gate_up": R, "down": R})
    out = forward(plan, src)
    assert torch.equal(out["w1.lora_b"], src["fc_gate_up.lora_B.weight"][:, :I])
    assert torch.equal(out["w3.lora_b"], src["fc_gate_up.lora_B.weight"][:, I:])
    assert torch.equal(out["w2.lora_b"], src["fc_down.lora_B.weight"])
    # and into PEFT 3D: nested keys, rank-major B
    peft = inverse(compile_inverse(rule, "peft-3d", {k: v.shape for k, v in out.items()}), out)
    assert sorted(peft) == ["base_layer.lora_A.weight", "base_layer.lora_B.weight", "lora_A.weight", "lora_B.weight"]
    for e in range(E):
        for k in range(R):
            assert torch.equal(peft["lora_B.weight"][:, k * E + e], src["fc_down.lora_B.weight"][e, :, k])
            assert torch.equal(peft["base_layer.lora_A.weight"][e * R + k], src["fc_gate_up.lora_A.weight"][e, k])


def test_relayout_with_standalone_user_layout(user_dir):
    rule = load_rules(extra=[user_dir]).find("ToyMoeV2ForCausalLM")
    src = {"fc_gate_up.A": rand(R * E, H, seed=5), "fc_gate_up.B": rand(E, R, 2 * I, seed=6),
           "fc_down.A": rand(R, E, I, seed=7), "fc_down.B": rand(E * H, R, seed=8)}
    plan = compile_plan(rule, "toy-packed", ("gate_up", "down"), {k: v.shape for k, v in src.items()},
                        ranks={"gate_up": R, "down": R})
    out = forward(plan, src)
    for e in range(E):  # the toy trainer's format, read by hand
        for k in range(R):
            assert torch.equal(out["w1.lora_a"][e, k], src["fc_gate_up.A"][k * E + e])
            assert torch.equal(out["w3.lora_a"][e, k], src["fc_gate_up.A"][k * E + e])
            assert torch.equal(out["w1.lora_b"][e, :, k], src["fc_gate_up.B"][e, k, 0::2])
            assert torch.equal(out["w3.lora_b"][e, :, k], src["fc_gate_up.B"][e, k, 1::2])
            assert torch.equal(out["w2.lora_a"][e, k], src["fc_down.A"][k, e])
            assert torch.equal(out["w2.lora_b"][e, :, k], src["fc_down.B"][e * H:(e + 1) * H, k])
    back = inverse(compile_inverse(rule, "toy-packed", {k: v.shape for k, v in out.items()}), out)
    assert back.keys() == src.keys() and all(torch.equal(back[k], src[k]) for k in src)
    with pytest.raises(RelayoutError, match=r"toy_packed\.yml: rule toy_packed, layout toy-packed: tensor 'fc_down\.B' dim 0"):
        compile_plan(rule, "toy-packed", ("down",), {"fc_down.A": (R, E, I), "fc_down.B": (E * H + 1, R)}, ranks={"down": R})


def test_check_with_user_rules(user_dir, capsys):
    assert main(["check", "--rules", str(user_dir)]) == 0, capsys.readouterr().out
    assert "ok -- validation done" in capsys.readouterr().out
    assert main(["check", str(user_dir)]) == 0, capsys.readouterr().out  # alone: extends finds the packaged base
    capsys.readouterr()


def test_check_with_env(user_dir, capsys, monkeypatch):
    monkeypatch.setenv(RULES_ENV, str(user_dir))
    code = main(["check", "-o", "json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and {"toy_moe", "toy_packed", "qwen3_moe"} <= set(report["rules"])


def _toy_adapter(folder, layers=2) -> dict:
    """A PEFT 2D adapter for the toy model (per-expert fc_gate/fc_up/fc_down LoRAs), on disk."""
    folder.mkdir()
    tensors, n = {}, 0
    for layer in range(layers):
        for e in range(E):
            for proj, (a, b) in {"fc_gate": ((R, H), (I, R)), "fc_up": ((R, H), (I, R)), "fc_down": ((R, I), (H, R))}.items():
                key = PREFIX.format(layer=layer) + f"{e}.{proj}"
                tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"] = rand(*a, seed=n), rand(*b, seed=n + 1)
                n += 2
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": R, "lora_alpha": 2 * R, "target_modules": ["fc_gate", "fc_up", "fc_down"],
        "base_model_name_or_path": None}))
    return tensors


@pytest.mark.parametrize("how", ["rules", "env"])
def test_convert_adapter_with_user_rule(user_dir, tmp_path, monkeypatch, how):
    """End to end: an adapter folder of the unknown architecture, converted to the normalized layout."""
    import relayout

    src = _toy_adapter(tmp_path / "adapter")
    kwargs = {"rules": [user_dir]} if how == "rules" else {}
    if how == "env":
        monkeypatch.setenv(RULES_ENV, str(user_dir))
    out = relayout.convert(tmp_path / "adapter", tmp_path / "out.safetensors", "normalized",
                           arch="ToyMoeForCausalLM", **kwargs)
    got = load_file(str(out))
    for layer in range(2):
        for e in range(E):
            for proj, w in (("fc_gate", "w1"), ("fc_up", "w3"), ("fc_down", "w2")):
                key = PREFIX.format(layer=layer) + f"{e}.{proj}"
                assert torch.equal(got[f"layers.{layer}.{w}.lora_a"][e], src[key + ".lora_A.weight"])
                assert torch.equal(got[f"layers.{layer}.{w}.lora_b"][e], src[key + ".lora_B.weight"])


def test_block_diagonal_layout_is_found_by_its_diagonal_not_its_name(user_dir, tmp_path):
    """A standalone rule whose block-diagonal layout is not named '*blockdiag*' (here 'peft-3d-joined'): detection
    picks it for block-diagonal data by its `diagonal` op (the name test reported 'fits several layouts')."""
    import relayout
    from relayout.rule import packaged_rules_dir

    base = (packaged_rules_dir() / "_gated_moe.yaml").read_text()
    joined = base.replace("peft-3d-blockdiag", "peft-3d-joined").replace("name: gated_moe\nabstract: true\n", (
        "name: toy_joined\narchitectures: [ToyJoinedForCausalLM]\n"
        "experts: ['model.decoder.blocks.{layer}.moe.experts']\n"))
    joined = joined.replace("projections: {gate: gate_proj, up: up_proj, down: down_proj}",
                            "projections: {gate: fc_gate, up: fc_up, down: fc_down}")
    joined = joined.replace("name: gate_up_proj,", "name: fc_gate_up,").replace("name: down_proj,", "name: fc_down,")
    (tmp_path / "joined").mkdir()
    (tmp_path / "joined" / "toy_joined.yaml").write_text(joined)
    _toy_adapter(tmp_path / "adapter")  # gate and up A differ: peft-3d is written block-diagonal at rank 2r
    relayout.convert(tmp_path / "adapter", tmp_path / "3d", "peft-3d", arch="ToyMoeForCausalLM", rules=[user_dir])
    loaded = relayout.load_adapter(tmp_path / "3d", arch="ToyJoinedForCausalLM", rules=[tmp_path / "joined"])
    assert {b.plan.layout for b in loaded.detected.blocks} == {"peft-3d-joined"}
    assert {b.plan.rank("gate_up") for b in loaded.detected.blocks} == {R}


def test_rule_without_peft_orientation_table(tmp_path):
    """peft_orientation is optional: without it a version tells nothing (was StopIteration on convert and inspect)."""
    import re

    import relayout
    from relayout.rule import packaged_rules_dir

    base = (packaged_rules_dir() / "_gated_moe.yaml").read_text()
    text = base.replace("name: gated_moe\nabstract: true\n", "name: toy_no_table\narchitectures: [ToyNoTable]\n"
                        "experts: ['model.decoder.blocks.{layer}.moe.experts']\n")
    text = re.sub(r"peft_orientation:\n(  - .*\n)+", "", text).replace("gate_proj", "fc_gate").replace(
        "up_proj", "fc_up").replace("down_proj", "fc_down").replace("gate_fc_up", "fc_gate_up")
    assert "peft_orientation" not in text and "fc_gate_up" in text
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "toy_no_table.yaml").write_text(text)
    src = _toy_adapter(tmp_path / "adapter", layers=1)
    options = dict(arch="ToyNoTable", rules=[tmp_path / "rules"])
    relayout.convert(tmp_path / "adapter", tmp_path / "3d", "peft-3d", **options)  # lora_A on the input side
    loaded = relayout.load_adapter(tmp_path / "3d", **options)
    assert loaded.adapter.config["peft_version"] and loaded.detected.blocks[0].plan.layout == "peft-3d-blockdiag"
    relayout.convert(loaded, tmp_path / "2d", "peft-2d")
    back = load_file(str(tmp_path / "2d" / "adapter_model.safetensors"))
    assert sorted(back) == sorted(src) and all(torch.equal(back[k], src[k]) for k in src)


def test_per_expert_key_with_a_zero_before_the_expert_index(tmp_path):
    """Key template 'experts_v0.{expert}...': experts are counted around the {expert} field, not the first '0'
    (which found no expert and reported every key as unaccounted for)."""
    import relayout

    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "toy_v0.yaml").write_text(textwrap.dedent("""\
        relayout: 1
        name: toy_v0
        extends: gated_moe
        architectures: [ToyV0ForCausalLM]
        experts: ["model.layers.{layer}.mlp"]
        layouts:
          per-expert-v0:
            tensors:
              - {unit: down, key: "experts_v0.{expert}.{proj[down]}.lora_A.weight", pattern: "e r i -> e r i", to: w2.lora_a}
              - {unit: down, key: "experts_v0.{expert}.{proj[down]}.lora_B.weight", pattern: "e h r -> e h r", to: w2.lora_b}
        """))
    (tmp_path / "adapter").mkdir()
    key = "base_model.model.model.layers.0.mlp.experts_v0.{}.down_proj.lora_{}.weight"
    src = {key.format(e, ab): rand(*shape, seed=e) for e in range(E) for ab, shape in (("A", (R, I)), ("B", (H, R)))}
    save_file(src, str(tmp_path / "adapter" / "adapter_model.safetensors"))
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"r": R, "lora_alpha": 2 * R}))
    (_, got), = relayout.iter_normalized(relayout.load_adapter(tmp_path / "adapter", arch="ToyV0ForCausalLM",
                                                                rules=[tmp_path / "rules"]))
    assert torch.equal(got["w2"][0], torch.stack([src[key.format(e, "A")] for e in range(E)]))
    assert torch.equal(got["w2"][1], torch.stack([src[key.format(e, "B")] for e in range(E)]))
