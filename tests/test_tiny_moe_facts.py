"""Facts about transformers 5.24 fused experts and PEFT 0.21.2 adapters that relayout relies on.

Each test builds tiny real models / real PEFT adapters (tests/tiny_moe.py) and can fail if an
upgrade changes a layout, a key name, an orientation or a conversion.
"""

import json
import math

import peft
import pytest
import torch
from safetensors.torch import load_file

import tiny_moe as tm
from tiny_moe import E, H, I, FAMILIES

pytestmark = pytest.mark.filterwarnings("ignore")
R = 4
ALL = sorted(FAMILIES)
CLASS = {
    "qwen3_moe": "Qwen3MoeForCausalLM", "gpt_oss": "GptOssForCausalLM", "mixtral": "MixtralForCausalLM",
    "olmoe": "OlmoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
    "glm4_moe": "Glm4MoeForCausalLM", "llama4": "Llama4ForCausalLM", "qwen3_next": "Qwen3NextForCausalLM",
    "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration",
}
EXTRA = {"deepseek_v3": "q_b_proj"}  # a non-expert nn.Linear to target in each family (default q_proj)


@pytest.fixture(scope="module")
def models():
    return {f: tm.make_model(f)[0] for f in ALL}


def _saved(d):
    sd = load_file(str(d / "adapter_model.safetensors"))
    cfg = json.loads((d / "adapter_config.json").read_text())
    return sd, cfg


def _expert_keys(sd, family, layer=0):
    prefix = f"base_model.model.{tm.experts_path(family, layer)}."
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


@pytest.mark.parametrize("family", ALL)
def test_model_facts(models, family):
    m = models[family]
    assert type(m).__name__ == CLASS[family]
    exp = tm.experts_module(m, 0)
    params = [(n, tuple(p.shape)) for n, p in exp.named_parameters(recurse=False)]
    if family in tm.STORED_IN_OUT:  # [E, in, out]
        want = [("gate_up_proj", (E, H, 2 * I)), ("down_proj", (E, I, H))]
    else:  # [E, out, in]
        want = [("gate_up_proj", (E, 2 * I, H)), ("down_proj", (E, H, I))]
    assert [p for p in params if not p[0].endswith("_bias")] == want  # registration order too
    if family == "gpt_oss":
        assert [n for n, _ in params] == ["gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"]
    # is_transposed is set by @use_experts_implementation: True only for GPT-OSS; Llama4 lacks it.
    if family == "llama4":
        assert not hasattr(exp, "is_transposed")
    else:
        assert exp.is_transposed == (family == "gpt_oss")
        assert exp.is_concatenated == (family not in tm.INTERLEAVED_GATE_UP)


@pytest.mark.parametrize("family", ALL)
def test_reference_forward_matches_model(models, family):
    """expert_weights' gate/up split + formats.md section 4 reproduce the model's experts forward."""
    m = models[family]
    x = torch.randn(7, H, generator=torch.Generator().manual_seed(0))
    ids, w = tm.fixed_routing(7, seed=3)
    ref = tm.reference_moe_output(m, 0, x, ids, w)
    assert torch.allclose(tm.moe_block_output(m, 0, x, ids, w), ref, atol=1e-5)
    swapped = tm.expert_weights(m, 0)
    d = {"gate": swapped["up"] - swapped["gate"], "up": swapped["gate"] - swapped["up"]}
    assert not torch.allclose(tm.reference_moe_output(m, 0, x, ids, w, d), ref, atol=1e-3)


@pytest.mark.parametrize("family", ALL)
def test_3d_adapter_keys_shapes_and_delta_formula(models, family, tmp_path):
    m = models[family]
    extra = EXTRA.get(family, "q_proj")
    pm = tm.make_3d_adapter(m, tmp_path, r=R, alpha=8, extra_target_modules=(extra,))
    sd, cfg = _saved(tmp_path)
    assert cfg["peft_version"] == peft.__version__ == "0.21.2"
    mlp = tm.MLP_ATTR.get(family, "mlp")
    assert isinstance(cfg["target_parameters"], list)
    assert set(cfg["target_parameters"]) == {f"{mlp}.experts.gate_up_proj", f"{mlp}.experts.down_proj"}
    ek = _expert_keys(sd, family)
    assert set(ek) == {"base_layer.lora_A.weight", "base_layer.lora_B.weight", "lora_A.weight", "lora_B.weight"}
    # PEFT (in, out): gate_up [E*r, H] / [2I, r*E] normally; Llama4 (unmarked [E, in, out]) is swapped.
    if family == "llama4":
        gu, dn = ((E * R, 2 * I), (H, R * E)), ((E * R, H), (I, R * E))
    else:
        gu, dn = ((E * R, H), (2 * I, R * E)), ((E * R, I), (H, R * E))
    assert (tuple(ek["base_layer.lora_A.weight"].shape), tuple(ek["base_layer.lora_B.weight"].shape)) == gu
    assert (tuple(ek["lora_A.weight"].shape), tuple(ek["lora_B.weight"].shape)) == dn
    assert any(f".{extra}.lora_A.weight" in k for k in sd)  # non-expert LoRA saved alongside
    # formats.md formula on the saved tensors == PEFT's own delta (incl. gate/up split)
    peft_d = tm.per_expert_deltas_from_peft(pm, 0)
    mine = {**tm.deltas_from_3d_tensors(family, ek["base_layer.lora_A.weight"], ek["base_layer.lora_B.weight"],
                                        8 / R, "gate_up_proj"),
            **tm.deltas_from_3d_tensors(family, ek["lora_A.weight"], ek["lora_B.weight"], 8 / R, "down_proj")}
    for role in ("gate", "up", "down"):
        assert torch.allclose(mine[role], peft_d[role], atol=1e-6), role
    # reading B expert-major (the classic bug) gives a different delta
    b = ek["lora_B.weight"]
    wrong = b.reshape(b.shape[0], E, R).permute(1, 0, 2) @ ek["lora_A.weight"].reshape(E, R, -1) * 2
    assert not torch.allclose(tm._to_out_in(family, wrong.transpose(-2, -1) if family == "gpt_oss" else wrong),
                              peft_d["down"], atol=1e-3)
    # PEFT's delta is what the PEFT forward applies
    x = torch.randn(6, H, generator=torch.Generator().manual_seed(1))
    ids, w = tm.fixed_routing(6, seed=2)
    assert torch.allclose(tm.moe_block_output(pm, 0, x, ids, w),
                          tm.reference_moe_output(m, 0, x, ids, w, peft_d), atol=1e-5)
    assert torch.allclose(tm.moe_block_output(pm, 0, x, ids, w),
                          tm.moe_block_output(tm.merged_copy(m, 0, peft_d), 0, x, ids, w), atol=1e-5)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "llama4"])
@pytest.mark.parametrize("target", ["gate_up_proj", "down_proj"])
def test_single_target_has_no_base_layer(models, family, target, tmp_path):
    tm.make_3d_adapter(models[family], tmp_path, targets=(target,))
    ek = _expert_keys(_saved(tmp_path)[0], family)
    assert set(ek) == {"lora_A.weight", "lora_B.weight"}


def test_rank_and_alpha_pattern_keys(models, tmp_path):
    """rank/alpha_pattern keys are matched (re.match '(.*\\.)?(key)$') against '<module path>.<param>'."""
    pm = tm.make_3d_adapter(models["qwen3_moe"], tmp_path, r=R, alpha=8,
                            rank_pattern={"gate_up_proj": 6}, alpha_pattern={r"layers\.1\.mlp\.experts\.down_proj": 3})
    sd, cfg = _saved(tmp_path)
    assert cfg["rank_pattern"] == {"gate_up_proj": 6}
    assert cfg["alpha_pattern"] == {r"layers\.1\.mlp\.experts\.down_proj": 3}
    assert tuple(_expert_keys(sd, "qwen3_moe")["base_layer.lora_A.weight"].shape) == (E * 6, H)
    assert tm.param_wrappers(pm, 1)["down_proj"].scaling["default"] == 3 / R
    assert tm.param_wrappers(pm, 0)["down_proj"].scaling["default"] == 8 / R


@pytest.mark.parametrize("family", sorted(tm.V4_CONVERTIBLE))
def test_peft_converts_4x_per_expert_adapter(models, family, tmp_path):
    """PEFT 0.21.2 loads a 4.x per-expert adapter into the fused model: gate_up rank 2r, alpha 2x."""
    m = models[family]
    factors = tm.make_2d_adapter(m, tmp_path, r=R, alpha=8, peft_version="0.17.1")
    pm = tm.load_adapter(m, tmp_path)
    cfg = pm.peft_config["default"]
    assert cfg.target_parameters == {"gate_up_proj", "down_proj"} and not cfg.target_modules
    assert cfg.rank_pattern == {r".*\.gate_up_proj": 2 * R} and cfg.alpha_pattern == {r".*\.gate_up_proj": 16}
    wr = tm.param_wrappers(pm, 0)
    assert wr["gate_up_proj"].lora_A["default"].weight.shape == (E * 2 * R, H)
    d = tm.per_expert_deltas_from_peft(pm, 0)
    for role in ("gate", "up", "down"):
        A, B = factors[(0, role)]
        assert torch.allclose(d[role], 2.0 * B @ A, atol=1e-6), role


def test_4x_conversion_rslora_scale_is_sqrt2_too_large(models, tmp_path):
    m = models["qwen3_moe"]
    factors = tm.make_2d_adapter(m, tmp_path, r=R, alpha=8, use_rslora=True)
    d = tm.per_expert_deltas_from_peft(tm.load_adapter(m, tmp_path), 0)
    A, B = factors[(0, "gate")]
    assert torch.allclose(d["gate"], math.sqrt(2) * (8 / math.sqrt(R)) * B @ A, atol=1e-5)
    A, B = factors[(0, "down")]
    assert torch.allclose(d["down"], (8 / math.sqrt(R)) * B @ A, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen2_moe", "llama4", "qwen3_5_moe"])
def test_4x_per_expert_adapter_not_converted(models, family, tmp_path):
    """No conversion: target_modules stay v4 names and only match shared-expert Linears (if any)."""
    m = models[family]
    tm.make_2d_adapter(m, tmp_path)
    pm = tm.load_adapter(m, tmp_path)
    assert tm.param_wrappers(pm, 0) == {}
    lora = {n.split(".lora_")[0] for n, _ in pm.named_parameters() if ".lora_" in n}
    assert lora and all(".shared_expert." in n for n in lora)


def test_4x_gpt_oss_per_expert_adapter_fails_to_load(models, tmp_path):
    tm.make_2d_adapter(models["gpt_oss"], tmp_path)
    with pytest.raises(ValueError, match="not found in the base model"):
        tm.load_adapter(models["gpt_oss"], tmp_path)
