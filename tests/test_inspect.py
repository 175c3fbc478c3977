"""relayout inspect -o json on real PEFT adapters: the layout of every block, found with no flag but --arch/--model-config.

Adapters come from PEFT 0.21.2 on tiny models (tests/tiny_moe.py); the old-PEFT (<= 0.19.0) orientation is
rebuilt from them by a slow per-expert loop that follows formats.md literally.
"""
import copy
import json

import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file

import relayout
import tiny_moe as tm
from relayout.cli import main
from tiny_moe import E, H

pytestmark = pytest.mark.filterwarnings("ignore")
R = 4
EXPERTS = "base_model.model.model.layers.{}.mlp.experts."


def inspect_json(capsys, *argv):
    """Run `relayout inspect ... -o json` in-process -> (exit code, parsed stdout)."""
    code = main(["inspect", *map(str, argv), "-o", "json"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out)


def inspect_error(capsys, *argv):
    """Run `relayout inspect ...` (text mode) expecting failure -> stderr."""
    code = main(["inspect", *map(str, argv)])
    captured = capsys.readouterr()
    assert code == 1 and captured.out == ""
    assert captured.err.startswith("error: ")
    return captured.err


def one_block(info):
    assert len(info["blocks"]) == 1, info["blocks"]
    return info["blocks"][0]


def tensors(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def swap_orientation(lora_a, lora_b, experts):
    """Per expert, swap which side lora_A acts on: A'_e = B_e^T, B'_e = A_e^T (formats.md), packing kept.

    A [E·r, in] is expert-major (row e·r + k), B [out, r·E] rank-major (column k·E + e). Applied to a
    PEFT 0.21.2 Qwen3-MoE gate_up adapter (A [E·r, H], B [2I, r·E]) this gives what PEFT <= 0.19.0
    saved (A [E·r, 2I], B [H, r·E]); it is its own inverse.
    """
    out_dim, r = lora_b.shape[0], lora_a.shape[0] // experts
    in_dim = lora_a.shape[1]
    new_a = torch.full((experts * r, out_dim), float("nan"))
    new_b = torch.full((in_dim, r * experts), float("nan"))
    for e in range(experts):
        for k in range(r):
            new_a[e * r + k, :] = lora_b[:, k * experts + e]
            new_b[:, k * experts + e] = lora_a[e * r + k, :]
    return new_a, new_b


def rewrite_orientation(src, dst, peft_version):
    """Copy a 3D adapter folder with every expert A/B pair swapped and peft_version set (None: removed)."""
    dst.mkdir()
    sd = tensors(src)
    for key in [k for k in sd if k.endswith(".experts.lora_A.weight") or k.endswith(".experts.base_layer.lora_A.weight")]:
        key_b = key.replace("lora_A", "lora_B")
        sd[key], sd[key_b] = swap_orientation(sd[key], sd[key_b], E)
    save_file(sd, str(dst / "adapter_model.safetensors"))
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    edit_config(dst, peft_version=peft_version)


def test_swap_orientation_reference_is_the_formats_md_formula():
    """The slow loop agrees with the closed form ΔW_e^T = A_e^T B_e^T on random data (so its callers can trust it)."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(E * R, 5, generator=gen), torch.randn(7, R * E, generator=gen)
    new_a, new_b = swap_orientation(a, b, E)
    assert new_a.shape == (E * R, 7) and new_b.shape == (5, R * E)
    for e in range(E):
        a_e, b_e = a.reshape(E, R, 5)[e], b.reshape(7, R, E)[:, :, e]
        na_e, nb_e = new_a.reshape(E, R, 7)[e], new_b.reshape(5, R, E)[:, :, e]
        assert torch.equal(na_e, b_e.T) and torch.equal(nb_e, a_e.T)
        torch.testing.assert_close(nb_e @ na_e, (b_e @ a_e).T)
    assert all(torch.equal(x, y) for x, y in zip(swap_orientation(new_a, new_b, E), (a, b)))


# ---------------------------------------------------------------- fixtures: real adapters, built once

@pytest.fixture(scope="module")
def model():
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = tm.make_model(family, seed=3)[0]
        return cache[family]
    return get


@pytest.fixture(scope="module")
def adapters(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    cache = {}

    def get(name):
        if name in cache:
            return cache[name]
        family, kind = name.split(":")
        folder = root / name.replace(":", "-")
        if kind == "3d":
            tm.make_3d_adapter(model(family), folder, r=R, extra_target_modules=("q_proj",), seed=2)
        elif kind == "down":
            tm.make_3d_adapter(model(family), folder, r=R, targets=("down_proj",), seed=2)
        elif kind == "2d":
            tm.make_2d_adapter(model(family), folder, r=R, seed=2)
        elif kind == "blockdiag":  # PEFT's own 4.x -> 5.x conversion, saved by PEFT
            tm.make_2d_adapter(model(family), root / f"{family}-v4", r=R, seed=4)
            tm.load_adapter(model(family), root / f"{family}-v4").save_pretrained(str(folder))
        elif kind == "config":
            model(family).config.save_pretrained(str(folder))
        cache[name] = folder
        return folder
    return get


# ---------------------------------------------------------------- layouts, with no flag beyond --arch/--model-config

def test_2d_adapter(capsys, adapters):
    code, info = inspect_json(capsys, adapters("qwen3_moe:2d"), "--arch", "qwen3_moe")
    assert code == 0
    block = one_block(info)
    assert (info["rule"], info["architecture_from"], info["layers"]) == ("qwen3_moe", "--arch qwen3_moe", 2)
    assert block == {"layers": "0-1", "experts": "model.layers.{layer}.mlp.experts", "layout": "peft-2d",
                     "units": ["gate", "up", "down"], "num_experts": E, "rank": {"w1": R, "w2": R, "w3": R},
                     "scaling": {"gate": 2.0, "up": 2.0, "down": 2.0}}
    assert info["passthrough"] == [] and info["tensors"] == 2 * 3 * 2 * E and info["dtype"] == "float32"


def test_3d_adapter_with_model_config(capsys, adapters):
    config = adapters("qwen3_moe:config") / "config.json"
    code, info = inspect_json(capsys, adapters("qwen3_moe:3d"), "--model-config", config)
    assert code == 0
    assert info["architecture"] == "Qwen3MoeForCausalLM" and info["architecture_from"] == f"--model-config {config}"
    block = one_block(info)
    assert (block["layout"], block["units"], block["num_experts"]) == ("peft-3d", ["gate_up", "down"], E)
    assert block["rank"] == {"w1": R, "w2": R, "w3": R} and block["scaling"] == {"gate_up": 2.0, "down": 2.0}
    assert info["peft_version"] == "0.21.2"
    sd = tensors(adapters("qwen3_moe:3d"))
    assert info["passthrough"] == [k for k in sd if ".q_proj." in k] and len(info["passthrough"]) == 4
    assert info["bytes"] == sum(t.numel() * 4 for t in sd.values())
    assert info["notes"] == []  # the model config gave num_experts: nothing derived


def test_3d_adapter_without_sizes_notes_derived_num_experts(capsys, adapters):
    code, info = inspect_json(capsys, adapters("qwen3_moe:3d"), "--arch", "qwen3_moe")
    assert code == 0 and one_block(info)["num_experts"] == E
    assert [n for n in info["notes"] if n.startswith(f"num_experts {E} was derived")], info["notes"]


@pytest.mark.parametrize("family,version,layout", [
    ("qwen3_moe", "0.18.1", "peft-3d-swapped"),   # [E, out, in], never swapped: PEFT's in is 2I
    ("gpt_oss", "0.19.0", "peft-3d-swapped"),     # marked transposed: 0.19.0 swapped it
    ("llama4", "0.18.1", "peft-3d"),              # unmarked [E, in, out]: input side until 0.19.0
])
def test_old_peft_orientation_detected_and_converted_back(capsys, adapters, tmp_path, family, version, layout):
    """An adapter as an older PEFT saved it: detected from peft_version + shapes; peft-3d (0.21.2) restores PEFT's."""
    src = adapters(f"{family}:3d")
    rewrite_orientation(src, tmp_path / "old", version)
    code, info = inspect_json(capsys, tmp_path / "old", "--arch", family)
    assert code == 0 and info["peft_version"] == version
    block = one_block(info)
    assert (block["layout"], block["units"], block["rank"]) == (layout, ["gate_up", "down"], {"w1": R, "w2": R, "w3": R})
    relayout.convert(tmp_path / "old", tmp_path / "new", to="peft-3d", arch=family)
    want, got = tensors(src), tensors(tmp_path / "new")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_llama4_from_peft_0212_is_swapped_and_found_by_keys_alone(capsys, adapters):
    """feed_forward.experts is Llama4's alone: no flag at all; PEFT >= 0.19.1 swaps its unmarked experts."""
    code, info = inspect_json(capsys, adapters("llama4:3d"))
    assert code == 0
    assert (info["rule"], info["architecture_from"]) == ("llama4", "adapter keys")
    block = one_block(info)
    assert (block["layout"], block["experts"]) == ("peft-3d-swapped", "model.layers.{layer}.feed_forward.experts")


def test_mixtral_2d_found_by_keys_alone(capsys, adapters):
    code, info = inspect_json(capsys, adapters("mixtral:2d"))
    assert code == 0 and (info["rule"], info["architecture_from"]) == ("mixtral", "adapter keys")
    assert one_block(info)["experts"] == "model.layers.{layer}.block_sparse_moe.experts"


def test_peft_converted_blockdiag(capsys, adapters):
    code, info = inspect_json(capsys, adapters("qwen3_moe:blockdiag"), "--arch", "qwen3_moe")
    assert code == 0
    block = one_block(info)
    assert block["layout"] == "peft-3d-blockdiag" and block["units"] == ["gate_up", "down"]
    assert block["rank"] == {"w1": R, "w2": R, "w3": R}  # gate_up is saved at 2r; each projection is rank r
    assert block["scaling"] == {"gate_up": 2.0, "down": 2.0}  # alpha 16 / r 8 and 8 / 4


def test_architecture_from_local_base_model_folder(capsys, adapters, tmp_path):
    """base_model_name_or_path naming a local folder with config.json decides the rule (here GPT-OSS)."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    src = adapters("gpt_oss:3d")
    (folder / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    (folder / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    base = adapters("gpt_oss:config")
    edit_config(folder, base_model_name_or_path=str(base))
    code, info = inspect_json(capsys, folder)
    assert code == 0
    assert (info["rule"], info["architecture"]) == ("gpt_oss", "GptOssForCausalLM")
    assert info["architecture_from"] == f"base_model_name_or_path {base}"
    assert one_block(info)["layout"] == "peft-3d"
    # a hub name is not a local folder: the keys alone cannot tell GPT-OSS from Qwen3-MoE
    edit_config(folder, base_model_name_or_path="openai/gpt-oss-20b")
    err = inspect_error(capsys, folder)
    assert "several architectures" in err and "gpt_oss" in err


# ---------------------------------------------------------------- ambiguity errors

def test_keys_fit_several_architectures(capsys, adapters):
    err = inspect_error(capsys, adapters("qwen3_moe:3d"))
    assert "the keys fit several architectures" in err
    for candidate in ("qwen3_moe", "gpt_oss", "mixtral", "olmoe", "deepseek_v3"):
        assert candidate in err, candidate
    assert "--arch NAME" in err and "--model-config" in err
    code = main(["inspect", str(adapters("qwen3_moe:3d")), "-o", "json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 1 and out["ok"] is False and "several architectures" in out["error"]


@pytest.fixture(scope="module")
def square_old_gate_up(model, tmp_path_factory):
    """Qwen3-MoE with 2I == H, gate_up-only adapter in the old orientation, peft_version missing."""
    config = tm.FAMILIES["qwen3_moe"]()
    config.moe_intermediate_size = H // 2
    torch.manual_seed(0)
    square = T.AutoModelForCausalLM.from_config(config).float().eval()
    root = tmp_path_factory.mktemp("square")
    tm.make_3d_adapter(square, root / "new", targets=("gate_up_proj",), r=R, seed=6)
    rewrite_orientation(root / "new", root / "old", None)
    config.save_pretrained(str(root / "model"))
    return root


def test_orientation_undecidable_without_peft_version(capsys, square_old_gate_up):
    root = square_old_gate_up
    sd = tensors(root / "old")
    assert {tuple(t.shape) for t in sd.values()} == {(E * R, H), (H, R * E)}  # square: shapes cannot tell
    for extra in ([], ["--model-config", root / "model" / "config.json"]):  # sizes do not settle it either
        err = inspect_error(capsys, root / "old", "--arch", "qwen3_moe", *extra)
        assert "fits several layouts" in err, err
        assert "peft-3d ['gate_up']" in err and "peft-3d-swapped ['gate_up']" in err
        assert "peft_version" in err and "--layout" in err
    code, info = inspect_json(capsys, root / "old", "--arch", "qwen3_moe", "--layout", "peft-3d-swapped")
    assert code == 0 and one_block(info)["layout"] == "peft-3d-swapped"
    edit_config(root / "old", peft_version="0.18.1")
    try:
        code, info = inspect_json(capsys, root / "old", "--arch", "qwen3_moe")
    finally:
        edit_config(root / "old", peft_version=None)
    assert code == 0 and one_block(info)["layout"] == "peft-3d-swapped"
    code, info = inspect_json(capsys, root / "new", "--arch", "qwen3_moe")  # 0.21.2 written: no doubt
    assert code == 0 and one_block(info)["layout"] == "peft-3d"


# ---------------------------------------------------------------- partial adapters

def test_down_proj_only(capsys, adapters):
    code, info = inspect_json(capsys, adapters("gpt_oss:down"), "--arch", "gpt_oss")
    assert code == 0
    block = one_block(info)
    assert (block["layout"], block["units"], block["rank"], block["layers"]) == ("peft-3d", ["down"], {"w2": R}, "0-1")


def test_only_some_layers(capsys, adapters, tmp_path):
    folder = tmp_path / "partial"
    folder.mkdir()
    src = adapters("qwen3_moe:3d")
    sd = {k: v for k, v in tensors(src).items() if not k.startswith(EXPERTS.format(0))}
    save_file(sd, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    code, info = inspect_json(capsys, folder, "--arch", "qwen3_moe")
    assert code == 0 and info["layers"] == 1
    assert one_block(info)["layers"] == "1" and one_block(info)["layout"] == "peft-3d"
    relayout.convert(folder, tmp_path / "2d", to="peft-2d", arch="qwen3_moe")
    out = tensors(tmp_path / "2d")
    assert not any(".layers.0.mlp.experts." in k for k in out)
    assert sum(".layers.1.mlp.experts." in k for k in out) == 3 * 2 * E


def test_layer_specific_target_parameters_from_peft(capsys, model, tmp_path):
    """PEFT itself writes a mixed adapter: gate_up targeted in layer 0 only, down_proj everywhere."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=R, lora_alpha=8, init_lora_weights=False, target_modules=[],
                     target_parameters=["model.layers.0.mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    pm = get_peft_model(copy.deepcopy(model("qwen3_moe")), cfg)
    tm._randomize_lora(pm, 1)
    pm.save_pretrained(str(tmp_path / "mixed"))
    keys = set(tensors(tmp_path / "mixed"))
    assert EXPERTS.format(0) + "base_layer.lora_A.weight" in keys
    assert EXPERTS.format(1) + "base_layer.lora_A.weight" not in keys
    code, info = inspect_json(capsys, tmp_path / "mixed", "--arch", "qwen3_moe")
    assert code == 0, info
    units = {b["layers"]: b["units"] for b in info["blocks"]}
    assert units == {"0": ["gate_up", "down"], "1": ["down"]}
    relayout.convert(tmp_path / "mixed", tmp_path / "2d", to="peft-2d", arch="qwen3_moe")
    relayout.convert(tmp_path / "2d", tmp_path / "3d", to="peft-3d", arch="qwen3_moe")
    config = json.loads((tmp_path / "3d" / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == sorted(cfg.target_parameters)  # layer 1 keeps no gate_up LoRA
    loaded = tm.load_adapter(model("qwen3_moe"), tmp_path / "3d")
    loaded_2d = tm.load_adapter(model("qwen3_moe"), tmp_path / "2d")  # PEFT's 4.x conversion wraps gate_up in
    x = torch.randn(5, H, generator=torch.Generator().manual_seed(0))  # layer 1 too: it must start at B = 0
    ids, w = tm.fixed_routing(5, seed=1)
    for layer in (0, 1):
        torch.testing.assert_close(tm.moe_block_output(loaded_2d, layer, x, ids, w),
                                   tm.moe_block_output(pm, layer, x, ids, w), rtol=1e-5, atol=1e-6)
        assert set(tm.param_wrappers(loaded, layer)) == set(tm.param_wrappers(pm, layer))
        want, got = tm.per_expert_deltas_from_peft(pm, layer), tm.per_expert_deltas_from_peft(loaded, layer)
        for role in want:
            torch.testing.assert_close(got[role], want[role], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(tm.moe_block_output(loaded, layer, x, ids, w),
                                   tm.moe_block_output(pm, layer, x, ids, w), rtol=1e-5, atol=1e-6)


def test_peft_resaved_blockdiag_keeps_a_stale_peft_version(capsys, model, tmp_path):
    """An adapter trained with PEFT 0.18.0 on transformers 4.x, loaded by PEFT 0.21.2 (converted) and saved."""
    tm.make_2d_adapter(model("qwen3_moe"), tmp_path / "v4", r=R, seed=8, peft_version="0.18.0")
    tm.load_adapter(model("qwen3_moe"), tmp_path / "v4").save_pretrained(str(tmp_path / "resaved"))
    saved = json.loads((tmp_path / "resaved" / "adapter_config.json").read_text())
    assert saved["peft_version"] == "0.18.0"  # PEFT keeps the loaded config's version
    assert tensors(tmp_path / "resaved")[EXPERTS.format(0) + "lora_A.weight"].shape == (E * R, tm.I)  # 0.21.2 side
    code, info = inspect_json(capsys, tmp_path / "resaved", "--arch", "qwen3_moe")
    assert code == 0, info
    assert one_block(info)["layout"] == "peft-3d-blockdiag"
    assert any("peft_version 0.18.0" in note and "shapes were trusted" in note for note in info["notes"]), info
