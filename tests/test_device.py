"""Relayout plans on the GPU: forward and inverse on CUDA tensors equal the CPU results exactly (skipped without CUDA)."""
import pytest
import torch

from relayout import compile_inverse, compile_plan, forward, inverse, load_rules

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

E, R, H, I = 8, 4, 48, 40  # 2I != H, I != H: shapes alone fix the orientation


@pytest.mark.parametrize("arch", ["Qwen3MoeForCausalLM", "GptOssForCausalLM", "Llama4ForCausalLM", "MixtralForCausalLM"])
@pytest.mark.parametrize("layout", ["peft-2d", "peft-3d", "peft-3d-swapped", "peft-3d-blockdiag", "named-3d"])
def test_cuda_matches_cpu(arch, layout):
    rule = load_rules().find(arch)
    gen = torch.Generator().manual_seed(0)
    shared_a = torch.randn(E, R, H, generator=gen)
    normalized = {"w1.lora_a": shared_a, "w3.lora_a": shared_a.clone(),
                  "w1.lora_b": torch.randn(E, I, R, generator=gen), "w3.lora_b": torch.randn(E, I, R, generator=gen),
                  "w2.lora_a": torch.randn(E, R, I, generator=gen), "w2.lora_b": torch.randn(E, H, R, generator=gen)}
    back = compile_inverse(rule, layout, {k: v.shape for k, v in normalized.items()})
    source = inverse(back, normalized)
    plan = compile_plan(rule, layout, back.units, {k: v.shape for k, v in source.items()}, dict(back.config_ranks))
    on_gpu = forward(plan, {k: v.cuda() for k, v in source.items()})
    on_cpu = forward(plan, source)
    for key, value in on_cpu.items():
        assert on_gpu[key].is_cuda and torch.equal(on_gpu[key].cpu(), value), key
        assert torch.equal(value, normalized[key]), key
    again = inverse(back, on_gpu)
    for key, value in source.items():
        assert again[key].is_cuda and torch.equal(again[key].cpu(), value), key
