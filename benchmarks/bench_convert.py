"""CPU benchmark of `relayout convert` on a synthetic PEFT 3D adapter of real size, against plain safetensors I/O.

Source: a PEFT `target_parameters` adapter for a Qwen3-30B-A3B-sized model (48 layers, E=128, H=2048, I=768,
r=16, bf16, ~1.26 GB), generated once layer by layer into --workdir and reused. Tasks, each run in a fresh
subprocess (peak RSS per task from os.wait4), interleaved and repeated --repeats times:

  noop      python + torch + relayout imported, nothing done (the RSS floor of every task below)
  copy      shutil.copyfile of the source safetensors file (the pure I/O floor)
  baseline  safetensors.torch.load_file + save_file of the same tensors (what the ratios are relative to)
  io        relayout's reader + streaming writer, tensor by tensor, no relayout (relayout's own I/O floor)
  peft-2d   relayout convert SRC OUT --to peft-2d      (3D -> per-expert 2D)
  normalized relayout convert SRC OUT --to normalized  (3D -> stacked normalized)
  peft-3d   relayout convert SRC2D OUT --to peft-3d    (2D -> 3D, from the peft-2d output)

Before every run the input files are read once (so all runs read from the page cache) and `sync` flushes
the previous run's writes, both outside the timed region. The time reported is the operation inside the
child, after its imports; process wall time (with interpreter start and imports) is reported beside it.
Correctness is checked in the same run: normalized and peft-2d outputs of 2 random layers against an
independent torch computation from the source, every output header (keys, shapes, dtypes), and the
round trip 3D -> 2D -> 3D tensor by tensor over all layers.

Each child runs torch with 1 intra-op thread by default (--threads 0 for torch's default): on a small machine
shared with other jobs, parallel torch ops stall ~10x whenever another process holds a core.

    python3 benchmarks/bench_convert.py [--workdir /tmp/relayout-bench] [--repeats 3] [--tasks noop,...]
                                        [--threads 1] [--no-record] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
L, E, H, I, R, ALPHA = 48, 128, 2048, 768, 16, 32
PREFIX = "base_model.model.model.layers.{l}.mlp.experts."
SRC_NAME = "adapter-3d"
SECTION = "## convert: CPU conversion of a real-size adapter"
TASKS = ("noop", "copy", "baseline", "io", "peft-2d", "normalized", "peft-3d")


# ----------------------------------------------------------------------------- source adapter
def source_shapes() -> dict[str, tuple[int, int]]:
    """Per-layer relative key -> shape, PEFT 0.21.2 nesting: base_layer = gate_up_proj, outer = down_proj."""
    return {
        "base_layer.lora_A.weight": (E * R, H),      # gate_up A, (e r) h
        "base_layer.lora_B.weight": (2 * I, R * E),  # gate_up B, (two i) (r e)
        "lora_A.weight": (E * R, I),                 # down A, (e r) i
        "lora_B.weight": (H, R * E),                 # down B, h (r e)
    }


def adapter_config(model_dir: Path) -> dict:
    """adapter_config.json as PEFT 0.21.2 writes it for Qwen3-MoE with target_parameters only."""
    return {
        "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None,
        "auto_mapping": {"base_model_class": "Qwen3MoeForCausalLM",
                         "parent_library": "transformers.models.qwen3_moe.modeling_qwen3_moe"},
        "base_model_name_or_path": str(model_dir), "bias": "none", "corda_config": None,
        "ensure_weight_tying": False, "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "kasa_config": None, "layer_replication": None,
        "layers_pattern": None, "layers_to_transform": None, "loftq_config": {}, "lora_alpha": ALPHA,
        "lora_bias": False, "lora_dropout": 0.0, "lora_ga_config": None, "megatron_config": None,
        "megatron_core": "megatron.core", "modules_to_save": None, "monteclora_config": None, "peft_type": "LORA",
        "peft_version": "0.21.2", "qalora_group_size": 16, "r": R, "rank_pattern": {}, "revision": None,
        "target_modules": [], "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        "task_type": "CAUSAL_LM", "trainable_token_indices": None, "use_bdlora": None, "use_dora": False,
        "use_qalora": False, "use_rslora": False, "velora_config": None,
    }


def model_config() -> dict:
    return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "num_experts": E,
            "num_experts_per_tok": 8, "hidden_size": H, "moe_intermediate_size": I, "intermediate_size": 6144,
            "num_hidden_layers": L, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
            "vocab_size": 151936, "torch_dtype": "bfloat16"}


def generate(workdir: Path) -> Path:
    """Write the source adapter once (layer by layer, a streamed safetensors file); reuse it when complete."""
    import torch

    src, model_dir = workdir / SRC_NAME, workdir / "model"
    stamp = {"L": L, "E": E, "H": H, "I": I, "R": R, "alpha": ALPHA, "dtype": "BF16", "seed": 0}
    done = src / "bench_stamp.json"
    if done.is_file() and json.loads(done.read_text()) == stamp:
        return src
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(model_config(), indent=2) + "\n")
    (src / "adapter_config.json").write_text(json.dumps(adapter_config(model_dir), indent=2, sort_keys=True) + "\n")
    shapes = source_shapes()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for layer in range(L):
        for rel, shape in shapes.items():
            n = shape[0] * shape[1] * 2
            header[PREFIX.format(l=layer) + rel] = {"dtype": "BF16", "shape": list(shape),
                                                    "data_offsets": [offset, offset + n]}
            offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    t0 = time.perf_counter()
    tmp = src / "adapter_model.safetensors.partial"
    with tmp.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for layer in range(L):
            g = torch.Generator().manual_seed(layer)
            for rel, shape in shapes.items():
                t = (torch.randn(shape, generator=g) * 0.05).to(torch.bfloat16)
                t[t == 0] = 0.01  # random non-zero values
                f.write(t.view(torch.uint8).numpy().tobytes())
            print(f"\rgenerating source adapter: layer {layer + 1}/{L}", end="", file=sys.stderr, flush=True)
    tmp.rename(src / "adapter_model.safetensors")
    done.write_text(json.dumps(stamp))
    print(f"  ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return src


# ----------------------------------------------------------------------------- child side
def _vmhwm_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return -1


def child(task: str, threads: int, args: list[str]) -> None:
    """Run one task in this (fresh) process; print {"seconds", "cpu", "vmhwm_kb"} as the last stdout line."""
    import torch  # every task pays the same imports before the timer starts

    if threads:
        torch.set_num_threads(threads)
    import relayout.cli
    from safetensors.torch import load_file, save_file

    t0, c0 = time.perf_counter(), time.process_time()
    if task == "noop":
        pass
    elif task == "copy":
        shutil.copyfile(args[0], args[1])
    elif task == "baseline":
        save_file(load_file(args[0]), args[1], metadata={"format": "pt"})
    elif task == "io":  # relayout's own reader and streaming writer, tensor by tensor, nothing relaid
        from relayout.safetensors_io import StreamWriter, read_header, read_tensor

        infos, _ = read_header(Path(args[0]))
        writer = StreamWriter(Path(args[1]), {k: (i.dtype, i.shape) for k, i in infos.items()}, {"format": "pt"})
        for key, info in infos.items():
            writer.write(key, read_tensor(info))
        writer.close()
    elif task == "convert":
        rc = relayout.cli.main(args)
        if rc:
            raise SystemExit(f"relayout convert exited {rc}")
    else:
        raise SystemExit(f"unknown task {task}")
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(json.dumps({"seconds": seconds, "cpu": cpu, "vmhwm_kb": _vmhwm_kb()}))


# ----------------------------------------------------------------------------- parent side
def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in _files(path)) if path.exists() else 0


def warm(paths: list[Path]) -> None:
    """Read every input file once so the timed run reads from the page cache; flush earlier writes."""
    for p in paths:
        for f in _files(p):
            with f.open("rb") as fh:
                while fh.read(64 << 20):
                    pass
    os.sync()


def run_task(task: str, threads: int, child_args: list[str], inputs: list[Path], out: Path) -> dict:
    """One run in a fresh child: its operation time, wall time, ru_maxrss (of exactly that child, by os.wait4)."""
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
    warm(inputs)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", task, str(threads), "--", *child_args]
    out_log = out.parent / f".{out.name}.stdout"
    err_log = out.parent / f".{out.name}.stderr"
    with out_log.open("wb") as so, err_log.open("wb") as se:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    stdout, stderr = out_log.read_text(), err_log.read_text()
    out_log.unlink()
    err_log.unlink()
    if proc.returncode:
        raise SystemExit(f"{task} failed ({proc.returncode}):\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result.update(wall=wall, maxrss_kb=usage.ru_maxrss, out_bytes=_size(out))
    return result


# ----------------------------------------------------------------------------- correctness
def _header(path: Path) -> dict:
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def expected_normalized(src: dict) -> dict:
    """Independent torch computation of formats.md section 3 from one layer's PEFT 0.21.2 3D tensors."""
    a13 = src["base_layer.lora_A.weight"].view(E, R, H)                                # (e r) h -> e r h
    b13 = src["base_layer.lora_B.weight"].view(2, I, R, E).permute(0, 3, 1, 2)          # (two i) (r e) -> two e i r
    a2 = src["lora_A.weight"].view(E, R, I)                                             # (e r) i -> e r i
    b2 = src["lora_B.weight"].view(H, R, E).permute(2, 0, 1)                            # h (r e) -> e h r
    return {"w1.lora_a": a13, "w3.lora_a": a13, "w1.lora_b": b13[0], "w3.lora_b": b13[1],
            "w2.lora_a": a2, "w2.lora_b": b2}


def verify(src: Path, outs: dict[str, Path], layers: list[int]) -> list[str]:
    """Checks that each output holds the right tensors; returns lines for the report (raises on a mismatch)."""
    import torch
    from safetensors import safe_open

    lines = []
    src_file = src / "adapter_model.safetensors"
    with safe_open(str(src_file), "pt") as f:
        source = {l: {rel: f.get_tensor(PREFIX.format(l=l) + rel) for rel in source_shapes()} for l in layers}
    expected = {l: expected_normalized(source[l]) for l in layers}

    if "normalized" in outs:
        file = outs["normalized"] / "adapter_normalized.safetensors"
        header = _header(file)
        want = {f"layers.{l}.{t}" for l in range(L) for t in expected[layers[0]]}
        assert set(header) == want, f"normalized keys differ: {sorted(set(header) ^ want)[:5]}"
        with safe_open(str(file), "pt") as f:
            meta = json.loads(f.metadata()["relayout"])
            for l in layers:
                for t, ref in expected[l].items():
                    got = f.get_tensor(f"layers.{l}.{t}")
                    assert got.dtype == torch.bfloat16 and torch.equal(got, ref), f"normalized layers.{l}.{t} differs"
        scale = set(meta["scaling"].values())
        assert scale == {ALPHA / R}, f"normalized scaling {scale}"
        lines.append(f"normalized: {len(header)} keys; layers {layers} equal to the independent torch "
                     f"computation (bit-exact); scaling {scale.pop()}")

    if "peft-2d" in outs:
        file = outs["peft-2d"] / "adapter_model.safetensors"
        header = _header(file)
        proj = {"gate_proj": ("w1", (R, H), (I, R)), "up_proj": ("w3", (R, H), (I, R)), "down_proj": ("w2", (R, I), (H, R))}
        want = {}
        for l in range(L):
            for e in range(E):
                for name, (_, sa, sb) in proj.items():
                    want[f"{PREFIX.format(l=l)}{e}.{name}.lora_A.weight"] = list(sa)
                    want[f"{PREFIX.format(l=l)}{e}.{name}.lora_B.weight"] = list(sb)
        assert {k: v["shape"] for k, v in header.items()} == want, "peft-2d keys or shapes differ"
        with safe_open(str(file), "pt") as f:
            for l in layers:
                for e in range(E):
                    for name, (w, _, _) in proj.items():
                        for side in ("a", "b"):
                            got = f.get_tensor(f"{PREFIX.format(l=l)}{e}.{name}.lora_{side.upper()}.weight")
                            assert torch.equal(got, expected[l][f"{w}.lora_{side}"][e]), f"peft-2d {l}.{e}.{name}.{side}"
        cfg = json.loads((outs["peft-2d"] / "adapter_config.json").read_text())
        assert set(cfg["target_modules"]) >= {"gate_proj", "up_proj", "down_proj"} and not cfg.get("target_parameters")
        assert cfg["r"] == R and cfg["lora_alpha"] == ALPHA and not cfg.get("rank_pattern") and not cfg.get("alpha_pattern"), cfg
        lines.append(f"peft-2d: {len(header)} keys and shapes as expected; layers {layers} x {E} experts equal to "
                     f"the independent computation; config r={cfg['r']} alpha={cfg['lora_alpha']} "
                     f"target_modules={cfg['target_modules']}")

    if "peft-3d" in outs:
        file = outs["peft-3d"] / "adapter_model.safetensors"
        header, src_header = _header(file), _header(src_file)
        assert {k: (v["dtype"], v["shape"]) for k, v in header.items()} == \
               {k: (v["dtype"], v["shape"]) for k, v in src_header.items()}, "peft-3d keys/shapes differ from the source"
        with safe_open(str(file), "pt") as f, safe_open(str(src_file), "pt") as g:
            for key in g.keys():
                assert torch.equal(f.get_tensor(key), g.get_tensor(key)), f"round trip differs at {key}"
        cfg = json.loads((outs["peft-3d"] / "adapter_config.json").read_text())
        assert sorted(cfg["target_parameters"]) == sorted(adapter_config(Path())["target_parameters"]), cfg
        assert cfg["r"] == R and cfg["lora_alpha"] == ALPHA, cfg
        lines.append(f"peft-3d (from peft-2d): all {len(header)} tensors identical to the source "
                     f"(3D -> 2D -> 3D round trip), target_parameters {cfg['target_parameters']}")
    return lines


# ----------------------------------------------------------------------------- report
def machine() -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    mem = next(int(l.split()[1]) for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal"))
    return f"{os.cpu_count()} cores ({cpu}), {mem / 2**20:.1f} GiB RAM, {platform.system()} {platform.release()}"


def table(results: dict[str, list[dict]], src_bytes: int) -> str:
    base = statistics.median(r["seconds"] for r in results["baseline"])
    base_best = min(r["seconds"] for r in results["baseline"])
    floor_rss = statistics.median(r["maxrss_kb"] for r in results["noop"]) / 1024 if "noop" in results else 0
    layer_mb = src_bytes / L / 2**20
    rows = ["| task | time s (median) | spread s (min-max) | x baseline (median) | x baseline (best of each) "
            "| CPU s (median) | process wall s | peak RSS MiB | RSS above import floor MiB (source layers) | output MB |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for task, runs in results.items():
        secs = [r["seconds"] for r in runs]
        med = statistics.median(secs)
        rss = statistics.median(r["maxrss_kb"] for r in runs) / 1024
        above = rss - floor_rss
        out = statistics.median(r["out_bytes"] for r in runs) / 1e6
        cpu = statistics.median(r["cpu"] for r in runs)
        rows.append(f"| {task} | {med:.2f} | {min(secs):.2f}-{max(secs):.2f} | {med / base:.2f} | "
                    f"{min(secs) / base_best:.2f} | {cpu:.2f} | {statistics.median(r['wall'] for r in runs):.2f} | {rss:.0f} | "
                    f"{above:.0f} ({above / layer_mb:.1f}) | {out:.0f} |")
    return "\n".join(rows)


def record(text: str) -> None:
    """Put our section at the top of our part of RESULTS.md, older runs of ours below; others' sections untouched."""
    path = ROOT / "benchmarks" / "RESULTS.md"
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    if SECTION in old:
        head, tail = old.split(SECTION, 1)
        new = head + text.rstrip() + "\n\n" + SECTION + tail
    else:
        new = old.rstrip() + "\n\n" + text.rstrip() + "\n"
    path.write_text(new)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        return child(sys.argv[2], int(sys.argv[3]), sys.argv[5:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/relayout-bench"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads in each child (0: torch's default). 1 by default: on a small shared "
                         "machine, parallel torch ops stall whenever another process holds a core (10x swings)")
    ap.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    ap.add_argument("--keep", action="store_true", help="keep the outputs (default: delete all but the source)")
    args = ap.parse_args()
    tasks = [t for t in TASKS if t in args.tasks.split(",")]
    if "peft-3d" in tasks and "peft-2d" not in tasks:
        raise SystemExit("peft-3d converts the peft-2d output: include peft-2d")

    import torch

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    src = generate(work)
    src_file = src / "adapter_model.safetensors"
    src_bytes = src_file.stat().st_size
    model = work / "model" / "config.json"
    out = work / "out"
    out.mkdir(exist_ok=True)
    src2d = work / "src-2d"  # the first peft-2d output, the input of every peft-3d run
    conv = lambda s, o, fmt: ["convert", str(s), str(o), "--to", fmt, "--model-config", str(model), "-q"]
    specs = {
        "noop": ([], [], out / "noop"),
        "copy": ([str(src_file), str(out / "copy.safetensors")], [src], out / "copy.safetensors"),
        "baseline": ([str(src_file), str(out / "baseline.safetensors")], [src], out / "baseline.safetensors"),
        "io": ([str(src_file), str(out / "io.safetensors")], [src], out / "io.safetensors"),
        "peft-2d": (conv(src, out / "peft-2d", "peft-2d"), [src], out / "peft-2d"),
        "normalized": (conv(src, out / "normalized", "normalized"), [src], out / "normalized"),
        "peft-3d": (conv(src2d, out / "peft-3d", "peft-3d"), [src2d], out / "peft-3d"),
    }
    print(f"source: {src_file} ({src_bytes / 1e9:.2f} GB, {L} layers x {len(source_shapes())} tensors); "
          f"machine: {machine()}; torch {torch.__version__}", flush=True)
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    results: dict[str, list[dict]] = {t: [] for t in tasks}
    for rep in range(args.repeats):
        for task in tasks:
            child_args, inputs, target = specs[task]
            r = run_task("convert" if task in ("peft-2d", "normalized", "peft-3d") else task, args.threads,
                         child_args, inputs, target)
            results[task].append(r)
            print(f"rep {rep + 1}/{args.repeats} {task:10s} {r['seconds']:7.2f} s  cpu {r['cpu']:7.2f} s  wall {r['wall']:7.2f} s  "
                  f"peak RSS {r['maxrss_kb'] / 1024:7.0f} MiB  out {r['out_bytes'] / 1e6:7.0f} MB", flush=True)
            if task == "peft-2d" and not src2d.exists():
                shutil.copytree(target, src2d)
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    layers = sorted(random.Random(0).sample(range(L), 2))
    checks = verify(src, {t: specs[t][2] for t in ("normalized", "peft-2d", "peft-3d") if t in tasks}, layers)
    tab = table(results, src_bytes)
    command = "python3 benchmarks/bench_convert.py " + " ".join(sys.argv[1:])
    print("\n" + tab + "\n")
    print("\n".join("check: " + c for c in checks))
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "relayout"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    date = subprocess.run(["date"], capture_output=True, text=True).stdout.strip()
    relay_cmd = lambda t: "relayout " + " ".join(specs[t][0]).replace(str(work), "$W")
    text = "\n".join([
        SECTION, "",
        f"- date: {date}",
        f"- machine: {machine()}; no GPU (CPU conversion: compare ratios, absolute seconds depend on the host)",
        f"- torch {torch.__version__}, safetensors {__import__('safetensors').__version__}, "
        f"python {platform.python_version()}; torch threads per task: {args.threads or torch.get_num_threads()}; relayout at {rev}"
        + (f" (uncommitted changes in {', '.join(l.split()[-1] for l in dirty.splitlines())})" if dirty else ""),
        f"- command: `{command}`",
        f"- source: synthetic PEFT 0.21.2 `target_parameters` adapter, {L} layers, E={E}, H={H}, I={I}, r={R}, "
        f"alpha={ALPHA}, bf16, {src_bytes / 1e9:.2f} GB ({src_bytes / L / 2**20:.1f} MiB per layer)",
        f"- each task in a fresh subprocess, {args.repeats} runs interleaved; inputs read once before each run "
        "(page cache warm) and `sync` after the previous run, both untimed; time = the operation inside the child "
        "after imports; process wall adds interpreter start and imports; peak RSS = ru_maxrss of that child (wait4)",
        f"- load average (1, 5, 15 min) before {' '.join(load_before)}, after {' '.join(load_after)} "
        f"({os.cpu_count()} cores, shared with other jobs). This VM's page-cache writes vary several-fold from run to "
        "run for the same bytes (kernel time, not ours: relayout's plain reader+writer took 0.25-3.4 s for 1.26 GB "
        "in back-to-back runs), hence the spread and the best-of-runs ratio beside the median",
        "- tasks: noop = imports only (RSS floor); copy = shutil.copyfile of the source file (I/O floor); "
        "baseline = `safetensors.torch.load_file` + `save_file`; io = relayout's reader (`read_tensor`, into fresh "
        "memory, no mmap) and `StreamWriter`, tensor by tensor, nothing relaid (relayout's I/O floor); "
        + "; ".join(f"{t} = `{relay_cmd(t)}`" for t in ("peft-2d", "normalized", "peft-3d") if t in tasks)
        + " ($W = " + str(work) + ", peft-3d reads the peft-2d output)",
        "", tab, "",
        *("- check: " + c for c in checks), "",
    ])
    if not args.no_record:
        record(text)
        print(f"recorded in {ROOT / 'benchmarks' / 'RESULTS.md'}")
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(src2d, ignore_errors=True)


if __name__ == "__main__":
    main()
