"""Benchmark of runtime.moe_lora_forward on one GPU: ceilings -> correctness -> (sweep) -> timings -> table.

Qwen3-30B-A3B-sized MoE layer (E=128, k=8, H=2048, I=768, bf16), uniform routing (N(0,1)
logits -> softmax -> top-k -> renorm), T in {1 .. 8192}, 1/4/16 adapters round-robin at rank
16 and 64, following ../shared/docs/measuring.md: CUDA-graph replays, L2 flushed between reps
(triton.testing.do_bench), median; eager time too; floors from the copy bandwidth and the
8192^3 bf16 matmul rate measured in the same run; outputs NaN-poisoned before the checks.

    PYTHONUNBUFFERED=1 python3 benchmarks/bench_runtime.py [--sweep] [--autotune 8,8192] [--passes 2] [--out DIR]
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from runtime import LoraSlots, moe_lora_forward, moe_reference, moe_reference_vectorized  # noqa: E402
from runtime import tuning  # noqa: E402
from runtime.testing import random_routing  # noqa: E402

E, K, H, I = 128, 8, 2048, 768
DT = torch.bfloat16
TS = [1, 8, 32, 128, 512, 2048, 8192]
LORA_CASES = [(4, 16), (16, 64), (1, 16), (16, 16), (1, 64), (4, 64)]  # (adapters, rank), priority order
DEV = "cuda"


# ----------------------------------------------------------------------------- ceilings
def ceilings():
    """Copy bandwidth (bytes read + written per s) and bf16 matmul rate (FLOP/s), measured now."""
    src = torch.randn(2 ** 30 // 2, device=DEV, dtype=DT)  # 1 GiB
    dst = torch.empty_like(src)
    t_copy = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median") * 1e-3
    a = torch.randn(8192, 8192, device=DEV, dtype=DT)
    b = torch.randn(8192, 8192, device=DEV, dtype=DT)
    t_mm = do_bench(lambda: a @ b, warmup=50, rep=500, return_mode="median") * 1e-3
    del src, dst, a, b
    return 2 * 2 ** 30 / t_copy, 2 * 8192 ** 3 / t_mm


# ----------------------------------------------------------------------------- problem
def make_layer():
    g = torch.Generator(device=DEV).manual_seed(0)
    w13 = (torch.randn(E, 2 * I, H, device=DEV, generator=g) / H ** 0.5).to(DT)
    w2 = (torch.randn(E, H, I, device=DEV, generator=g) / I ** 0.5).to(DT)
    return w13, w2


def make_adapters(n, rank, seed):
    """n random 2D-born adapters (separate gate/up A) at one rank, on the GPU."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    out = []
    for _ in range(n):
        ad = {}
        for j, proj in enumerate(("w1", "w3", "w2")):
            din, dout = (H, I) if proj != "w2" else (I, H)
            a = (torch.randn(E, rank, din, device=DEV, generator=g) / din ** 0.5).to(DT)
            b = (torch.randn(E, dout, rank, device=DEV, generator=g) / rank ** 0.5).to(DT)
            ad[proj] = (a, b, 2.0 / (1 + j))
        out.append(ad)
    return out


def make_slots(adapters, rank):
    slots = LoraSlots(16, rank, E, H, I, dtype=DT, device=DEV)
    for s, ad in enumerate(adapters):
        slots.load(s, ad)
    return slots


def make_inputs(T, seed):
    ids, wts = random_routing(T, E, K, DEV, seed=seed)
    x = torch.randn(T, H, device=DEV, generator=torch.Generator(device=DEV).manual_seed(seed)).to(DT)
    return x, ids, wts


# ----------------------------------------------------------------------------- floors
def floor_s(T, ids, n_ad, rank, bw, rate):
    """max(bytes / copy bandwidth, FLOPs / matmul rate) of one forward."""
    active = torch.unique(ids).numel()
    nbytes = active * 3 * I * H * 2 + 2 * T * H * 2
    flops = 2 * T * K * 3 * I * H
    if n_ad:
        slot = torch.arange(T, device=DEV) % n_ad
        pairs = torch.unique(ids.long() * 64 + slot[:, None]).numel()
        nbytes += pairs * rank * (2 * H + 2 * I + I + H) * 2
        flops += 2 * T * K * rank * (2 * H + 2 * I + I + H)
    return max(nbytes / bw, flops / rate), nbytes, flops, active


# ----------------------------------------------------------------------------- timing
def graphed(fn):
    """Capture fn in a CUDA graph after two eager warm-ups (compilation happens there)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def time_ms(fn, graph=True, rep=100):
    if graph:
        g = graphed(fn)
        return do_bench(g.replay, warmup=10, rep=rep, return_mode="median")
    fn()
    return do_bench(fn, warmup=10, rep=rep, return_mode="median")


# ----------------------------------------------------------------------------- correctness
def poison_allocator():
    """Fill the caching allocator's free memory with NaN so unwritten outputs show."""
    free = torch.cuda.mem_get_info()[0]
    t = torch.empty(int(free * 0.5) // 2, dtype=DT, device=DEV)
    t.fill_(float("nan"))
    del t


def rel_err(out, ref):
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def check(T, x, w13, w2, ids, wts, slots, adapters, tl_):
    poison_allocator()
    out = torch.full((T, H), float("nan"), dtype=DT, device=DEV)
    moe_lora_forward(x, w13, w2, ids, wts, slots, tl_, out=out)
    ref_fn = moe_reference if T <= 8 else moe_reference_vectorized
    ref = ref_fn(x.float(), w13.float(), w2.float(), ids, wts,
                 [{p: (a.float(), b.float(), s) for p, (a, b, s) in ad.items()} for ad in adapters]
                 if adapters else None, tl_)
    return rel_err(out, ref.float())


# ----------------------------------------------------------------------------- sweep
GU_SMALL = [dict(BLOCK_N=n, BLOCK_K=bk, num_warps=w, num_stages=st)
            for n, bk, w, st in [(64, 128, 4, 4), (32, 128, 4, 4), (64, 256, 4, 3), (128, 128, 4, 3),
                                 (32, 256, 4, 3)]]
GU_LARGE = [dict(BLOCK_N=n, BLOCK_K=bk, num_warps=w, num_stages=st)
            for n, bk, w, st in [(128, 64, 8, 4), (128, 64, 4, 4), (64, 64, 4, 4), (128, 128, 8, 3),
                                 (64, 128, 4, 4)]]


def sweep_T(T, w13, w2, log):
    """Coordinate descent per BLOCK_M: gate_up config, then down config; base path, graph time."""
    x, ids, wts = make_inputs(T, seed=T)
    rows = T * K / E
    bms = [16] if rows <= 8 else [16, 32] if rows <= 32 else [32, 64] if rows <= 128 else [64, 128]
    cands = GU_SMALL if rows <= 32 else GU_LARGE
    best = None
    for bm in bms:
        cfg = {"BLOCK_M": bm, "GROUP_M": 1 if rows <= 16 else 8,
               "gate_up": dict(cands[0]), "down": dict(cands[0])}
        cur = None
        for kern in ("gate_up", "down"):
            for c in cands:
                trial = json.loads(json.dumps(cfg))
                trial[kern] = dict(c)
                os.environ[tuning.ENV] = json.dumps(trial)
                try:
                    t = time_ms(lambda: moe_lora_forward(x, w13, w2, ids, wts), rep=40)
                except Exception as exc:  # a config that does not compile or fit is skipped
                    log.write(f"sweep T={T} {json.dumps(trial)} failed: {exc!r}\n")
                    continue
                log.write(f"sweep T={T} {json.dumps(trial)} {t:.4f} ms\n")
                if cur is None or t < cur[0]:
                    cur = (t, trial)
            cfg = cur[1]
        if best is None or cur[0] < best[0]:
            best = cur
    os.environ.pop(tuning.ENV, None)
    return best


def sweep_shrink(T, w13, w2, base_cfg, slots, tl_, log):
    x, ids, wts = make_inputs(T, seed=T)
    best = None
    small = T * K / E <= 16
    cands = ([(16, 128, 256, 4), (16, 128, 512, 4), (16, 64, 128, 4), (16, 128, 1024, 4)] if small else
             [(32, 128, 0, 4), (64, 128, 0, 4), (16, 128, 0, 4), (64, 64, 0, 4), (32, 128, 512, 4)])
    for bm, bk, split, w in cands:
        c = dict(BLOCK_M=bm, BLOCK_K=bk, SPLIT_K=split, num_warps=w, num_stages=2)
        trial = dict(base_cfg, shrink=c)
        os.environ[tuning.ENV] = json.dumps(trial)
        t = time_ms(lambda: moe_lora_forward(x, w13, w2, ids, wts, slots, tl_), rep=50)
        log.write(f"shrink T={T} {json.dumps(c)} {t:.4f} ms\n")
        if best is None or t < best[0]:
            best = (t, c)
    os.environ.pop(tuning.ENV, None)
    return best[1]


def run_sweep(w13, w2, lora, out_dir, log):
    table = {}
    for T in TS:
        t, cfg = sweep_T(T, w13, w2, log)
        slots, _, tl_ = lora(T, 4, 16)
        cfg["shrink"] = sweep_shrink(T, w13, w2, cfg, slots, tl_, log)
        table[str(T)] = cfg
        print(f"sweep T={T}: {t:.4f} ms {json.dumps(cfg)}", flush=True)
    key = tuning.shape_key(E, H, I, K, "bfloat16")
    path = Path(__file__).resolve().parents[1] / "runtime" / "configs" / "h200.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = table
    text = json.dumps(data, indent=1, sort_keys=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)  # the device copy of the tree uses it from here on
    (out_dir / "h200.json").write_text(text)
    tuning._table.cache_clear()


# ----------------------------------------------------------------------------- autotune (pins)
# greedy: each pin merged on top of the best so far, kept if it is > 1.5% faster (graph time)
BASE_PINS = {  # run 6 (2026-11-28) tried SUM_IN_DOWN at 512..8192 and 4 down / 1 gate_up configs at 2048/8192
    8192: [{"down": dict(BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3)},
           {"down": {"GROUP_M": 32}}],
}
LORA_PINS = [{"GROUP_K": 64}]  # grouped expand against the default (one dot per run)


def _deep(base, pin):
    out = json.loads(json.dumps(base))
    for key, val in pin.items():
        if isinstance(val, dict):
            out.setdefault(key, {}).update(val)
        else:
            out[key] = val
    return out


def autotune(ts, w13, w2, lora, out_dir, log):
    path = Path(__file__).resolve().parents[1] / "runtime" / "configs" / "h200.json"
    data = json.loads(path.read_text())
    key = tuning.shape_key(E, H, I, K, "bfloat16")
    table = data[key]
    for T in ts:
        x, ids, wts = make_inputs(T, seed=T)
        entry = table[str(T)]

        def timed(trial, case):
            os.environ[tuning.ENV] = json.dumps(trial)
            try:
                if case is None:
                    return time_ms(lambda: moe_lora_forward(x, w13, w2, ids, wts), rep=60)
                slots, _, tl_ = lora(T, *case)
                return time_ms(lambda: moe_lora_forward(x, w13, w2, ids, wts, slots, tl_), rep=60)
            except Exception as exc:  # a config that does not compile or fit is skipped
                log.write(f"autotune T={T} {json.dumps(trial)} failed: {exc!r}\n")
                return float("inf")
            finally:
                os.environ.pop(tuning.ENV, None)

        best = timed(entry, None)
        line = f"autotune T={T} base {best:.4f}"
        for pin in BASE_PINS.get(T, []):
            trial = _deep(entry, pin)
            t = timed(trial, None)
            line += f" | {json.dumps(pin)} {t:.4f}"
            if t < best * 0.985:
                best, entry = t, trial
        if T > 1:
            cost = lambda e: timed(e, (4, 16)) * timed(e, (16, 64))  # noqa: E731
            cur = cost(entry)
            line += f" | lora {json.dumps({'GROUP_K': entry.get('GROUP_K', 0)})} {cur:.5f}"
            for pin in LORA_PINS:
                trial = _deep(entry, pin)
                t = cost(trial)
                line += f" | lora {json.dumps(pin)} {t:.5f}"
                if t < cur * 0.97:
                    cur, entry = t, trial
        table[str(T)] = entry
        log.write(line + "\n")
        print(line, flush=True)
    text = json.dumps(data, indent=1, sort_keys=True)
    path.write_text(text)
    (out_dir / "h200.json").write_text(text)
    tuning._table.cache_clear()


# ----------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true", help="tune configs first, write h200.json")
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--ts", default=",".join(map(str, TS)))
    ap.add_argument("--cases", default=";".join(f"{a}x{r}" for a, r in LORA_CASES))
    ap.add_argument("--fuse-probe", action="store_true", help="time FUSE on/off at T <= 128")
    ap.add_argument("--probe", action="store_true", help="time alternative BLOCK_M / routing paths")
    ap.add_argument("--autotune", default="", help="T values to autotune from BASE_PINS / LORA_PINS, e.g. 8,8192")
    ap.add_argument("--profile", default="", help="T values to profile per kernel, e.g. 1,128,8192")
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = open(out_dir / "bench_log.txt", "w")
    ts = [int(t) for t in args.ts.split(",")]
    cases = [tuple(map(int, c.split("x"))) for c in args.cases.split(";") if c]
    print(f"device {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    bw, rate = ceilings()
    print(f"copy {bw / 1e12:.3f} TB/s (read+write)   bf16 matmul 8192^3 {rate / 1e12:.1f} TFLOP/s", flush=True)
    w13, w2 = make_layer()
    pools = {}

    def lora(T, n, rank):
        if (n, rank) not in pools:
            ads = make_adapters(n, rank, seed=100 * n + rank)
            pools[(n, rank)] = (make_slots(ads, rank), ads)
        slots, ads = pools[(n, rank)]
        tl_ = (torch.arange(T, device=DEV) % n).to(torch.int32)
        return slots, ads, tl_

    if args.sweep:
        t0 = time.time()
        run_sweep(w13, w2, lora, out_dir, log)
        print(f"sweep took {time.time() - t0:.0f} s", flush=True)

    if args.autotune:
        t0 = time.time()
        autotune([int(t) for t in args.autotune.split(",")], w13, w2, lora, out_dir, log)
        print(f"autotune took {time.time() - t0:.0f} s", flush=True)
    if args.fuse_probe:
        fuse_probe(w13, w2, lora, log)
    if args.probe:
        probe(w13, w2, lora, log)
    for T in [int(t) for t in args.profile.split(",") if t]:
        profile(T, w13, w2, lora, out_dir)

    rows = []
    for T in ts:
        x, ids, wts = make_inputs(T, seed=T)
        fl, nbytes, flops, active = floor_s(T, ids, 0, 0, bw, rate)
        err = check(T, x, w13, w2, ids, wts, None, None, None)
        base = [time_ms(lambda: moe_lora_forward(x, w13, w2, ids, wts)) for _ in range(args.passes)]
        eager = time_ms(lambda: moe_lora_forward(x, w13, w2, ids, wts), graph=False)
        row = dict(T=T, active=active, floor_ms=fl * 1e3, base_ms=base, base_eager_ms=eager, base_err=err,
                   base_gbps=nbytes / (min(base) * 1e-3) / 1e9)
        for n, rank in cases:
            slots, ads, tl_ = lora(T, n, rank)
            lfl = floor_s(T, ids, n, rank, bw, rate)[0]
            err = check(T, x, w13, w2, ids, wts, slots, ads, tl_)
            lt = [time_ms(lambda: moe_lora_forward(x, w13, w2, ids, wts, slots, tl_))
                  for _ in range(args.passes)]
            le = time_ms(lambda: moe_lora_forward(x, w13, w2, ids, wts, slots, tl_), graph=False)
            row[f"{n}x{rank}"] = dict(ms=lt, eager_ms=le, err=err, floor_ms=lfl * 1e3,
                                      share=[b / t for b, t in zip(base, lt)])
            if (n, rank) == (4, 16) and T <= 128:
                slots_, ads_, tl2 = lora(T, n, rank)
                row["ref_ms_4x16"] = time_ms(lambda: moe_reference_vectorized(
                    x, w13, w2, ids, wts, ads_, tl2), graph=False, rep=20)
        rows.append(row)
        log.write(json.dumps(row) + "\n")
        log.flush()
        print(fmt_row(row, cases), flush=True)
    (out_dir / "bench_runtime.json").write_text(json.dumps(dict(
        device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        copy_tbps=bw / 1e12, mm_tflops=rate / 1e12, rows=rows), indent=1))
    print_table(rows, cases, bw, rate)


def fuse_probe(w13, w2, lora, log):
    """Decode path choice: LoRA shrinks fused in the base K loops vs separate shrink kernels."""
    for T in (1, 8, 32, 128):
        x, ids, wts = make_inputs(T, seed=T)
        base = time_ms(lambda: moe_lora_forward(x, w13, w2, ids, wts))
        line = f"fuse-probe T={T} base {base:.4f}"
        for n, rank in ((4, 16), (16, 64)):
            slots, _, tl_ = lora(T, n, rank)
            for fuse in (False, True):
                os.environ[tuning.ENV] = json.dumps({"FUSE": fuse})
                t = time_ms(lambda: moe_lora_forward(x, w13, w2, ids, wts, slots, tl_))
                line += f" | {n}x r{rank} fuse={int(fuse)} {t:.4f} ({base / t:.2f})"
        os.environ.pop(tuning.ENV, None)
        log.write(line + "\n")
        print(line, flush=True)


def probe(w13, w2, lora, log):
    """Half the tuned BLOCK_M for LoRA at large T; one-program vs multi-kernel routing at small T."""
    from runtime import routing
    for T in (512, 2048, 8192):
        x, ids, wts = make_inputs(T, seed=T)
        bm = tuning.get_config(T, E, H, I, K, "bfloat16", torch.cuda.get_device_name())["gate_up"]["BLOCK_M"]
        line = f"probe T={T}"
        for n, rank in ((4, 16), (16, 64)):
            slots, _, tl_ = lora(T, n, rank)
            for pin in ({}, {"BLOCK_M": bm // 2}):
                os.environ[tuning.ENV] = json.dumps(pin)
                t = time_ms(lambda: moe_lora_forward(x, w13, w2, ids, wts, slots, tl_))
                line += f" | {n}x r{rank} BM={pin.get('BLOCK_M', bm)} {t:.4f}"
        os.environ.pop(tuning.ENV, None)
        log.write(line + "\n")
        print(line, flush=True)
    for T in (8, 32, 128, 256):
        x, ids, wts = make_inputs(T, seed=T)
        slots, _, tl_ = lora(T, 4, 16)
        line = f"probe routing T={T}"
        for small in (True, False):
            routing.SMALL_P = 10 ** 9 if small else 0
            tb = time_ms(lambda: moe_lora_forward(x, w13, w2, ids, wts))
            tl4 = time_ms(lambda: moe_lora_forward(x, w13, w2, ids, wts, slots, tl_))
            line += f" | one_program={int(small)} base {tb:.4f} 4x r16 {tl4:.4f}"
        routing.SMALL_P = 2048
        log.write(line + "\n")
        print(line, flush=True)


def profile(T, w13, w2, lora, out_dir):
    """Per-kernel device time of one eager forward (base, 4x r16, 16x r64), torch.profiler."""
    x, ids, wts = make_inputs(T, seed=T)
    for name, n, rank in (("base", 0, 0), ("4x16", 4, 16), ("16x64", 16, 64)):
        args = (x, w13, w2, ids, wts) + ((lora(T, n, rank)[0], lora(T, n, rank)[2]) if n else ())
        for _ in range(3):
            moe_lora_forward(*args)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                moe_lora_forward(*args)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)
        (out_dir / f"profile_T{T}_{name}.txt").write_text(table)
        print(f"profile T={T} {name} (5 calls)\n" + "\n".join(table.splitlines()[:14]), flush=True)


def fmt_row(r, cases):
    parts = [f"T={r['T']:5d} base {min(r['base_ms']):.4f} ms ({r['base_ms'][0]:.4f}/{r['base_ms'][-1]:.4f})"
             f" floor {r['floor_ms']:.4f} x{min(r['base_ms']) / r['floor_ms']:.2f} eager {r['base_eager_ms']:.4f}"
             f" err {r['base_err']:.1e}"]
    for n, rank in cases:
        c = r[f"{n}x{rank}"]
        parts.append(f"  {n}x r{rank}: {min(c['ms']):.4f} ms share {min(c['share']):.2f}-{max(c['share']):.2f}"
                     f" eager {c['eager_ms']:.4f} x_floor {min(c['ms']) / c['floor_ms']:.2f} err {c['err']:.1e}")
    return "\n".join(parts)


def print_table(rows, cases, bw, rate):
    print(f"\ncopy {bw / 1e12:.2f} TB/s, matmul {rate / 1e12:.0f} TFLOP/s; graph-replay medians, L2 flushed")
    head = "| T | experts | floor ms | base ms | base/floor | base eager ms |" + "".join(
        f" {n}x r{r} ms | share |" for n, r in cases) + " max rel err |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        b = sum(r["base_ms"]) / len(r["base_ms"])
        line = (f"| {r['T']} | {r['active']} | {r['floor_ms']:.4f} | {b:.4f} | {b / r['floor_ms']:.2f} |"
                f" {r['base_eager_ms']:.4f} |")
        errs = [r["base_err"]]
        for n, rank in cases:
            c = r[f"{n}x{rank}"]
            t = sum(c["ms"]) / len(c["ms"])
            line += f" {t:.4f} | {b / t:.2f} |"
            errs.append(c["err"])
        print(line + f" {max(errs):.1e} |")


if __name__ == "__main__":
    main()
