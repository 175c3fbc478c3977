"""Tests of runtime.moe_lora_forward against the loop reference (CPU: TRITON_INTERPRET=1)."""
import json
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from runtime import LoraSlots, moe_lora_forward, moe_reference  # noqa: E402
from runtime.errors import DtypeError, ShapeError  # noqa: E402
from runtime import ops, routing  # noqa: E402
from runtime.routing import route  # noqa: E402
from runtime.testing import ensure_interpreter, random_adapter, random_layer, random_routing  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ensure_interpreter()  # no-op on CUDA

# (dtype, atol, rtol): fp32 is exact math (ieee dots), fp16/bf16 round h and the LoRA shrink.
DTYPES = [
    (torch.float32, 1e-4, 1e-4),
    (torch.float16, 2e-2, 2e-2),
    (torch.bfloat16, 6e-2, 6e-2),
]

# (T, H, I, E, k): shape cases
SHAPES = [
    (12, 48, 40, 5, 2),   # mixed batch, several blocks, E prime
    (3, 32, 32, 4, 2),    # T * k smaller than BLOCK_M
    (10, 40, 24, 7, 3),   # H, I, E not multiples of the blocks
]


def _case(T, H, I, E, k, dtype, rank=8, S=3, seed=0, bias=False):
    """Layer, routing, slots with S different adapters, token_lora mixing slots and -1."""
    w13, w2, b13, b2 = random_layer(E, H, I, dtype, DEV, bias=bias, seed=seed)
    ids, wts = random_routing(T, E, k, DEV, seed=seed + 1)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(seed + 2)).to(DEV, dtype)
    slots = LoraSlots(S, rank, E, H, I, dtype=dtype, device=DEV)
    adapters = [random_adapter(E, H, I, max(1, rank - 3 * s), dtype, DEV, seed=10 + s) for s in range(S)]
    for s, ad in enumerate(adapters):
        slots.load(s, ad)
    token_lora = torch.tensor([(t % (S + 1)) - 1 for t in range(T)], dtype=torch.int32, device=DEV)
    return x, w13, w2, b13, b2, ids, wts, slots, adapters, token_lora


def _close(out, ref, atol, rtol):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_mixed_batch_matches_reference(shape, dtype, atol, rtol):
    x, w13, w2, _, _, ids, wts, slots, adapters, tl_ = _case(*shape, dtype)
    out = moe_lora_forward(x, w13, w2, ids, wts, slots, tl_)
    _close(out, moe_reference(x, w13, w2, ids, wts, adapters, tl_), atol, rtol)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES[:2])
def test_no_adapter_path(dtype, atol, rtol):
    # slots=None: the base MoE alone
    x, w13, w2, _, _, ids, wts, _, _, _ = _case(12, 48, 40, 5, 2, dtype)
    _close(moe_lora_forward(x, w13, w2, ids, wts), moe_reference(x, w13, w2, ids, wts), atol, rtol)


def test_all_tokens_without_adapter_equal_base():
    # every token -1: same as no slots at all
    x, w13, w2, _, _, ids, wts, slots, _, _ = _case(12, 48, 40, 5, 2, torch.float32)
    none = torch.full((12,), -1, dtype=torch.int32, device=DEV)
    _close(moe_lora_forward(x, w13, w2, ids, wts, slots, none), moe_lora_forward(x, w13, w2, ids, wts),
           1e-6, 1e-6)


@pytest.mark.parametrize("alone_first", [True, False])
def test_adapter_alone_equals_mixed_batch(alone_first):
    # routing check: tokens of slot 1 give the same rows alone and inside a mixed batch
    T, H, I, E, k = 12, 48, 40, 5, 2
    x, w13, w2, _, _, ids, wts, slots, _, tl_ = _case(T, H, I, E, k, torch.float32)
    mine = torch.arange(0, T, 2, device=DEV)
    other = torch.arange(1, T, 2, device=DEV)
    alone = moe_lora_forward(x[mine], w13, w2, ids[mine], wts[mine], slots,
                             torch.ones(len(mine), dtype=torch.int32, device=DEV))
    order = torch.cat([mine, other]) if alone_first else torch.cat([other, mine])
    mixed_lora = torch.cat([torch.ones_like(mine), tl_[other]]) if alone_first else \
        torch.cat([tl_[other], torch.ones_like(mine)])
    mixed = moe_lora_forward(x[order], w13, w2, ids[order], wts[order], slots, mixed_lora.int())
    rows = slice(0, len(mine)) if alone_first else slice(len(other), T)
    torch.testing.assert_close(mixed[rows], alone, atol=1e-5, rtol=1e-5)


def test_rank_one():
    # r = 1: padded to 16 inside the kernels
    x, w13, w2, _, _, ids, wts, slots, adapters, tl_ = _case(8, 32, 32, 4, 2, torch.float32, rank=1, S=2)
    out = moe_lora_forward(x, w13, w2, ids, wts, slots, tl_)
    _close(out, moe_reference(x, w13, w2, ids, wts, adapters, tl_), 1e-4, 1e-4)


def test_empty_experts():
    # E = 9 but routing only uses experts {1, 4, 8}: most experts get no rows
    T, H, I, E, k = 10, 32, 32, 9, 2
    x, w13, w2, _, _, _, _, slots, adapters, tl_ = _case(T, H, I, E, k, torch.float32)
    ids, wts = random_routing(T, E, k, DEV, seed=5, experts=[1, 4, 8])
    out = moe_lora_forward(x, w13, w2, ids, wts, slots, tl_)
    _close(out, moe_reference(x, w13, w2, ids, wts, adapters, tl_), 1e-4, 1e-4)


MODES = [{"FUSE": False, "DOWN_IN_GATE_UP": False}, {"FUSE": False, "DOWN_IN_GATE_UP": True},
         {"FUSE": True}, {"FUSE": False, "GROUP_K": 64}, {"FUSE": False, "GROUP_K": 32}]  # the LoRA paths


@pytest.mark.parametrize("mode", MODES)
def test_partial_adapter_down_only(monkeypatch, mode):
    # an adapter with only w2: gate/up get zero contribution and no shrink work
    monkeypatch.setenv("RELAYOUT_RUNTIME_CONFIG", json.dumps(mode))
    T, H, I, E, k = 12, 48, 40, 5, 2
    x, w13, w2, _, _, ids, wts, _, _, _ = _case(T, H, I, E, k, torch.float32)
    slots = LoraSlots(2, 8, E, H, I, dtype=torch.float32, device=DEV)
    down = random_adapter(E, H, I, 6, torch.float32, DEV, projs=("w2",), seed=3)
    gate = random_adapter(E, H, I, 4, torch.float32, DEV, projs=("w1",), seed=4)
    slots.load(0, down)
    slots.load(1, gate)
    assert slots.present.tolist() == [[0, 0, 1], [1, 0, 0]]
    tl_ = torch.tensor([t % 3 - 1 for t in range(T)], dtype=torch.int32, device=DEV)
    out = moe_lora_forward(x, w13, w2, ids, wts, slots, tl_)
    _close(out, moe_reference(x, w13, w2, ids, wts, [down, gate], tl_), 1e-4, 1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_shared_a_is_detected_and_correct(monkeypatch, mode):
    # gate and up share lora_a (3D-born adapter): one shrink serves both
    monkeypatch.setenv("RELAYOUT_RUNTIME_CONFIG", json.dumps(mode))
    T, H, I, E, k = 12, 48, 40, 5, 2
    x, w13, w2, _, _, ids, wts, _, _, _ = _case(T, H, I, E, k, torch.float32)
    slots = LoraSlots(2, 8, E, H, I, dtype=torch.float32, device=DEV)
    shared = random_adapter(E, H, I, 8, torch.float32, DEV, shared_a=True, seed=6)
    plain = random_adapter(E, H, I, 8, torch.float32, DEV, seed=7)
    slots.load(0, shared)
    slots.load(1, plain)
    assert slots.shared_a.tolist() == [1, 0]
    tl_ = torch.tensor([t % 3 - 1 for t in range(T)], dtype=torch.int32, device=DEV)
    out = moe_lora_forward(x, w13, w2, ids, wts, slots, tl_)
    _close(out, moe_reference(x, w13, w2, ids, wts, [shared, plain], tl_), 1e-4, 1e-4)


@pytest.mark.parametrize("dtype,atol,rtol", [DTYPES[0], DTYPES[2]])
def test_swiglu_oai_with_biases(dtype, atol, rtol):
    # GPT-OSS: clamped SwiGLU (alpha 1.702, limit 7), biases on gate/up and down
    x, w13, w2, b13, b2, ids, wts, slots, adapters, tl_ = _case(12, 48, 40, 5, 2, dtype, bias=True)
    x = x * 4  # push pre-activations past the clamp at 7
    out = moe_lora_forward(x, w13, w2, ids, wts, slots, tl_, activation="swiglu_oai",
                           w13_bias=b13, w2_bias=b2)
    ref = moe_reference(x, w13, w2, ids, wts, adapters, tl_, activation="swiglu_oai",
                        w13_bias=b13, w2_bias=b2)
    _close(out, ref, atol * 4, rtol)


PINS = [
    {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2},  # bigger blocks, grouped order
    {"shrink": {"BLOCK_K": 16, "SPLIT_K": 16}},  # shrink split over K: partial sums
    {"shrink": {"BLOCK_K": 32, "SPLIT_K": 0}, "gate_up": {"BLOCK_K": 32}},  # K tails (48 % 32)
    {"DOWN_IN_GATE_UP": True},  # down shrink summed over N tiles in the gate/up epilogue
    {"DOWN_IN_GATE_UP": False, "shrink": {"SPLIT_K": 16, "BLOCK_K": 16}},  # down shrink kernel, split K
    {"FUSE": True},  # decode path: shrinks inside the base K loops, later runs recomputed
    {"FUSE": True, "BLOCK_M": 32, "BLOCK_K": 32},  # decode path with K tails and many runs a block
    {"GROUP_K": 64},  # 4 runs per expand dot (one-hot columns)
    {"GROUP_K": 32, "BLOCK_M": 32},  # 2 runs per expand dot: several groups in a block
    {"GROUP_K": 64, "DOWN_IN_GATE_UP": False, "shrink": {"SPLIT_K": 16, "BLOCK_K": 16}},  # + K partials
]


@pytest.mark.parametrize("pin", PINS)
def test_pinned_config_gives_same_result(monkeypatch, pin):
    # the env escape hatch changes block shapes, not results
    x, w13, w2, _, _, ids, wts, slots, adapters, tl_ = _case(12, 48, 40, 5, 2, torch.float32)
    monkeypatch.setenv("RELAYOUT_RUNTIME_CONFIG", json.dumps(pin))
    out = moe_lora_forward(x, w13, w2, ids, wts, slots, tl_)
    _close(out, moe_reference(x, w13, w2, ids, wts, adapters, tl_), 1e-4, 1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_long_segments_and_many_runs(monkeypatch, mode):
    # 2 experts, 80 tokens: (expert, slot) segments longer than the shrink block (several
    # chunks), GEMM blocks of 32 rows holding several adapter runs and adapter-less rows
    T, H, I, E, k = 80, 32, 32, 2, 1
    x, w13, w2, _, _, ids, wts, slots, adapters, _ = _case(T, H, I, E, k, torch.float32, S=2)
    tl_ = torch.tensor([0] * 40 + [-1] * 10 + [1] * 30, dtype=torch.int32, device=DEV)
    monkeypatch.setenv("RELAYOUT_RUNTIME_CONFIG", json.dumps(
        {"BLOCK_M": 32, **mode, "shrink": {"BLOCK_M": 16, "BLOCK_K": 16, "SPLIT_K": 16}}))
    out = moe_lora_forward(x, w13, w2, ids, wts, slots, tl_)
    _close(out, moe_reference(x, w13, w2, ids, wts, adapters, tl_), 1e-4, 1e-4)


@pytest.mark.parametrize("down_in_gate_up", [False, True])
def test_without_prefetch(monkeypatch, down_in_gate_up):
    # large BLOCK_M * rank configs expand every run after the K loop (no operand prefetch)
    monkeypatch.setattr(ops, "PREFETCH_ELEMS", 0)
    monkeypatch.setenv("RELAYOUT_RUNTIME_CONFIG", json.dumps({"DOWN_IN_GATE_UP": down_in_gate_up}))
    x, w13, w2, _, _, ids, wts, slots, adapters, tl_ = _case(12, 48, 40, 5, 2, torch.float32)
    out = moe_lora_forward(x, w13, w2, ids, wts, slots, tl_)
    _close(out, moe_reference(x, w13, w2, ids, wts, adapters, tl_), 1e-4, 1e-4)


@pytest.mark.parametrize("one_program", [True, False])
def test_routing_sorts_by_expert_then_slot(monkeypatch, one_program):
    # each block holds one expert; within an expert rows are ordered by slot; every pair once;
    # both the one-program path (small P) and the histogram/prefix/scatter path
    monkeypatch.setattr(routing, "SMALL_P", 10 ** 9 if one_program else 0)
    T, E, k, S, bm = 20, 6, 2, 3, 16
    ids, _ = random_routing(T, E, k, DEV, seed=9)
    tl_ = torch.tensor([t % (S + 1) - 1 for t in range(T)], dtype=torch.int32, device=DEV)
    rt = route(ids, tl_, E, S, bm)
    be = rt.block_expert.cpu()
    nb = int((be >= 0).sum())
    rows = rt.sorted_ids.cpu()[: nb * bm].view(nb, bm)
    flat_ids, slot_of = ids.reshape(-1).cpu(), tl_.cpu()
    real = rows[rows < T * k]
    assert sorted(real.tolist()) == list(range(T * k))
    for b in range(nb):
        r = rows[b][rows[b] < T * k]
        assert (flat_ids[r] == be[b]).all()
    for e in range(E):
        blocks = (be[:nb] == e).nonzero().flatten()
        r = rows[blocks].flatten()
        slots = slot_of[(r[r < T * k] // k)].tolist()
        assert slots == sorted(slots)
    segs = rt.segments.cpu()[: int(rt.num_segments)]
    for e, s, first, n in segs.tolist():
        r = rt.sorted_ids.cpu()[first:first + n]
        assert (flat_ids[r] == e).all() and (slot_of[r // k] == s).all()
    assert int(segs[:, 3].sum()) == int((slot_of >= 0).sum()) * k


def test_multi_kernel_routing_forward(monkeypatch):
    # the large-P routing path feeds the same forward
    monkeypatch.setattr(routing, "SMALL_P", 0)
    x, w13, w2, _, _, ids, wts, slots, adapters, tl_ = _case(12, 48, 40, 5, 2, torch.float32)
    out = moe_lora_forward(x, w13, w2, ids, wts, slots, tl_)
    _close(out, moe_reference(x, w13, w2, ids, wts, adapters, tl_), 1e-4, 1e-4)


def test_input_errors():
    x, w13, w2, _, _, ids, wts, slots, _, tl_ = _case(6, 32, 32, 4, 2, torch.float32)
    with pytest.raises(ShapeError, match="w2"):
        moe_lora_forward(x, w13, w2[:, :, :16], ids, wts)
    with pytest.raises(ShapeError, match="topk_weights"):
        moe_lora_forward(x, w13, w2, ids, wts[:, :1])
    with pytest.raises(DtypeError, match="w13"):
        moe_lora_forward(x, w13.half(), w2, ids, wts)
    with pytest.raises(DtypeError, match="topk_ids"):
        moe_lora_forward(x, w13, w2, ids.float(), wts)
    with pytest.raises(ValueError, match="together"):
        moe_lora_forward(x, w13, w2, ids, wts, slots, None)
    with pytest.raises(ShapeError, match="token_lora"):
        moe_lora_forward(x, w13, w2, ids, wts, slots, tl_[:2])
    with pytest.raises(ValueError, match="activation"):
        moe_lora_forward(x, w13, w2, ids, wts, activation="gelu")
    with pytest.raises(ShapeError, match="contiguous"):
        moe_lora_forward(x, w13, w2.transpose(1, 2).contiguous().transpose(1, 2), ids, wts)


def test_strided_inputs():
    # x and token_lora given as strided views give the same result as contiguous copies
    x, w13, w2, _, _, ids, wts, slots, adapters, tl_ = _case(12, 48, 40, 5, 2, torch.float32)
    xt = x.t().contiguous().t()  # column-major x
    tl2 = torch.stack([tl_, tl_], dim=1)[:, 0]  # token_lora with stride 2
    out = moe_lora_forward(xt, w13, w2, ids, wts, slots, tl2)
    _close(out, moe_reference(x, w13, w2, ids, wts, adapters, tl_), 1e-4, 1e-4)



@pytest.mark.parametrize("dtype,atol,rtol", DTYPES[1:])
def test_grouped_expand_half_precision(monkeypatch, dtype, atol, rtol):
    # one-hot grouped expand (4 runs per dot) with half-precision operands
    monkeypatch.setenv("RELAYOUT_RUNTIME_CONFIG", json.dumps({"GROUP_K": 64}))
    x, w13, w2, _, _, ids, wts, slots, adapters, tl_ = _case(12, 48, 40, 5, 2, dtype)
    out = moe_lora_forward(x, w13, w2, ids, wts, slots, tl_)
    _close(out, moe_reference(x, w13, w2, ids, wts, adapters, tl_), atol, rtol)
