"""execute._contiguous: the two-pass CPU materialization equals .contiguous() for any strided view."""
import math
import random

import pytest
import torch

from relayout.execute import _contiguous


def _views(seed: int, count: int):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(count):
        while True:
            shape = [rng.choice([1, 2, 3, 16, 40, 128]) for _ in range(rng.randint(2, 5))]
            if math.prod(shape) < 1 << 21:
                break
        x = torch.randn(shape, generator=gen).to(rng.choice([torch.bfloat16, torch.float16, torch.float32]))
        perm = list(range(len(shape)))
        rng.shuffle(perm)
        t = x.permute(perm)
        if rng.random() < 0.3 and t.shape[0] > 1:
            t = t.unbind(0)[1]
        if rng.random() < 0.2 and t.shape[-1] > 1:
            t = t[..., ::2]
        if rng.random() < 0.1:
            t = t.unsqueeze(1).expand(-1, 3, *[-1] * (t.dim() - 1))
        yield t


@pytest.mark.parametrize("seed", range(4))
def test_equals_contiguous_for_random_views(seed):
    for t in _views(seed, 150):
        out = _contiguous(t)
        assert out.shape == t.shape and out.dtype == t.dtype and out.is_contiguous()
        assert torch.equal(out, t.contiguous())


def test_rank_major_b_takes_the_two_pass_path_and_is_exact():
    b = torch.arange(1536 * 2048, dtype=torch.float32).view(1536, 2048).to(torch.bfloat16)
    view = b.view(2, 768, 16, 128).permute(0, 3, 1, 2)  # '(two i) (r e) -> two e i r'
    assert view.stride(-1) != 1 and view.numel() >= 1 << 16
    assert torch.equal(_contiguous(view), view.contiguous())


def test_forward_outputs_own_their_memory():
    """Shared targets (w1/w3 lora_a from one 3D A) and view-only relayouts must not alias inputs or each other."""
    import torch

    from relayout import compile_plan, forward, load_rules

    rule = load_rules().find("Qwen3MoeForCausalLM")
    e, r, h, i = 3, 2, 5, 4
    shapes = {"base_layer.lora_A.weight": (e * r, h), "base_layer.lora_B.weight": (2 * i, r * e),
              "lora_A.weight": (e * r, i), "lora_B.weight": (h, r * e)}
    plan = compile_plan(rule, "peft-3d", ("gate_up", "down"), shapes, {"gate_up": r, "down": r})
    source = {k: torch.randn(*s) for k, s in shapes.items()}
    kept = {k: v.clone() for k, v in source.items()}
    out = forward(plan, source)
    pointers = [v.untyped_storage().data_ptr() for v in out.values()]
    assert len(set(pointers)) == len(pointers)
    assert not set(pointers) & {v.untyped_storage().data_ptr() for v in source.values()}
    for value in out.values():
        value.add_(1.0)
    assert all(torch.equal(source[k], kept[k]) for k in source)
    shared = forward(plan, source, fresh=False)  # a reader may opt into sharing
    assert shared["w1.lora_a"].untyped_storage().data_ptr() == shared["w3.lora_a"].untyped_storage().data_ptr()
