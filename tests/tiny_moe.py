"""Tiny real MoE models and real PEFT adapters for relayout tests (test-only helper).

Everything here runs on CPU in float32 with random weights built from configs (no hub access).
Facts pinned for transformers 5.24.0 / peft 0.21.2 (see tests/test_tiny_moe_facts.py):

* Every family stores routed experts fused in one module ``<layers>.{l}.<mlp>.experts`` with
  parameters ``gate_up_proj`` then ``down_proj`` (registration order; GPT-OSS also has
  ``gate_up_proj_bias`` / ``down_proj_bias`` between/after them).
* ``[E, out, in]`` (gate_up ``[E, 2I, H]``, down ``[E, H, I]``) for all families except GPT-OSS
  and Llama4, which store ``[E, in, out]`` (gate_up ``[E, H, 2I]``, down ``[E, I, H]``).
* gate/up inside gate_up are concatenated (gate first) except GPT-OSS (interleaved: gate even).
* PEFT 0.21.2 saves the inner wrapper (gate_up_proj) as ``experts.base_layer.lora_{A,B}.weight``
  and the outer (down_proj) as ``experts.lora_{A,B}.weight``; a single target has no base_layer.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Callable

import torch
import transformers as T
from safetensors.torch import save_file

H, I, E, R_DEFAULT = 32, 24, 4, 4  # hidden, moe intermediate (2I != H, I != H), experts, rank

_COMMON = dict(
    vocab_size=64, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=8, max_position_embeddings=64, num_experts_per_tok=2, tie_word_embeddings=False,
)
_LINEAR_ATTN = dict(  # Qwen3-Next / Qwen3.5 gated-delta-net layers, tiny
    layer_types=["linear_attention", "full_attention"], linear_num_value_heads=2,
    linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
)


def _qwen3_moe():
    return T.Qwen3MoeConfig(**_COMMON, num_experts=E, moe_intermediate_size=I, intermediate_size=48,
                            decoder_sparse_step=1, architectures=["Qwen3MoeForCausalLM"])


def _qwen2_moe():
    return T.Qwen2MoeConfig(**_COMMON, num_experts=E, moe_intermediate_size=I, intermediate_size=48,
                            shared_expert_intermediate_size=40, decoder_sparse_step=1,
                            architectures=["Qwen2MoeForCausalLM"])


def _gpt_oss():
    return T.GptOssConfig(**_COMMON, num_local_experts=E, intermediate_size=I, sliding_window=16,
                          layer_types=["sliding_attention", "full_attention"],
                          architectures=["GptOssForCausalLM"])


def _mixtral():
    return T.MixtralConfig(**_COMMON, num_local_experts=E, intermediate_size=I,
                           architectures=["MixtralForCausalLM"])


def _olmoe():
    return T.OlmoeConfig(**_COMMON, num_experts=E, intermediate_size=I, eos_token_id=1, pad_token_id=0,
                         architectures=["OlmoeForCausalLM"])


def _deepseek_v3():
    kw = {**_COMMON, "num_key_value_heads": 4}
    return T.DeepseekV3Config(**kw, n_routed_experts=E, moe_intermediate_size=I, intermediate_size=48,
                              n_shared_experts=1, first_k_dense_replace=0, n_group=1, topk_group=1,
                              q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                              v_head_dim=8, architectures=["DeepseekV3ForCausalLM"])


def _glm4_moe():
    return T.Glm4MoeConfig(**_COMMON, n_routed_experts=E, moe_intermediate_size=I, intermediate_size=48,
                           n_shared_experts=1, first_k_dense_replace=0, n_group=1, topk_group=1,
                           architectures=["Glm4MoeForCausalLM"])


def _llama4():
    return T.Llama4TextConfig(**_COMMON, num_local_experts=E, intermediate_size=I, intermediate_size_mlp=48,
                              interleave_moe_layer_step=1, architectures=["Llama4ForCausalLM"])


def _qwen3_next():
    return T.Qwen3NextConfig(**_COMMON, **_LINEAR_ATTN, num_experts=E, moe_intermediate_size=I,
                             intermediate_size=48, shared_expert_intermediate_size=40, decoder_sparse_step=1,
                             architectures=["Qwen3NextForCausalLM"])


def _qwen3_5_moe():
    text = dict(**_COMMON, **_LINEAR_ATTN, num_experts=E, moe_intermediate_size=I,
                shared_expert_intermediate_size=40)
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=H,
                  num_position_embeddings=16)
    return T.Qwen3_5MoeConfig(text_config=text, vision_config=vision,
                              architectures=["Qwen3_5MoeForConditionalGeneration"])


FAMILIES: dict[str, Callable[[], T.PretrainedConfig]] = {
    "qwen3_moe": _qwen3_moe, "gpt_oss": _gpt_oss, "mixtral": _mixtral, "olmoe": _olmoe,
    "qwen2_moe": _qwen2_moe, "deepseek_v3": _deepseek_v3, "glm4_moe": _glm4_moe, "llama4": _llama4,
    "qwen3_next": _qwen3_next, "qwen3_5_moe": _qwen3_5_moe,
}

# Per-family facts (transformers 5.24.0).
LAYERS_PREFIX = {"qwen3_5_moe": "model.language_model.layers"}  # default "model.layers"
MLP_ATTR = {"llama4": "feed_forward"}  # default "mlp"
STORED_IN_OUT = {"gpt_oss", "llama4"}  # experts params are [E, in, out]; others [E, out, in]
INTERLEAVED_GATE_UP = {"gpt_oss"}  # gate = even rows of 2I, up = odd; others gate = [0, I)
MODEL_TYPE_TO_FAMILY = {"llama4_text": "llama4"}  # config.model_type -> family when they differ

# Families whose 4.x per-expert adapters PEFT 0.21.2 converts on load (to 3D, gate_up rank 2r, alpha 2x).
# Not converted: qwen2_moe (its own model_type is missing from transformers' _MODEL_TO_CONVERSION_PATTERN,
# so the expert LoRAs are silently dropped), qwen3_5_moe (top-level model_type has no mapping),
# llama4 and gpt_oss (already fused in 4.x; no mapping).
V4_CONVERTIBLE = {"qwen3_moe", "mixtral", "olmoe", "deepseek_v3", "glm4_moe", "qwen3_next"}

# 4.x per-expert names (2D adapters): (module under the layer, gate, up, down)
V4_EXPERT_NAMES = {"mixtral": ("block_sparse_moe", "w1", "w3", "w2")}  # default ("mlp", gate/up/down_proj)


def family_of(model) -> str:
    """Family name of a (PEFT-wrapped or bare) tiny model, from its config.model_type."""
    mt = _base(model).config.model_type
    return MODEL_TYPE_TO_FAMILY.get(mt, mt)


def experts_path(family: str, layer: int) -> str:
    """Module path of the fused experts of `layer` in the bare transformers model."""
    return f"{LAYERS_PREFIX.get(family, 'model.layers')}.{layer}.{MLP_ATTR.get(family, 'mlp')}.experts"


def make_model(family: str, seed: int = 0):
    """Build a tiny random float32 eval model for `family` -> (model, config).

    The experts use the "eager" implementation (per-expert loop, deterministic on CPU).
    """
    config = FAMILIES[family]()
    torch.manual_seed(seed)
    auto = T.AutoModelForImageTextToText if family == "qwen3_5_moe" else T.AutoModelForCausalLM
    model = auto.from_config(config).float().eval()
    model.set_experts_implementation("eager")
    _randomize_experts(model, seed)
    return model, model.config


@torch.no_grad()
def _randomize_experts(model, seed: int, std: float = 0.2) -> None:
    """Give the fused expert params O(1)-output random values (HF init std 0.02 is too small)."""
    gen = torch.Generator().manual_seed(seed + 1000)
    for name, p in model.named_parameters():
        if ".experts." in name:
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def _base(model):
    """The bare transformers model under a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _randomize_lora(peft_model, seed: int, std: float = 0.2) -> None:
    """Overwrite every lora_A / lora_B weight with seeded normal values (B non-zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def make_3d_adapter(model, out_dir, targets=("gate_up_proj", "down_proj"), r=R_DEFAULT, alpha=8,
                    use_rslora=False, seed=0, extra_target_modules=(), rank_pattern=None,
                    alpha_pattern=None):
    """Save a real PEFT `target_parameters` adapter for `model` into `out_dir`; return the PeftModel.

    The model is deep-copied, so `model` stays bare. `extra_target_modules` (e.g. ("q_proj",))
    adds ordinary nn.Linear LoRAs (non-expert tensors that must pass through relayout).
    """
    from peft import LoraConfig, get_peft_model

    family = family_of(model)
    suffix = f"{MLP_ATTR.get(family, 'mlp')}.experts"
    cfg = LoraConfig(r=r, lora_alpha=alpha, use_rslora=use_rslora, init_lora_weights=False,
                     target_modules=list(extra_target_modules),
                     target_parameters=[f"{suffix}.{t}" for t in targets],
                     rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {})
    peft_model = get_peft_model(copy.deepcopy(model), cfg)
    _randomize_lora(peft_model, seed)
    peft_model.eval()
    peft_model.save_pretrained(str(out_dir))
    return peft_model


def make_2d_adapter(model, out_dir, r=R_DEFAULT, alpha=8, use_rslora=False, seed=0, std=0.2,
                    peft_version=None):
    """Write a transformers-4.x-style per-expert ("2D") adapter folder for `model`.

    Keys: ``base_model.model.<layers>.{l}.mlp.experts.{e}.{gate,up,down}_proj.lora_{A,B}.weight``
    (Mixtral: ``block_sparse_moe.experts.{e}.w1|w3|w2``), target_modules = the three projection
    names. Returns {(layer, "gate"|"up"|"down"): (A [E, r, in], B [E, out, r])} (the 2D factors
    stacked over experts, model [out, in] orientation). Load it with `load_adapter`.
    """
    from peft import LoraConfig

    family = family_of(model)
    mlp, *names = V4_EXPERT_NAMES.get(family, ("mlp", "gate_proj", "up_proj", "down_proj"))
    prefix = LAYERS_PREFIX.get(family, "model.layers")
    base = _base(model)
    n_layers = base.config.get_text_config().num_hidden_layers
    gen = torch.Generator().manual_seed(seed)
    dims = {"gate": (I, H), "up": (I, H), "down": (H, I)}
    tensors, factors = {}, {}
    for layer in range(n_layers):
        for role, name in zip(("gate", "up", "down"), names):
            out_f, in_f = dims[role]
            A = torch.randn(E, r, in_f, generator=gen) * std
            B = torch.randn(E, out_f, r, generator=gen) * std
            factors[(layer, role)] = (A, B)
            for e in range(E):
                key = f"base_model.model.{prefix}.{layer}.{mlp}.experts.{e}.{name}"
                tensors[f"{key}.lora_A.weight"] = A[e].contiguous()
                tensors[f"{key}.lora_B.weight"] = B[e].contiguous()
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"))
    cfg = LoraConfig(r=r, lora_alpha=alpha, use_rslora=use_rslora, target_modules=list(names))
    cfg.save_pretrained(str(out_dir))
    if peft_version is not None:  # e.g. "0.17.1" to mimic an adapter trained under transformers 4.x
        path = os.path.join(out_dir, "adapter_config.json")
        with open(path) as f:
            data = json.load(f)
        data["peft_version"] = peft_version
        with open(path, "w") as f:
            json.dump(data, f, indent=2)
    return factors


def load_adapter(model, adapter_dir):
    """Load an adapter folder onto a deep copy of `model` via `PeftModel.from_pretrained` (eval)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(model), str(adapter_dir)).eval()


def fixed_routing(n_tokens: int, n_experts: int = E, top_k: int = 2, seed: int = 0):
    """Deterministic routing: (topk_ids [T, k] long, distinct per row; topk_weights [T, k] summing to 1)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(n_experts, generator=gen)[:top_k] for _ in range(n_tokens)])
    weights = torch.softmax(torch.randn(n_tokens, top_k, generator=gen), dim=-1)
    return ids, weights


def experts_module(model, layer: int):
    """The experts module of `layer` (outermost PEFT ParamWrapper when an adapter is attached)."""
    return _base(model).get_submodule(experts_path(family_of(model), layer))


@torch.no_grad()
def moe_block_output(model, layer: int, x: torch.Tensor, topk_ids=None, topk_weights=None):
    """Routed-experts output [T, H] of `layer` for hidden states x [T, H] with fixed routing.

    Calls the (possibly PEFT-wrapped) experts module, so the active adapter applies. Routing
    defaults to `fixed_routing`. Most families: ``experts(x, topk_ids, topk_weights)`` and
    out = sum_k w_k * expert(x). Llama4 differs: its experts take the input already scaled
    by the router score (``experts(x.repeat(E,1) * score)``, summed over experts), i.e. the
    routing weight multiplies the expert *input*, not its output.
    """
    if topk_ids is None:
        topk_ids, topk_weights = fixed_routing(x.shape[0], seed=1)
    experts = experts_module(model, layer)
    if family_of(model) != "llama4":
        return experts(x, topk_ids, topk_weights)
    scores = torch.zeros(x.shape[0], E, dtype=x.dtype).scatter_(1, topk_ids, topk_weights.to(x.dtype))
    routed_in = x.repeat(E, 1) * scores.transpose(0, 1).reshape(-1, 1)
    return experts(routed_in).reshape(E, x.shape[0], -1).sum(0)


def _to_out_in(family: str, t: torch.Tensor) -> torch.Tensor:
    """Stored expert tensor [E, d1, d2] -> model orientation [E, out, in]."""
    return t.transpose(-2, -1) if family in STORED_IN_OUT else t


def split_gate_up(family: str, gate_up_out_in: torch.Tensor):
    """Split [E, 2I, H] into (gate [E, I, H], up [E, I, H]) per the family's layout."""
    if family in INTERLEAVED_GATE_UP:
        return gate_up_out_in[:, 0::2], gate_up_out_in[:, 1::2]
    return gate_up_out_in.chunk(2, dim=1)


def join_gate_up(family: str, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Inverse of `split_gate_up`: (gate, up) [E, I, H] -> [E, 2I, H]."""
    if family in INTERLEAVED_GATE_UP:
        return torch.stack([gate, up], dim=2).flatten(1, 2)
    return torch.cat([gate, up], dim=1)


def _by_role(family: str, tensors: dict) -> dict:
    """{"gate_up_proj": .., "down_proj": ..} stored tensors -> {"gate","up","down"} [E, out, in]."""
    out = {}
    if "gate_up_proj" in tensors:
        out["gate"], out["up"] = split_gate_up(family, _to_out_in(family, tensors["gate_up_proj"]))
    if "down_proj" in tensors:
        out["down"] = _to_out_in(family, tensors["down_proj"])
    return out


@torch.no_grad()
def expert_weights(model, layer: int) -> dict:
    """Base expert weights of `layer`: {"gate","up","down"} -> [E, out, in] (no LoRA applied)."""
    family = family_of(model)
    base = experts_module(model, layer)
    while hasattr(base, "base_layer"):
        base = base.base_layer
    return _by_role(family, {n: getattr(base, n).detach().clone() for n in ("gate_up_proj", "down_proj")})


def param_wrappers(model, layer: int) -> dict:
    """{parameter_name: ParamWrapper} for the experts of `layer` (outer wrapper first in nesting)."""
    mod, found = experts_module(model, layer), {}
    while hasattr(mod, "parameter_name"):
        found[mod.parameter_name] = mod
        mod = mod.base_layer
    return found


@torch.no_grad()
def per_expert_deltas_from_peft(peft_model, layer: int, adapter: str = "default") -> dict:
    """PEFT's own effective deltas for `layer`: {"gate","up","down"} -> ΔW [E, out, in].

    Uses ParamWrapper.get_delta_weight (what PEFT adds to the stored parameter, incl. scaling),
    then maps the stored layout to [E, out, in] and splits gate/up per family.
    """
    family = family_of(peft_model)
    deltas = {n: w.get_delta_weight(adapter) for n, w in param_wrappers(peft_model, layer).items()}
    return _by_role(family, deltas)


def deltas_from_3d_tensors(family: str, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                           param: str) -> dict:
    """formats.md formula on saved 3D tensors (PEFT >= 0.19.1 orientation) -> role deltas [E, out, in].

    A_e = A.reshape(E, r, in)[e], B_e = B.reshape(out, r, E)[:, :, e], ΔW_e = scale * B_e @ A_e,
    where PEFT's (in, out) is the model's real (in, out) unless the family stores [E, in, out]
    without the is_transposed mark (Llama4), in which case PEFT's in/out are swapped.
    """
    r = lora_a.shape[0] // E
    a = lora_a.reshape(E, r, lora_a.shape[1])
    b = lora_b.reshape(lora_b.shape[0], r, E).permute(2, 0, 1)
    delta_peft = scale * b @ a  # [E, peft_out, peft_in]
    # GPT-OSS: is_transposed=True -> no swap -> peft_in = d1 = real in -> delta_peft is [E, out, in].
    # Llama4: unmarked -> swap -> peft (in, out) = (d2, d1) -> delta_peft == stored [E, in, out].
    stored = delta_peft.transpose(-2, -1) if family == "gpt_oss" else delta_peft
    return _by_role(family, {param: stored})


@torch.no_grad()
def merged_copy(model, layer: int, deltas: dict):
    """Deep copy of bare `model` with role deltas {"gate","up","down"} [E, out, in] added to `layer`.

    Lets a test check any relayout output against the model's own forward.
    """
    family = family_of(model)
    new = copy.deepcopy(_base(model))
    exp = new.get_submodule(experts_path(family, layer))
    w = expert_weights(new, layer)
    for role, d in deltas.items():
        w[role] = w[role] + d
    gate_up = join_gate_up(family, w["gate"], w["up"])
    stored = {"gate_up_proj": gate_up, "down_proj": w["down"]}
    for name, t in stored.items():
        getattr(exp, name).copy_(t.transpose(-2, -1) if family in STORED_IN_OUT else t)
    return new


@torch.no_grad()
def reference_moe_output(model, layer: int, x, topk_ids, topk_weights, deltas=None):
    """formats.md section 4 computed from per-expert [E, out, in] weights (+ optional role deltas).

    Independent of the model's fused layout, so it checks `expert_weights`' gate/up split against
    the model's own forward. GPT-OSS: biases + clamped SwiGLU ``(up + 1) * g * sigmoid(alpha g)``;
    Llama4: routing weight scales the expert input; others: act(g) * u, weight scales output.
    """
    family = family_of(model)
    w = expert_weights(model, layer)
    for role, d in (deltas or {}).items():
        w[role] = w[role] + d
    wg, wu, wd = (w[k][topk_ids] for k in ("gate", "up", "down"))  # [T, k, out, in]
    kw = topk_weights[..., None].to(x.dtype)
    xin = x[:, None, :] * (kw if family == "llama4" else 1)
    g = torch.einsum("tkoi,tki->tko", wg, xin)
    u = torch.einsum("tkoi,tki->tko", wu, xin)
    base = experts_module(model, layer)
    while hasattr(base, "base_layer"):
        base = base.base_layer
    if family == "gpt_oss":
        b = base.gate_up_proj_bias[topk_ids]
        g, u = g + b[..., 0::2], u + b[..., 1::2]
        g, u = g.clamp(max=base.limit), u.clamp(-base.limit, base.limit)
        h = (u + 1) * g * torch.sigmoid(g * base.alpha)
        y = torch.einsum("tkoi,tki->tko", wd, h) + base.down_proj_bias[topk_ids]
    else:
        h = base.act_fn(g) * u
        y = torch.einsum("tkoi,tki->tko", wd, h)
    return (y if family == "llama4" else y * kw).sum(1)
