"""relayout convert against PEFT itself: real tiny MoE models, real PEFT 0.21.2 adapters, PEFT loading the results.

Each check compares what PEFT does with relayout's output to what PEFT does with the original adapter
(per-expert deltas via ParamWrapper.get_delta_weight, and the routed-experts output with fixed routing),
or to the 2D factors a 2D adapter was built from. Conversions run both through the CLI in-process
(`relayout.cli.main`) and through the Python API (`relayout.convert`, `relayout.load_adapter`).
"""
import json
import math
import re
from types import SimpleNamespace

import pytest
import torch
from peft.utils.other import get_pattern_key
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import relayout
import tiny_moe as tm
from relayout.cli import main
from tiny_moe import E, H, I

pytestmark = pytest.mark.filterwarnings("ignore")

R, ALPHA = 4, 8
LAYERS = (0, 1)
TOL = dict(rtol=1e-5, atol=1e-6)  # float32; deltas and outputs are O(1)
FAMILIES = ["qwen3_moe", "gpt_oss", "mixtral", "llama4", "olmoe", "deepseek_v3"]
ALL_FAMILIES = sorted(tm.FAMILIES)  # + qwen2_moe, glm4_moe, qwen3_next, qwen3_5_moe (model.language_model prefix)
ATTN = {"deepseek_v3": "q_b_proj"}  # an attention nn.Linear each family has (default q_proj)
ROLES = ("gate", "up", "down")
# 3D adapter variants: which fused parameters PEFT targets, and whether an attention LoRA rides along
VARIANTS = {
    "both+attn": (("gate_up_proj", "down_proj"), True),
    "down": (("down_proj",), False),
    "gate_up": (("gate_up_proj",), False),
}
CASES = [(f, "both+attn") for f in ALL_FAMILIES] + [(f, "down") for f in FAMILIES] + \
        [("qwen3_moe", "gate_up"), ("gpt_oss", "gate_up"), ("llama4", "gate_up")]


# ---------------------------------------------------------------- shared builders (module-scoped caches)

@pytest.fixture(scope="module")
def model():
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = tm.make_model(family, seed=sorted(tm.FAMILIES).index(family))[0]
        return cache[family]
    return get


@pytest.fixture(scope="module")
def routing():
    x = torch.randn(9, H, generator=torch.Generator().manual_seed(7))
    ids, weights = tm.fixed_routing(9, seed=5)
    return x, ids, weights


@pytest.fixture(scope="module")
def converted3d(model, tmp_path_factory):
    """(family, variant) -> original 3D adapter from PEFT, its peft-2d (CLI) and peft-3d-again (API) conversions."""
    cache = {}

    def get(family, variant):
        if (family, variant) in cache:
            return cache[family, variant]
        targets, attn = VARIANTS[variant]
        root = tmp_path_factory.mktemp(f"{family}-{variant}")
        src, d2, d3 = root / "src3d", root / "peft2d", root / "peft3d"
        pm = tm.make_3d_adapter(model(family), src, targets=targets, r=R, alpha=ALPHA, seed=11,
                                extra_target_modules=(ATTN.get(family, "q_proj"),) if attn else ())
        assert main(["convert", str(src), str(d2), "--to", "peft-2d", "--arch", family, "-q"]) == 0
        relayout.convert(relayout.load_adapter(d2, arch=family), d3, to="peft-3d")
        cache[family, variant] = SimpleNamespace(family=family, pm=pm, src=src, d2=d2, d3=d3, targets=targets,
                                                 roles=_roles(targets))
        return cache[family, variant]
    return get


def _roles(targets):
    return tuple(r for t in targets for r in (("gate", "up") if t == "gate_up_proj" else ("down",)))


def _tensors(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def _config(folder):
    return json.loads((folder / "adapter_config.json").read_text())


def _peft_deltas(pm):
    return {layer: tm.per_expert_deltas_from_peft(pm, layer) for layer in LAYERS}


def _assert_deltas_equal(got, want, roles):
    for layer in LAYERS:
        assert set(got[layer]) == set(roles) and set(want[layer]) == set(roles)
        for role in roles:
            torch.testing.assert_close(got[layer][role], want[layer][role], **TOL, msg=f"layer {layer} {role}")


def _assert_outputs_equal(pm_got, pm_want, bare, routing):
    """Same routed-experts output in every layer, and the adapter really changes it (so the check can fail)."""
    x, ids, w = routing
    for layer in LAYERS:
        want = tm.moe_block_output(pm_want, layer, x, ids, w)
        torch.testing.assert_close(tm.moe_block_output(pm_got, layer, x, ids, w), want, **TOL)
        assert not torch.allclose(tm.moe_block_output(bare, layer, x, ids, w), want, atol=1e-3)


# 2D (per-expert) names, as transformers 4.x models / PEFT's 4.x->5.x converter know them
def _key_2d(family, layer, expert, role):
    mlp, *names = tm.V4_EXPERT_NAMES.get(family, (tm.MLP_ATTR.get(family, "mlp"), "gate_proj", "up_proj",
                                                   "down_proj"))
    name = names[ROLES.index(role)]
    return f"{tm.LAYERS_PREFIX.get(family, 'model.layers')}.{layer}.{mlp}.experts.{expert}.{name}"


def _peft_scale(config, module):
    """PEFT's scale for a module from an adapter_config.json (its own pattern matcher)."""
    rank = config["r"]
    if config.get("rank_pattern"):
        rank = config["rank_pattern"].get(get_pattern_key(config["rank_pattern"], module), rank)
    alpha = config["lora_alpha"]
    if config.get("alpha_pattern"):
        alpha = config["alpha_pattern"].get(get_pattern_key(config["alpha_pattern"], module), alpha)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def deltas_from_2d(folder, family, roles=ROLES):
    """Slow reference: per expert, ΔW_e = scale · B_e @ A_e from a 2D folder read with safetensors."""
    sd, cfg = _tensors(folder), _config(folder)
    out = {}
    for layer in LAYERS:
        out[layer] = {}
        for role in roles:
            per_expert = []
            for e in range(E):
                module = _key_2d(family, layer, e, role)
                a = sd[f"base_model.model.{module}.lora_A.weight"]
                b = sd[f"base_model.model.{module}.lora_B.weight"]
                per_expert.append(_peft_scale(cfg, module) * b @ a)
            out[layer][role] = torch.stack(per_expert)
    return out


# ---------------------------------------------------------------- 3D (from PEFT) -> peft-2d -> peft-3d

@pytest.mark.parametrize("family,variant", CASES)
def test_3d_to_2d_to_3d_is_identical(converted3d, family, variant):
    c = converted3d(family, variant)
    src, back = _tensors(c.src), _tensors(c.d3)
    assert sorted(back) == sorted(src)
    for key in src:
        assert back[key].dtype == src[key].dtype and torch.equal(back[key], src[key]), key
    cfg_src, cfg_back = _config(c.src), _config(c.d3)
    assert set(cfg_back["target_parameters"]) == set(cfg_src["target_parameters"])
    assert (cfg_back["r"], cfg_back["lora_alpha"], cfg_back["use_rslora"]) == (R, ALPHA, False)
    assert set(cfg_back["target_modules"] or []) == set(cfg_src["target_modules"] or [])


@pytest.mark.parametrize("family,variant", CASES)
def test_peft_loads_peft3d_result_same_deltas_and_outputs(converted3d, model, routing, family, variant):
    c = converted3d(family, variant)
    loaded = tm.load_adapter(model(family), c.d3)
    _assert_deltas_equal(_peft_deltas(loaded), _peft_deltas(c.pm), c.roles)
    _assert_outputs_equal(loaded, c.pm, model(family), routing)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_attention_lora_passes_through_and_peft_applies_it(converted3d, model, family):
    """The q_proj LoRA is copied bit-exactly into peft-2d, and the whole model (attention + experts) agrees."""
    c = converted3d(family, "both+attn")
    attn = ATTN.get(family, "q_proj")
    src, two = _tensors(c.src), _tensors(c.d2)
    passthrough = [k for k in src if f".{attn}.lora_" in k]
    assert len(passthrough) >= 2  # hybrid-attention families have q_proj in their full-attention layer only
    for key in passthrough:
        assert torch.equal(two[key], src[key]), key
    assert attn in _config(c.d2)["target_modules"]
    loaded = tm.load_adapter(model(family), c.d3)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, got = c.pm(input_ids=ids).logits, loaded(input_ids=ids).logits
        bare = model(family)(input_ids=ids).logits
    torch.testing.assert_close(got, want, **TOL)
    assert not torch.allclose(bare, want, atol=1e-3)


@pytest.mark.parametrize("family,variant", CASES)
def test_peft2d_per_expert_deltas_equal_peft(converted3d, family, variant):
    c = converted3d(family, variant)
    sd = _tensors(c.d2)
    expert_keys = {k for k in sd if ".experts." in k}
    assert len(expert_keys) == len(LAYERS) * E * 2 * len(c.roles)  # one A and one B per expert projection
    assert all(re.search(r"\.experts\.\d+\.", k) for k in expert_keys)
    cfg = _config(c.d2)
    names = tm.V4_EXPERT_NAMES.get(family, ("mlp", "gate_proj", "up_proj", "down_proj"))[1:]
    assert {names[ROLES.index(r)] for r in c.roles} <= set(cfg["target_modules"])
    assert not cfg.get("target_parameters")
    _assert_deltas_equal(deltas_from_2d(c.d2, family, c.roles), _peft_deltas(c.pm), c.roles)


@pytest.mark.parametrize("family", sorted(tm.V4_CONVERTIBLE))
@pytest.mark.parametrize("variant", ["both+attn", "down"])
def test_peft_loads_peft2d_result_via_its_4x_conversion(converted3d, model, routing, family, variant):
    """PEFT's own 4.x->5.x conversion of relayout's peft-2d output behaves like the original 3D adapter."""
    c = converted3d(family, variant)
    loaded = tm.load_adapter(model(family), c.d2)
    assert tm.param_wrappers(loaded, 0)  # the expert LoRAs were converted, not dropped
    got = _peft_deltas(loaded)
    for layer in LAYERS:  # PEFT's converter also wraps gate_up of a down-only adapter (freshly initialized)
        for role in set(got[layer]) - set(c.roles):
            del got[layer][role]
    _assert_deltas_equal(got, _peft_deltas(c.pm), c.roles)
    if variant != "down":
        _assert_outputs_equal(loaded, c.pm, model(family), routing)


# ---------------------------------------------------------------- 2D-born adapters -> peft-3d

def make_2d(model, family, folder, *, shared=False, use_rslora=False, seed=3):
    """A 2D adapter for `family` (tm.make_2d_adapter); `shared`: gate and up use one lora_A (Megatron style).

    Returns the deltas {layer: {role: [E, out, in]}} the adapter means (scale · B @ A per expert).
    """
    factors = tm.make_2d_adapter(model, folder, r=R, alpha=ALPHA, use_rslora=use_rslora, seed=seed)
    sd = _tensors(folder)
    if family == "llama4":  # its experts live under feed_forward, not the 4.x default mlp
        sd = {k.replace(".mlp.experts.", ".feed_forward.experts."): v for k, v in sd.items()}
    if shared:
        for layer in LAYERS:
            a_gate, b_up = factors[(layer, "gate")][0], factors[(layer, "up")][1]
            factors[(layer, "up")] = (a_gate, b_up)
            for e in range(E):
                sd[f"base_model.model.{_key_2d(family, layer, e, 'up')}.lora_A.weight"] = a_gate[e].clone()
    save_file(sd, str(folder / "adapter_model.safetensors"))
    scale = ALPHA / math.sqrt(R) if use_rslora else ALPHA / R
    return {layer: {role: scale * factors[(layer, role)][1] @ factors[(layer, role)][0] for role in ROLES}
            for layer in LAYERS}


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "mixtral", "llama4", "olmoe"])
@pytest.mark.parametrize("shared", [False, True], ids=["separate-A", "shared-A"])
def test_2d_born_adapter_to_peft3d_loads_in_peft(model, routing, tmp_path, family, shared):
    m = model(family)
    deltas = make_2d(m, family, tmp_path / "src", shared=shared)
    if family == "mixtral":  # 4.x names are unique to Mixtral: the keys alone decide
        assert main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--to", "peft-3d", "-q"]) == 0
    else:
        relayout.convert(tmp_path / "src", tmp_path / "out", to="peft-3d", arch=family)
    loaded = tm.load_adapter(m, tmp_path / "out")
    gate_up = tm.param_wrappers(loaded, 0)["gate_up_proj"]
    # separate A: gate and up joined at rank 2r with a block-diagonal B; shared A: rank r
    assert gate_up.r["default"] == (R if shared else 2 * R)
    assert gate_up.scaling["default"] == pytest.approx(ALPHA / R)
    assert tm.param_wrappers(loaded, 0)["down_proj"].r["default"] == R
    _assert_deltas_equal(_peft_deltas(loaded), deltas, ROLES)
    x, ids, w = routing
    for layer in LAYERS:
        got = tm.moe_block_output(loaded, layer, x, ids, w)
        torch.testing.assert_close(got, tm.reference_moe_output(m, layer, x, ids, w, deltas[layer]), **TOL)
        merged = tm.merged_copy(m, layer, deltas[layer])
        torch.testing.assert_close(got, tm.moe_block_output(merged, layer, x, ids, w), **TOL)
        assert not torch.allclose(got, tm.moe_block_output(m, layer, x, ids, w), atol=1e-3)


def test_shared_a_result_is_plain_peft3d_rank_r(model, tmp_path):
    """A Megatron-style adapter (one A for gate and up) is written without doubling: lora_A is [E·r, H]."""
    make_2d(model("qwen3_moe"), "qwen3_moe", tmp_path / "src", shared=True)
    relayout.convert(tmp_path / "src", tmp_path / "out", to="peft-3d", arch="qwen3_moe")
    sd = _tensors(tmp_path / "out")
    assert sd["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"].shape == (E * R, H)
    assert sd["base_model.model.model.layers.0.mlp.experts.base_layer.lora_B.weight"].shape == (2 * I, R * E)


# ---------------------------------------------------------------- rsLoRA and rank/alpha patterns

@pytest.mark.parametrize("family", ["qwen3_moe", "llama4"])
def test_rslora_2d_to_3d_to_2d_keeps_scales_and_tensors(model, routing, tmp_path, family):
    """rsLoRA 2D -> peft-3d (gate_up at 2r: alpha must grow by sqrt(2), not 2) -> peft-2d: same tensors, scales."""
    m = model(family)
    deltas = make_2d(m, family, tmp_path / "src", use_rslora=True)
    relayout.convert(tmp_path / "src", tmp_path / "3d", to="peft-3d", arch=family)
    loaded = tm.load_adapter(m, tmp_path / "3d")
    assert tm.param_wrappers(loaded, 0)["gate_up_proj"].scaling["default"] == pytest.approx(ALPHA / math.sqrt(R))
    _assert_deltas_equal(_peft_deltas(loaded), deltas, ROLES)
    relayout.convert(tmp_path / "3d", tmp_path / "2d", to="peft-2d", arch=family)
    src, back = _tensors(tmp_path / "src"), _tensors(tmp_path / "2d")
    assert sorted(back) == sorted(src)
    assert all(torch.equal(back[k], src[k]) for k in src)
    _assert_deltas_equal(deltas_from_2d(tmp_path / "2d", family), deltas, ROLES)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_rank_and_alpha_patterns_round_trip(model, routing, tmp_path, family):
    """rsLoRA 3D adapter with rank_pattern (gate_up r=6) and a layer-1 alpha_pattern: scales survive 3D->2D->3D."""
    m = model(family)
    pm = tm.make_3d_adapter(m, tmp_path / "src", r=R, alpha=ALPHA, use_rslora=True, seed=5,
                            rank_pattern={"gate_up_proj": 6},
                            alpha_pattern={r"layers\.1\.mlp\.experts\.down_proj": 3})
    assert tm.param_wrappers(pm, 1)["down_proj"].scaling["default"] == pytest.approx(3 / math.sqrt(R))
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "2d"), "--to", "peft-2d", "--arch", family,
                 "-q"]) == 0
    _assert_deltas_equal(deltas_from_2d(tmp_path / "2d", family), _peft_deltas(pm), ROLES)
    relayout.convert(tmp_path / "2d", tmp_path / "3d", to="peft-3d", arch=family)
    src, back = _tensors(tmp_path / "src"), _tensors(tmp_path / "3d")
    assert sorted(back) == sorted(src) and all(torch.equal(back[k], src[k]) for k in src)
    loaded = tm.load_adapter(m, tmp_path / "3d")
    _assert_deltas_equal(_peft_deltas(loaded), _peft_deltas(pm), ROLES)
    _assert_outputs_equal(loaded, pm, m, routing)


# ---------------------------------------------------------------- PEFT's own blockdiag conversion -> peft-2d

@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_peft_converted_blockdiag_splits_back_exactly(model, tmp_path, family, use_rslora):
    """PEFT loads a 4.x adapter (gate_up rank 2r, block-diagonal B) and saves it; relayout splits it back."""
    m = model(family)
    make_2d(m, family, tmp_path / "src", use_rslora=use_rslora)
    pm = tm.load_adapter(m, tmp_path / "src")
    pm.save_pretrained(str(tmp_path / "blockdiag"))
    assert _tensors(tmp_path / "blockdiag")[
        "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"].shape == (E * 2 * R, H)
    relayout.convert(tmp_path / "blockdiag", tmp_path / "2d", to="peft-2d", arch=family)
    src, back = _tensors(tmp_path / "src"), _tensors(tmp_path / "2d")
    assert sorted(back) == sorted(src) and all(torch.equal(back[k], src[k]) for k in src)
    # the scale is what PEFT applies to the blockdiag adapter (sqrt(2) too large for gate/up under rsLoRA)
    _assert_deltas_equal(deltas_from_2d(tmp_path / "2d", family), _peft_deltas(pm), ROLES)


# ---------------------------------------------------------------- normalized output

@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "llama4", "mixtral"])
def test_normalized_deltas_and_metadata(converted3d, tmp_path, family):
    c = converted3d(family, "both+attn")
    out = relayout.convert(c.src, tmp_path / "norm.safetensors", to="normalized", arch=family)
    sd = load_file(str(out))
    with safe_open(str(out), "pt") as f:
        meta = json.loads(f.metadata()["relayout"])
    for field in ("format", "version", "architecture", "rule", "num_experts", "hidden_size", "intermediate_size",
                  "layers", "source_layouts", "scaling", "rank", "passthrough"):
        assert field in meta, field
    assert (meta["format"], meta["num_experts"], meta["hidden_size"], meta["intermediate_size"]) == \
        ("relayout-normalized", E, H, I)
    assert meta["layers"] == list(LAYERS) and meta["rule"] == family
    assert set(meta["source_layouts"].values()) == {"peft-3d-swapped" if family == "llama4" else "peft-3d"}
    shapes = {"w1": ((E, R, H), (E, I, R)), "w3": ((E, R, H), (E, I, R)), "w2": ((E, R, I), (E, H, R))}
    deltas = {}
    for layer in LAYERS:
        deltas[layer] = {}
        for proj, role in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
            a, b = sd[f"layers.{layer}.{proj}.lora_a"], sd[f"layers.{layer}.{proj}.lora_b"]
            assert (tuple(a.shape), tuple(b.shape)) == shapes[proj]
            assert meta["rank"][f"layers.{layer}.{proj}"] == R
            deltas[layer][role] = meta["scaling"][f"layers.{layer}.{proj}"] * b @ a
    _assert_deltas_equal(deltas, _peft_deltas(c.pm), ROLES)
    src = _tensors(c.src)
    assert sorted(meta["passthrough"]) == sorted(k for k in src if ".experts." not in k)
    for key in meta["passthrough"]:
        assert torch.equal(sd[f"passthrough.{key}"], src[key])


def test_normalized_into_a_folder_from_2d_source(model, tmp_path):
    deltas = make_2d(model("olmoe"), "olmoe", tmp_path / "src")
    out = relayout.convert(relayout.load_adapter(tmp_path / "src", arch="olmoe"), tmp_path / "norm", to="normalized")
    path = out / "adapter_normalized.safetensors"
    sd = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["relayout"])
    assert set(meta["source_layouts"].values()) == {"peft-2d"}
    for layer in LAYERS:
        for proj, role in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
            got = meta["scaling"][f"layers.{layer}.{proj}"] * sd[f"layers.{layer}.{proj}.lora_b"] @ \
                sd[f"layers.{layer}.{proj}.lora_a"]
            torch.testing.assert_close(got, deltas[layer][role], **TOL)


# ---------------------------------------------------------------- progress bar

def test_progress_bar_only_when_asked(converted3d, tmp_path, capsys):
    c = converted3d("qwen3_moe", "down")
    relayout.convert(c.src, tmp_path / "quiet", to="peft-2d", arch="qwen3_moe", progress=False)
    quiet = capsys.readouterr()
    assert quiet.err == "" and quiet.out == ""
    relayout.convert(c.src, tmp_path / "bar", to="peft-2d", arch="qwen3_moe", progress=True)
    err = capsys.readouterr().err
    assert f"{len(LAYERS)}/{len(LAYERS)}" in err and "#" in err and err.endswith("\n")
    assert _tensors(tmp_path / "bar").keys() == _tensors(tmp_path / "quiet").keys()


def test_cli_without_terminal_prints_no_bar_and_leaves_input_unchanged(converted3d, tmp_path, capsys):
    c = converted3d("gpt_oss", "both+attn")
    before = {p.name: p.read_bytes() for p in c.src.iterdir()}
    for fmt in ("peft-2d", "peft-3d", "normalized"):
        assert main(["convert", str(c.src), str(tmp_path / fmt), "--to", fmt, "--arch", "gpt_oss"]) == 0
        captured = capsys.readouterr()
        assert all(line.startswith("note: ") for line in captured.err.splitlines()), captured.err  # no bar
        assert captured.out == f"ok -- wrote {fmt} adapter to {tmp_path / fmt}\n"
    assert {p.name: p.read_bytes() for p in c.src.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["normalized", "peft-2d", "peft-3d"]


# ---------------------------------------------------------------- sharded input, output dtype

def test_sharded_input_converts_like_the_single_file(converted3d, tmp_path):
    c = converted3d("mixtral", "both+attn")
    sd = _tensors(c.src)
    keys = sorted(sd)
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "adapter_config.json").write_text((c.src / "adapter_config.json").read_text())
    shards = {"adapter_model-00001-of-00002.safetensors": keys[::2], "adapter_model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({k: sd[k] for k in part}, str(folder / name))
    index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
    (folder / "adapter_model.safetensors.index.json").write_text(json.dumps(index))
    relayout.convert(folder, tmp_path / "2d", to="peft-2d", arch="mixtral")
    want, got = _tensors(c.d2), _tensors(tmp_path / "2d")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_output_dtype_bfloat16(converted3d, tmp_path):
    c = converted3d("llama4", "both+attn")
    assert main(["convert", str(c.src), str(tmp_path / "bf16"), "--to", "peft-2d", "--arch", "llama4",
                 "--dtype", "bfloat16", "-q"]) == 0
    want, got = _tensors(c.d2), _tensors(tmp_path / "bf16")
    assert sorted(got) == sorted(want)
    for key in want:  # relayout only moves elements: casting before or after is the same
        assert got[key].dtype == torch.bfloat16 and torch.equal(got[key], want[key].bfloat16()), key
