"""Tests of LoraSlots (load/replace/evict, errors) and the normalized-file loader."""
import json
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from runtime import LoraSlots, load_normalized_layer, moe_lora_forward, moe_reference  # noqa: E402
from runtime.errors import AdapterError, NormalizedFormatError, SlotError  # noqa: E402
from runtime.testing import ensure_interpreter, random_adapter, random_layer, random_routing  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ensure_interpreter()  # no-op on CUDA
T, H, I, E, K, R = 10, 32, 24, 4, 2, 8


def write_normalized(path, layers, arch="qwen3_moe"):
    """Tiny writer of the relayout-normalized v1 file: {layer: {proj: (a, b, scaling)}}."""
    tensors, scaling, rank = {}, {}, {}
    for layer, adapter in layers.items():
        for proj, (a, b, sc) in adapter.items():
            tensors[f"layers.{layer}.{proj}.lora_a"] = a.detach().cpu().contiguous()
            tensors[f"layers.{layer}.{proj}.lora_b"] = b.detach().cpu().contiguous()
            scaling[f"layers.{layer}.{proj}"] = sc
            rank[f"layers.{layer}.{proj}"] = a.shape[1]
    meta = {"format": "relayout-normalized", "version": 1, "architecture": arch, "num_experts": E,
            "hidden_size": H, "intermediate_size": I, "layers": sorted(layers),
            "scaling": scaling, "rank": rank}
    save_file(tensors, str(path), metadata={"relayout": json.dumps(meta)})


def _slots(S=2, dtype=torch.float32):
    return LoraSlots(S, R, E, H, I, dtype=dtype, device=DEV)


def _ad(rank=R, seed=0, **kw):
    return random_adapter(E, H, I, rank, torch.float32, DEV, seed=seed, **kw)


def _forward(slots, lora):
    w13, w2, _, _ = random_layer(E, H, I, torch.float32, DEV, seed=1)
    ids, wts = random_routing(T, E, K, DEV, seed=2)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(3)).to(DEV)
    tl_ = torch.full((T,), lora, dtype=torch.int32, device=DEV)
    return moe_lora_forward(x, w13, w2, ids, wts, slots, tl_), (x, w13, w2, ids, wts, tl_)


def test_load_pads_rank_tail_and_records_meta():
    slots = _slots()
    ad = _ad(rank=3)
    slots.w1_a.fill_(7.0)  # stale data must be zeroed by load
    slots.load(0, ad)
    assert slots.rank[0].tolist() == [3, 3, 3]
    assert slots.present[0].tolist() == [1, 1, 1]
    assert slots.scaling[0].tolist() == [0.5, 0.75, 1.0]
    assert torch.equal(slots.w1_a[0, :, :3], ad["w1"][0])
    assert not slots.w1_a[0, :, 3:].any()


def test_replace_and_evict_without_reallocation():
    slots = _slots()
    ptrs = [slots.w1_a.data_ptr(), slots.w2_b.data_ptr()]
    first, second = _ad(seed=1), _ad(rank=5, seed=2)
    slots.load(1, first)
    out1, args = _forward(slots, 1)
    torch.testing.assert_close(out1, moe_reference(*args[:5], [None, first], args[5]), atol=1e-4, rtol=1e-4)
    slots.replace(1, second)
    out2, args = _forward(slots, 1)
    torch.testing.assert_close(out2, moe_reference(*args[:5], [None, second], args[5]), atol=1e-4, rtol=1e-4)
    slots.evict(1)
    out3, args = _forward(slots, 1)
    torch.testing.assert_close(out3, moe_reference(*args[:5]), atol=1e-4, rtol=1e-4)
    assert [slots.w1_a.data_ptr(), slots.w2_b.data_ptr()] == ptrs
    assert not slots.occupied(1) and slots.present[1].sum() == 0


@pytest.mark.parametrize("mutate,match", [
    (lambda ad: {**ad, "w1": (ad["w1"][0][:3], ad["w1"][1][:3], 1.0)}, "experts"),   # wrong E
    (lambda ad: {**ad, "w1": (ad["w1"][0][:, :, :16], ad["w1"][1], 1.0)}, "input size"),  # wrong H
    (lambda ad: {**ad, "w3": (ad["w3"][0], ad["w3"][1][:, :8], 1.0)}, "output size"),  # wrong I
    (lambda ad: {**ad, "w2": (torch.randn(E, R + 1, I), torch.randn(E, H, R + 1), 1.0)}, "rank 9"),  # > max
    (lambda ad: {**ad, "w2": (ad["w2"][0].half(), ad["w2"][1].half(), 1.0)}, "dtype"),  # dtype mismatch
    (lambda ad: {**ad, "w2": (ad["w2"][0], None, 1.0)}, "lora_b is missing"),  # missing factor
    (lambda ad: {**ad, "w2": (ad["w2"][0], ad["w2"][1][:, :, :2], 1.0)}, "rank mismatch"),
    (lambda ad: {**ad, "gate_proj": ad["w1"]}, "unknown projection"),
    (lambda ad: {}, "non-empty"),
    (lambda ad: {**ad, "w1": (ad["w1"][0], ad["w1"][1], float("nan"))}, "not finite"),
])
def test_adapter_errors(mutate, match):
    slots = _slots()
    with pytest.raises(AdapterError, match=match):
        slots.load(0, mutate(_ad()))
    assert not slots.occupied(0)


def test_slot_errors():
    slots = _slots()
    with pytest.raises(SlotError, match="out of range"):
        slots.load(2, _ad())
    slots.load(0, _ad())
    with pytest.raises(SlotError, match="replace"):
        slots.load(0, _ad())
    with pytest.raises(SlotError, match="empty"):
        slots.replace(1, _ad())
    with pytest.raises(SlotError, match="already empty"):
        slots.evict(1)


def test_normalized_round_trip(tmp_path):
    # file -> load_normalized_layer -> LoraSlots -> forward == reference on the in-memory adapter
    layer3 = _ad(rank=5, seed=4, shared_a=True)
    layer7 = _ad(rank=2, seed=5, projs=("w2",))
    path = tmp_path / "adapter.safetensors"
    write_normalized(path, {3: layer3, 7: layer7})
    got = load_normalized_layer(path, 3, device=DEV)
    assert set(got) == {"w1", "w3", "w2"}
    for proj, (a, b, sc) in layer3.items():
        assert torch.equal(got[proj][0], a) and torch.equal(got[proj][1], b) and got[proj][2] == sc
    assert set(load_normalized_layer(path, 7)) == {"w2"}
    slots = _slots()
    slots.load(0, got)
    assert slots.shared_a[0] == 1
    out, args = _forward(slots, 0)
    torch.testing.assert_close(out, moe_reference(*args[:5], [layer3], args[5]), atol=1e-4, rtol=1e-4)


def test_normalized_errors(tmp_path):
    ad = _ad(seed=6)
    bad_meta = tmp_path / "plain.safetensors"
    save_file({"x": torch.ones(1)}, str(bad_meta))
    with pytest.raises(NormalizedFormatError, match="no 'relayout' metadata"):
        load_normalized_layer(bad_meta, 0)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"x": torch.ones(1)}, str(wrong), metadata={"relayout": json.dumps({"format": "peft"})})
    with pytest.raises(NormalizedFormatError, match="format"):
        load_normalized_layer(wrong, 0)
    good = tmp_path / "good.safetensors"
    write_normalized(good, {0: ad})
    with pytest.raises(NormalizedFormatError, match="layer 1 not in file"):
        load_normalized_layer(good, 1)
    half = tmp_path / "half.safetensors"
    write_normalized(half, {0: ad})
    from safetensors import safe_open
    with safe_open(str(half), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "layers.0.w3.lora_b"}
        meta = f.metadata()
    save_file(tensors, str(half), metadata=meta)
    with pytest.raises(NormalizedFormatError, match="w3.lora_b missing"):
        load_normalized_layer(half, 0)
    meta = json.loads(meta["relayout"])
    for broken, match in ((dict(meta, scaling={}), "no scaling"),
                          (dict(meta, rank={**meta["rank"], "layers.0.w1": 3}), "metadata rank is 3")):
        save_file(tensors, str(half), metadata={"relayout": json.dumps(broken)})
        with pytest.raises(NormalizedFormatError, match=match):
            load_normalized_layer(half, 0)
