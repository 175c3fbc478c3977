"""Relayout plans on the GPU: time per layer against the device-to-device copy of the same bytes, exactness vs CPU."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

from relayout import compile_inverse, compile_plan, forward, inverse, load_rules

E, R, H, I = 128, 16, 2048, 768  # one Qwen3-30B-A3B MoE layer, rank 16


def bench(fn, reps: int = 50) -> float:
    """Median milliseconds of fn() with CUDA events, L2 flushed between repetitions."""
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 2 GB device-to-device copy."""
    src = torch.randn(1 << 29, device="cuda")
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), reps=20)
    return 2 * src.numel() * 4 / (ms / 1e3)


def layer(rule, layout: str, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(E, R, H, generator=gen)
    normalized = {"w1.lora_a": a, "w3.lora_a": a.clone(), "w1.lora_b": torch.randn(E, I, R, generator=gen),
                  "w3.lora_b": torch.randn(E, I, R, generator=gen), "w2.lora_a": torch.randn(E, R, I, generator=gen),
                  "w2.lora_b": torch.randn(E, H, R, generator=gen)}
    normalized = {k: v.to(dtype) for k, v in normalized.items()}
    back = compile_inverse(rule, layout, {k: v.shape for k, v in normalized.items()})
    source = inverse(back, normalized)
    plan = compile_plan(rule, layout, back.units, {k: v.shape for k, v in source.items()}, dict(back.config_ranks))
    return plan, back, source, normalized


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    rules = load_rules()
    bw = copy_bandwidth()
    rows = []
    for arch, layout in [("Qwen3MoeForCausalLM", "peft-3d"), ("GptOssForCausalLM", "peft-3d"),
                         ("Llama4ForCausalLM", "peft-3d-swapped"), ("Qwen3MoeForCausalLM", "peft-2d")]:
        plan, back, source, normalized = layer(rules.find(arch), layout, torch.bfloat16)
        gpu = {k: v.cuda() for k, v in source.items()}
        out = forward(plan, gpu)
        exact = all(torch.equal(out[k].cpu(), normalized[k]) for k in normalized)
        exact &= all(torch.equal(v.cpu(), source[k]) for k, v in inverse(back, out).items())
        moved = sum(v.numel() * v.element_size() for v in source.values())
        moved += sum(v.numel() * v.element_size() for v in out.values())
        ms_fwd = bench(lambda: forward(plan, gpu))
        ms_inv = bench(lambda: inverse(back, out))
        floor = moved / bw * 1e3
        rows.append(dict(arch=arch, layout=layout, exact=exact, mbytes=moved / 1e6, floor_ms=floor,
                         forward_ms=ms_fwd, inverse_ms=ms_inv, ratio=ms_fwd / floor))
    print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  copy {bw / 1e12:.2f} TB/s")
    print("| arch | layout | exact | MB moved | floor ms | forward ms | inverse ms | forward / floor |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arch']} | {r['layout']} | {r['exact']} | {r['mbytes']:.1f} | {r['floor_ms']:.4f} | "
              f"{r['forward_ms']:.4f} | {r['inverse_ms']:.4f} | {r['ratio']:.1f} |")
    with open(os.path.join(args.out, "bench_relayout_gpu.json"), "w") as f:
        json.dump({"copy_bytes_per_s": bw, "rows": rows}, f, indent=2)
    return 0 if all(r["exact"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
