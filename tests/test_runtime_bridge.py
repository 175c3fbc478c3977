"""relayout -> runtime: an adapter born 2D and one born 3D, relayouted in memory or via a normalized file, serve
one mixed batch; each token's output equals the model with that adapter's deltas merged (the Triton interpreter on CPU)."""
import copy

import pytest
import torch

import relayout
import runtime
import tiny_moe as tm

pytestmark = pytest.mark.filterwarnings("ignore")
LAYER = 1


def _merged_output(family_model, deltas, x, ids, w):
    """The layer's output with per-expert deltas (role -> (E, out, in)) added to the base weights."""
    return tm.reference_moe_output(family_model, LAYER, x, ids, w, deltas=deltas)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("bridge")
    model, _ = tm.make_model("qwen3_moe", seed=3)
    tm.make_3d_adapter(copy.deepcopy(model), root / "born3d", r=4, seed=1)
    factors = tm.make_2d_adapter(copy.deepcopy(model), root / "born2d", r=2, seed=2)
    return model, root, factors


def _deltas_from(layer_dict):
    return {role: scale * torch.einsum("eor,eri->eoi", b.double(), a.double()).float()
            for role, (a, b, scale) in zip(("gate", "up", "down"), (layer_dict[p] for p in ("w1", "w3", "w2")))}


def test_mixed_batch_of_2d_and_3d_born_adapters(adapters, tmp_path):
    model, root, _ = adapters
    born3d = relayout.load_adapter(root / "born3d", arch="qwen3_moe")
    layers3d = dict(relayout.iter_normalized(born3d))  # in memory
    relayout.convert(root / "born2d", tmp_path / "n2d.safetensors", to="normalized", arch="qwen3_moe")
    layer2d = runtime.load_normalized_layer(tmp_path / "n2d.safetensors", LAYER)  # via the file
    experts = tm.expert_weights(model, LAYER)
    w13 = torch.cat([experts["gate"], experts["up"]], dim=1).contiguous()
    w2 = experts["down"].contiguous()
    slots = runtime.LoraSlots(2, 4, tm.E, tm.H, tm.I, torch.float32, "cpu")
    slots.load(0, layers3d[LAYER])
    slots.load(1, layer2d)
    T = 6
    x = torch.randn(T, tm.H, generator=torch.Generator().manual_seed(0))
    ids, w = tm.fixed_routing(T, seed=4)
    token_lora = torch.tensor([0, 1, -1, 1, 0, -1])
    out = runtime.moe_lora_forward(x, w13, w2, ids, w, slots=slots, token_lora=token_lora)
    want = {0: _merged_output(model, _deltas_from(layers3d[LAYER]), x, ids, w),
            1: _merged_output(model, _deltas_from(layer2d), x, ids, w),
            -1: _merged_output(model, None, x, ids, w)}
    for t, slot in enumerate(token_lora.tolist()):
        torch.testing.assert_close(out[t], want[slot][t], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(want[0], want[1]) and not torch.allclose(want[0], want[-1])
