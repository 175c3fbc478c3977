"""Bad adapters and bad requests: each gets its own clear error, no output appears, and the input is untouched.

Every case mutates a copy of a real PEFT 0.21.2 Qwen3-MoE adapter, then runs `relayout convert` through the CLI
in-process (exit 1, `error: ...` on stderr) and through the Python API (RelayoutError), checking the message, that
the output path (and any temporary folder next to it) does not exist afterwards, and that every input byte is
unchanged.
"""
import hashlib
import json
import pickle
import re
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import relayout
import tiny_moe as tm
from relayout import RelayoutError
from relayout.cli import main
from tiny_moe import E, H

pytestmark = pytest.mark.filterwarnings("ignore")
R = 4
WEIGHTS = "adapter_model.safetensors"
EXP = "base_model.model.model.layers.{}.mlp.experts."
Q_PROJ_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A real 3D adapter (+ q_proj), a real-shaped 2D adapter and the model's config.json, built once."""
    root = tmp_path_factory.mktemp("sources")
    model = tm.make_model("qwen3_moe")[0]
    tm.make_3d_adapter(model, root / "3d", r=R, extra_target_modules=("q_proj",), seed=1)
    tm.make_2d_adapter(model, root / "2d", r=R, seed=1)
    model.config.save_pretrained(str(root / "model"))
    return root


# ---------------------------------------------------------------- helpers

def fingerprint(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def edit_tensors(folder, change):
    sd = load_file(str(folder / WEIGHTS))
    change(sd)
    save_file(sd, str(folder / WEIGHTS))


def edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


class _CreatesMarker:
    """Unpickling this calls open(path, 'w'): the marker file exists iff something unpickled it."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _pickle_only(folder):
    (folder / WEIGHTS).unlink()
    with (folder / "adapter_model.bin").open("wb") as f:
        pickle.dump({"lora": _CreatesMarker(folder.parent / "UNPICKLED")}, f)


def _truncate(folder):
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) * 2 // 3])


def _corrupt_header(folder):
    data = bytearray((folder / WEIGHTS).read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8:8 + n] = b"#" * n  # same length, not JSON
    (folder / WEIGHTS).write_bytes(bytes(data))


def _huge_header(folder):
    data = bytearray((folder / WEIGHTS).read_bytes())
    data[:8] = struct.pack("<Q", len(data) * 10)
    (folder / WEIGHTS).write_bytes(bytes(data))


def _edit_header(change):
    """Rewrite the safetensors header JSON in place (the data bytes stay where they are)."""
    def mutate(folder):
        data = (folder / WEIGHTS).read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        change(header)
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        (folder / WEIGHTS).write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + n:])
    return mutate


def _negate_shape(key):
    def change(header):
        header[key]["shape"] = [-d for d in header[key]["shape"]]  # two dims: same byte count
    return _edit_header(change)


def _set(key, value, index=(0, 0)):
    def change(sd):
        sd[key][index] = value
    return lambda folder: edit_tensors(folder, change)


def _zero_expert_b(folder):
    def change(sd):
        for key in sd:
            if ".experts." in key and ".lora_B." in key:
                sd[key] = torch.zeros_like(sd[key])
    edit_tensors(folder, change)


def _drop(*keys):
    return lambda folder: edit_tensors(folder, lambda sd: [sd.pop(k) for k in keys])


def _add(key, shape):
    return lambda folder: edit_tensors(folder, lambda sd: sd.__setitem__(key, torch.randn(shape)))


def _rename(old, new):
    return lambda folder: edit_tensors(folder, lambda sd: sd.update({k.replace(old, new): sd.pop(k) for k in list(sd)}))


def _no_experts(folder):
    edit_tensors(folder, lambda sd: [sd.pop(k) for k in list(sd) if ".experts." in k])


def _bf16(key):
    return lambda folder: edit_tensors(folder, lambda sd: sd.__setitem__(key, sd[key].bfloat16()))


def _config(**changes):
    return lambda folder: edit_config(folder, **changes)


def _shard(missing=False, duplicate=False, bad_index=False):
    """Split the weights into two shards + index; optionally lose a shard, repeat a key, or break the index."""
    def mutate(folder):
        sd = load_file(str(folder / WEIGHTS))
        (folder / WEIGHTS).unlink()
        keys = sorted(sd)
        parts = {"a.safetensors": keys[::2], "b.safetensors": keys[1::2] + (keys[:1] if duplicate else [])}
        for name, part in parts.items():
            save_file({k: sd[k] for k in part}, str(folder / name))
        index = {"weight_map": {k: name for name, part in parts.items() for k in part}}
        (folder / (WEIGHTS + ".index.json")).write_text("[]" if bad_index else json.dumps(index))
        if missing:
            (folder / "b.safetensors").unlink()
    return mutate


MODEL_CONFIG = object()  # placeholder in argv for the model's config.json

# (id, source adapter, mutation, extra argv, message regex)
CASES = [
    ("pickle-bin", "3d", _pickle_only, [],
     r"adapter_model\.bin: pickle checkpoints are never loaded .*save_file\(torch\.load\('adapter_model\.bin', "
     r"weights_only=True\), 'adapter_model\.safetensors'\)"),
    ("truncated", "3d", _truncate, [], r"adapter_model\.safetensors: truncated safetensors file: tensor '.*' ends at byte"),
    ("corrupt-header", "3d", _corrupt_header, [], r"adapter_model\.safetensors: corrupt safetensors header"),
    ("metadata-not-strings", "3d", _edit_header(lambda h: h.__setitem__("__metadata__", "pt")), [],  # was ValueError
     r"adapter_model\.safetensors: corrupt safetensors header \(__metadata__ is not an object of strings\)"),
    ("negative-shape", "3d", _negate_shape(Q_PROJ_A), [],  # was a RuntimeError from torch.empty
     r"tensor '" + Q_PROJ_A.replace(".", r"\.") + r"': negative dimension in shape \[-4, -\d+\]"),
    ("header-too-long", "3d", _huge_header, [], r"corrupt or truncated safetensors file \(header of \d+ bytes"),
    ("nan-expert", "3d", _set(EXP.format(1) + "lora_B.weight", float("nan")), [],
     r"tensor 'base_model\.model\.model\.layers\.1\.mlp\.experts\.lora_B\.weight' holds 1 NaN/Inf value"),
    ("inf-passthrough", "3d", _set(Q_PROJ_A, float("inf")), [],
     r"tensor '" + Q_PROJ_A.replace(".", r"\.") + r"' holds 1 NaN/Inf value"),
    ("dtype-mixture", "3d", _bf16(EXP.format(1) + "lora_B.weight"), [],
     r"LoRA tensors mix dtypes: float32 .*bfloat16 \(e\.g\. 'base_model\.model\.model\.layers\.1\.mlp\.experts\.lora_B"
     r"\.weight'\); re-save the adapter in one dtype"),
    ("integer-lora", "3d", lambda f: edit_tensors(f, lambda sd: sd.update({k: v.int() for k, v in sd.items()})), [],
     r"tensor '.*\.lora_[AB]\.weight' is int32: LoRA tensors must be floating point"),
    ("rank-vs-config-2d", "2d", _config(r=8), [],
     r"experts\.0\.gate_proj\.lora_A\.weight' dim 1: axis \(r\): expected 8 \(r=8\), got 4"),
    ("rank-vs-config-3d", "3d", _config(r=8), ["--model-config", MODEL_CONFIG],
     r"base_layer\.lora_A\.weight' dim 0: axis \(e r\): expected 32 \(e=4, r=8\), got 16"),
    ("rank-pattern-vs-tensors", "3d", _config(rank_pattern={"down_proj": 2}), ["--model-config", MODEL_CONFIG],
     r"experts\.lora_A\.weight' dim 0: axis \(e r\): expected 8 \(e=4, r=2\), got 16"),
    ("magnitude-vector", "3d", _add(EXP.format(0) + "lora_magnitude_vector", (E,)), ["--model-config", MODEL_CONFIG],
     r"does not account for tensor\(s\) 'base_model\.model\.model\.layers\.0\.mlp\.experts\.lora_magnitude_vector'"),
    ("stray-expert-key", "3d", _add(EXP.format(1) + "foo.lora_A.weight", (R, H)), ["--model-config", MODEL_CONFIG],
     r"does not account for tensor\(s\) 'base_model\.model\.model\.layers\.1\.mlp\.experts\.foo\.lora_A\.weight'"),
    ("magnitude-vector-no-sizes", "3d", _add(EXP.format(0) + "lora_magnitude_vector", (E,)), [],
     r"does not account for tensor\(s\) 'base_model\.model\.model\.layers\.0\.mlp\.experts\.lora_magnitude_vector'"),
    ("stray-2d-key-in-3d-block", "3d", _add(EXP.format(0) + "0.gate_proj.lora_A.weight", (R, H)), [],
     r"does not account for tensor\(s\) 'base_model\.model\.model\.layers\.0\.mlp\.experts\.0\.gate_proj\.lora_A"),
    ("expert-index-huge", "2d", _add(EXP.format(0) + "3000000.gate_proj.lora_A.weight", (R, H)), [],  # was ~2 min
     r"does not account for tensor\(s\) 'base_model\.model\.model\.layers\.0\.mlp\.experts\.3000000\.gate_proj"),
    ("expert-index-superscript", "2d", _add(EXP.format(0) + "\u00b2.gate_proj.lora_A.weight", (R, H)), [],  # was ValueError
     r"does not account for tensor\(s\) 'base_model\.model\.model\.layers\.0\.mlp\.experts\.\u00b2\.gate_proj"),
    ("layer-leading-zero", "3d", _rename(".layers.1.", ".layers.01."), [],  # was silently written as layers.1
     r"tensor 'base_model\.model\.model\.layers\.01\.mlp\.experts\..*': layer number '01' is not how a model "
     r"names its layers .*'layers\.1\.'"),
    ("layer-non-ascii-digit", "3d", _rename(".layers.1.", ".layers.\u0661."), [],  # Arabic-Indic 1: was layers.1
     r"layer number '\u0661' is not how a model names its layers"),
    ("all-expert-b-zero", "3d", _zero_expert_b, [],
     r"every expert LoRA is zero .*the converted adapter would change nothing"),
    ("missing-b-down", "3d", _drop(EXP.format(1) + "lora_B.weight"), [],
     r"tensor 'base_model\.model\.model\.layers\.1\.mlp\.experts\.lora_B\.weight' is missing \(unit down needs it\)"),
    ("missing-b-gate-up", "3d", _drop(EXP.format(0) + "base_layer.lora_B.weight"), [],
     r"'base_model\.model\.model\.layers\.0\.mlp\.experts\.base_layer\.lora_B\.weight' is missing \(unit gate_up"),
    ("missing-b-2d-expert", "2d", _drop(EXP.format(0) + "2.up_proj.lora_B.weight"), [],
     r"'base_model\.model\.model\.layers\.0\.mlp\.experts\.2\.up_proj\.lora_B\.weight' is missing \(unit up needs it\)"),
    ("no-expert-tensors", "3d", _no_experts, [],
     r"no expert LoRA tensors found for rule qwen3_moe .*there is nothing to relayout"),
    ("no-config", "3d", lambda f: (f / "adapter_config.json").unlink(), [], r"no adapter_config\.json"),
    ("config-not-json", "3d", lambda f: (f / "adapter_config.json").write_text("{r: 4"), [],
     r"adapter_config\.json: not valid JSON"),
    # malformed adapter_config.json values: an error naming the field, never a raw TypeError/ValueError/re.error
    ("rank-pattern-not-a-number", "3d", _config(rank_pattern={"down_proj": "x"}), [],
     r"adapter_config\.json: rank_pattern\['down_proj'\] must be a positive integer, got 'x'"),
    ("rank-pattern-zero", "3d", _config(rank_pattern={"down_proj": 0}), [],
     r"rank_pattern\['down_proj'\] must be a positive integer, got 0"),
    ("alpha-pattern-null", "3d", _config(alpha_pattern={"down_proj": None}), [],
     r"alpha_pattern\['down_proj'\] must be a positive number, got None"),
    ("pattern-key-not-a-regex", "3d", _config(rank_pattern={"down_proj(": 2}), [],
     r"rank_pattern key 'down_proj\(' is not a regular expression"),
    ("r-not-an-integer", "3d", _config(r=2.5), [], r"adapter_config\.json: r must be a positive integer, got 2\.5"),
    ("alpha-nan", "3d", _config(lora_alpha=float("nan")), [], r"lora_alpha must be a positive number, got nan"),
    ("peft-version-number", "3d", _config(peft_version=19), [], r"peft_version must be a string, got 19"),
    ("base-model-number", "3d", _config(base_model_name_or_path=5), [],
     r"base_model_name_or_path must be a string, got 5"),
    ("target-modules-number", "3d", _config(target_modules=5), [],
     r"target_modules must be a string or a list of strings, got 5"),
    ("target-parameters-string", "3d", _config(target_parameters="gate_up_proj"), [],
     r"target_parameters must be a list of strings, got 'gate_up_proj'"),
    ("no-weights", "3d", lambda f: (f / WEIGHTS).unlink(), [], r"no adapter_model\.safetensors"),
    ("shard-missing", "3d", _shard(missing=True), [], r"index\.json: shard\(s\) missing: .*b\.safetensors"),
    ("shard-duplicate-key", "3d", _shard(duplicate=True), [], r"[ab]\.safetensors: tensor 'base_model\.model\.model\.layers\.0\.mlp\.experts\.base_layer\.lora_A\.weight' "
     r"also appears in .*[ab]\.safetensors"),
    ("shard-index-broken", "3d", _shard(bad_index=True), [], r"index\.json: not a safetensors index"),
]


def run_case(tmp_path, sources, source, mutate, extra, capsys, *, via):
    folder = tmp_path / "in"
    shutil.copytree(sources / source, folder)
    mutate(folder)
    before = fingerprint(folder)
    extra = [str(sources / "model" / "config.json") if a is MODEL_CONFIG else a for a in extra]
    out = tmp_path / "out"
    if via == "cli":
        code = main(["convert", str(folder), str(out), "--to", "peft-2d", "--arch", "qwen3_moe", *extra])
        captured = capsys.readouterr()
        assert code == 1 and captured.out == ""
        assert captured.err.startswith("error: ") and captured.err.count("\n") >= 1
        message = captured.err
    else:
        options = dict(zip(extra[::2], extra[1::2]))
        with pytest.raises(RelayoutError) as info:
            relayout.convert(folder, out, to="peft-3d", arch="qwen3_moe",
                             model_config=options.get("--model-config"))
        message = str(info.value)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no temporary folder left next to OUT
    assert fingerprint(folder) == before
    return message


@pytest.mark.parametrize("via", ["cli", "api"])
@pytest.mark.parametrize("name,source,mutate,extra,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_adapter(tmp_path, sources, capsys, via, name, source, mutate, extra, expected):
    message = run_case(tmp_path, sources, source, mutate, extra, capsys, via=via)
    assert re.search(expected, message), message


def test_pickle_payload_is_live_but_never_unpickled(tmp_path, sources, capsys):
    """The marker payload really fires when unpickled (so its absence proves relayout never unpickled it)."""
    with (tmp_path / "probe.bin").open("wb") as f:
        pickle.dump(_CreatesMarker(tmp_path / "probe-marker"), f)
    pickle.loads((tmp_path / "probe.bin").read_bytes()).close()
    assert (tmp_path / "probe-marker").exists()
    case = tmp_path / "case"
    case.mkdir()
    run_case(case, sources, "3d", _pickle_only, [], capsys, via="cli")
    code = main(["inspect", str(case / "in"), "--arch", "qwen3_moe"])
    assert code == 1 and "pickle" in capsys.readouterr().err
    assert not (case / "UNPICKLED").exists()


# ---------------------------------------------------------------- bad requests

def test_output_is_input_or_inside_it(tmp_path, sources, capsys):
    folder = tmp_path / "in"
    shutil.copytree(sources / "3d", folder)
    before = fingerprint(folder)
    for out in (folder, folder / "sub", folder / "."):
        code = main(["convert", str(folder), str(out), "--to", "peft-2d", "--arch", "qwen3_moe"])
        err = capsys.readouterr().err
        assert code == 1 and "the output must not be the input adapter or inside it" in err, err
        with pytest.raises(RelayoutError, match="must not be the input"):
            relayout.convert(folder, out, to="peft-2d", arch="qwen3_moe", force=True)
    assert fingerprint(folder) == before and not (folder / "sub").exists()


def test_existing_output_needs_force(tmp_path, sources, capsys):
    folder, out = tmp_path / "in", tmp_path / "out"
    shutil.copytree(sources / "3d", folder)
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = main(["convert", str(folder), str(out), "--to", "peft-2d", "--arch", "qwen3_moe"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and "already exists (pass --force to replace it)" in err
    assert fingerprint(out) == {"keep.txt": hashlib.sha256(b"mine").hexdigest()}
    # a failing run with --force leaves the old output in place
    bad = tmp_path / "bad"
    shutil.copytree(sources / "3d", bad)
    _set(EXP.format(1) + "lora_A.weight", float("nan"))(bad)
    code = main(["convert", str(bad), str(out), "--to", "peft-2d", "--arch", "qwen3_moe", "--force"])
    assert code == 1 and "NaN/Inf" in capsys.readouterr().err
    assert fingerprint(out) == {"keep.txt": hashlib.sha256(b"mine").hexdigest()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "in", "out"]
    # --force replaces it
    assert main(["convert", str(folder), str(out), "--to", "peft-2d", "--arch", "qwen3_moe", "--force", "-q"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", WEIGHTS]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "in", "out"]


@pytest.mark.parametrize("option,value,api_kw,message", [
    ("--to", "peft-4d", dict(to="peft-4d"), "unknown output format 'peft-4d'; choose one of peft-2d, peft-3d, normalized"),
    ("--dtype", "int8", dict(to="peft-2d", dtype="int8"), "unknown dtype 'int8'; choose one of float32, float16, bfloat16"),
])
def test_unknown_format_or_dtype(tmp_path, sources, capsys, option, value, api_kw, message):
    folder, out = tmp_path / "in", tmp_path / "out"
    shutil.copytree(sources / "3d", folder)
    before = fingerprint(folder)
    argv = ["convert", str(folder), str(out), "--arch", "qwen3_moe", option, value]
    if option != "--to":
        argv += ["--to", "peft-2d"]
    with pytest.raises(SystemExit) as exit_info:  # argparse: a usage error, exit 2
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "error: argument" in err and f"invalid choice: '{value}'" in err
    with pytest.raises(RelayoutError) as info:
        relayout.convert(folder, out, arch="qwen3_moe", **api_kw)
    assert str(info.value) == message
    assert not out.exists() and fingerprint(folder) == before


@pytest.mark.parametrize("device", ["gpu", "cuda:0"])
def test_unusable_device(tmp_path, sources, capsys, device):
    """An unknown device, or CUDA on a machine without it: an error naming it (was a raw RuntimeError/AssertionError)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code = main(["convert", str(sources / "3d"), str(tmp_path / "out"), "--to", "peft-2d", "--arch", "qwen3_moe",
                 "--device", device])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith(f"error: device '{device}' cannot be used: "), err
    loaded = relayout.load_adapter(sources / "3d", arch="qwen3_moe")
    with pytest.raises(RelayoutError, match=f"device '{device}' cannot be used"):
        next(relayout.iter_normalized(loaded, device=device))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_no_architecture_for_keys(tmp_path, sources, capsys):
    """Without --arch, an adapter whose keys no rule knows gets an error naming the options."""
    folder = tmp_path / "in"
    shutil.copytree(sources / "3d", folder)
    _no_experts(folder)
    code = main(["convert", str(folder), str(tmp_path / "out"), "--to", "peft-2d"])
    err = capsys.readouterr().err
    assert code == 1 and "no rule recognises the adapter's expert keys" in err and "--arch NAME" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("config,message", [
    ([], "a model config is a JSON object, got list"),  # was AttributeError
    ({"architectures": 5}, "architectures must be a list of strings, got 5"),  # was TypeError
    ({"architectures": "Qwen3MoeForCausalLM"}, "architectures must be a list of strings, got 'Qwen3MoeForCausalLM'"),
    ({"model_type": 5}, "model_type must be a string, got 5"),
])
def test_malformed_model_config(tmp_path, sources, capsys, config, message):
    (tmp_path / "config.json").write_text(json.dumps(config))
    code = main(["inspect", str(sources / "3d"), "--model-config", str(tmp_path / "config.json")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith(f"error: {tmp_path / 'config.json'}: ") and message in err, err


def test_error_as_json(tmp_path, sources, capsys):
    folder = tmp_path / "in"
    shutil.copytree(sources / "3d", folder)
    _zero_expert_b(folder)
    code = main(["convert", str(folder), str(tmp_path / "out"), "--to", "normalized", "--arch", "qwen3_moe",
                 "-o", "json"])
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert code == 1 and result["ok"] is False and "would change nothing" in result["error"]
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_integer_passthrough_tensor_does_not_set_the_output_dtype(tmp_path, sources):
    """A non-LoRA int64 tensor listed first in the header: the LoRA tensors keep float32 (they were cast to int64)."""
    folder = tmp_path / "in"
    shutil.copytree(sources / "3d", folder)
    edit_tensors(folder, lambda sd: sd.__setitem__("base_model.model.aaa.step", torch.arange(3)))
    assert next(iter(relayout.load_adapter(folder, arch="qwen3_moe").adapter.tensors)) == "base_model.model.aaa.step"
    relayout.convert(folder, tmp_path / "n.safetensors", to="normalized", arch="qwen3_moe", progress=False)
    out = load_file(str(tmp_path / "n.safetensors"))
    assert out["layers.0.w1.lora_a"].dtype == torch.float32 and out["passthrough.base_model.model.aaa.step"].dtype == torch.int64
    source = load_file(str(folder / WEIGHTS))
    assert torch.equal(out["layers.0.w2.lora_a"], source[EXP.format(0) + "lora_A.weight"].reshape(E, R, -1))


def test_normalized_refuses_two_expert_blocks_in_one_layer(tmp_path, sources):
    """Qwen3.5-MoE experts at model.language_model.layers.0 and model.layers.0: normalized keys would collide
    (was a raw RuntimeError from the writer, and iter_normalized yielded layer 0 twice); peft-2d keeps both."""
    folder = tmp_path / "in"
    shutil.copytree(sources / "3d", folder)
    wrapped = "base_model.model.model.language_model.layers.0.mlp.experts."
    edit_tensors(folder, lambda sd: sd.update({k.replace(EXP.format(0), wrapped): v.clone() for k, v in sd.items()
                                               if k.startswith(EXP.format(0))}))
    loaded = relayout.load_adapter(folder, arch="qwen3_5_moe")
    message = r"layer 0 has expert LoRAs at both 'model\.language_model\.layers\.0\.mlp\.experts' and " \
              r"'model\.layers\.0\.mlp\.experts'; the normalized layout holds one block per layer"
    with pytest.raises(RelayoutError, match=message):
        relayout.convert(loaded, tmp_path / "n.safetensors", to="normalized", progress=False)
    with pytest.raises(RelayoutError, match=message):
        list(relayout.iter_normalized(loaded))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
    relayout.convert(loaded, tmp_path / "2d", to="peft-2d", progress=False)
    assert sum(".layers.0.mlp.experts." in k for k in load_file(str(tmp_path / "2d" / WEIGHTS))) == 2 * 6 * E


def test_failure_mid_stream_leaves_no_file_for_normalized_file_output(tmp_path, sources):
    """NaN in the last layer: layer 0 was already written to the temporary file, which must disappear."""
    folder = tmp_path / "in"
    shutil.copytree(sources / "3d", folder)
    _set(EXP.format(1) + "lora_B.weight", float("inf"), index=(-1, -1))(folder)
    with pytest.raises(RelayoutError, match="NaN/Inf"):
        relayout.convert(folder, tmp_path / "n.safetensors", to="normalized", arch="qwen3_moe", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
