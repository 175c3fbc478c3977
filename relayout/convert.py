"""Adapter folder -> detect -> per-block relayout (streamed, layer by layer) -> a new adapter, written atomically."""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from relayout.adapter import Adapter, read_adapter
from relayout.detect import Block, Detected, detect
from relayout.errors import RelayoutError
from relayout.execute import forward, inverse
from relayout.outputs import (FORMATS, LATEST_PEFT, TargetBlock, normalized_shapes, output_specs, peft_config,
                              plan_target, projection_scaling, shares_gate_up_a)
from relayout.ruleset import load_rules
from relayout.safetensors_io import StreamWriter

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
NORMALIZED_FILE = "adapter_normalized.safetensors"


@dataclass
class Loaded:
    """An adapter with its detection result: what `relayout inspect` explains and `convert` consumes."""

    adapter: Adapter
    detected: Detected


def load_adapter(path: str | Path, arch: str | None = None, model_config: str | Path | None = None,
                 layout: str | None = None, rules: list[str | Path] = ()) -> Loaded:
    """Open an adapter folder and detect its architecture and per-block layouts (loads no tensor data)."""
    adapter = read_adapter(path)
    try:
        return Loaded(adapter, detect(load_rules(rules), adapter, arch, model_config, layout))
    finally:
        adapter.close()


class _Progress:
    """A one-line progress bar on a terminal (stderr), silent otherwise."""

    def __init__(self, total: int, enabled: bool | None):
        self.total, self.done, self.start = total, 0, time.monotonic()
        self.enabled = sys.stderr.isatty() if enabled is None else enabled

    def step(self, label: str) -> None:
        self.done += 1
        if self.enabled:
            width = 30
            fill = width * self.done // max(self.total, 1)
            sys.stderr.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} {label} "
                             f"{time.monotonic() - self.start:.1f}s")
            sys.stderr.write("\n" if self.done == self.total else "")
            sys.stderr.flush()


def _device(name: str) -> torch.device:
    """The --device to relayout on, checked up front: an unknown or unavailable one is a RelayoutError."""
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:  # torch raises AssertionError for CUDA in a CPU-only build
        raise RelayoutError(f"device {name!r} cannot be used: {exc}") from None
    return device


def _load_block(adapter: Adapter, block: Block, device: torch.device) -> dict[str, torch.Tensor]:
    return {rel: adapter.load(block.keys[rel]).to(device) for rel in block.plan.source_keys}


def _shared(adapter: Adapter, block: Block) -> bool:
    """Whether gate and up share A in this block (by construction, or equal per-expert tensors)."""
    if shares_gate_up_a(block.plan):
        return True
    if not {"gate", "up"} <= set(block.plan.units):
        return False
    a = {op.targets[0]: op.keys for op in block.plan.ops if op.targets[0] in ("w1.lora_a", "w3.lora_a")}
    read = lambda rel: adapter.read(block.keys[rel])  # noqa: E731 (the main pass checks the values)
    return all(torch.equal(read(g), read(u)) for g, u in zip(a["w1.lora_a"], a["w3.lora_a"]))


def _one_block_per_layer(loaded: Loaded) -> None:
    """The normalized layout is keyed by layer: two experts paths in one layer would write the same keys."""
    seen: dict[int, str] = {}
    for b in loaded.detected.blocks:
        if seen.setdefault(b.layer, b.experts) != b.experts:
            raise RelayoutError(f"{loaded.adapter.path}: layer {b.layer} has expert LoRAs at both '{seen[b.layer]}' "
                                f"and '{b.experts}'; the normalized layout holds one block per layer (peft-2d and "
                                f"peft-3d keep both)")


def iter_normalized(loaded: Loaded, device: str = "cpu", dtype: str | None = None):
    """Yield (layer, {proj: (lora_a, lora_b, scaling)}) block by block, in memory: what runtime.LoraSlots.load takes.

    proj is w1 (gate), w3 (up), w2 (down); lora_a (E, r, in), lora_b (E, out, r); scaling is not folded in.
    """
    if dtype is not None and dtype not in DTYPES:
        raise RelayoutError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    _one_block_per_layer(loaded)
    where = _device(device)
    try:
        for block in loaded.detected.blocks:
            normalized = forward(block.plan, _load_block(loaded.adapter, block, where))
            if dtype is not None:
                normalized = {k: v.to(DTYPES[dtype]) for k, v in normalized.items()}
            scales = projection_scaling(block)
            yield block.layer, {p: (normalized[f"{p}.lora_a"], normalized[f"{p}.lora_b"], scales[p]) for p in scales}
    finally:
        loaded.adapter.close()


def _normalized_metadata(loaded: Loaded) -> dict[str, str]:
    det = loaded.detected
    first = det.blocks[0].plan
    meta = {
        "format": "relayout-normalized", "version": 1,
        "architecture": det.rule.architectures[0], "rule": det.rule.name,
        "num_experts": first.size("e"), "hidden_size": first.size("h"), "intermediate_size": first.size("i"),
        "layers": [b.layer for b in det.blocks],
        "source_layouts": {str(b.layer): b.plan.layout for b in det.blocks},
        "scaling": {f"layers.{b.layer}.{p}": s for b in det.blocks for p, s in projection_scaling(b).items()},
        "rank": {f"layers.{b.layer}.{t.split('.')[0]}": shape[1] for b in det.blocks
                 for t, shape in normalized_shapes(b.plan).items() if t.endswith(".lora_a")},
        "shared_gate_up_a": {str(b.layer): shares_gate_up_a(b.plan) for b in det.blocks},
        "passthrough": det.passthrough,
        "source": str(loaded.adapter.path),
    }
    return {"relayout": json.dumps(meta)}


def _write(loaded: Loaded, targets: list[TargetBlock], file: Path, device: torch.device, dtype, metadata,
           progress: _Progress) -> None:
    adapter, det = loaded.adapter, loaded.detected
    out_dtype = dtype or adapter.dtype
    specs = {}
    for target in targets:
        specs.update(output_specs(target, out_dtype))
    prefix = "passthrough." if targets[0].plan is None else ""
    for key in det.passthrough:
        info = adapter.tensors[key]
        specs[prefix + key] = (out_dtype if info.dtype.is_floating_point else info.dtype, info.shape)
    writer = StreamWriter(file, specs, metadata)
    try:
        active = False
        for target in targets:
            normalized = forward(target.block.plan, _load_block(adapter, target.block, device), target.prefix,
                                 fresh=False)
            active = active or _any_active(normalized)
            outputs = normalized if target.plan is None else inverse(target.plan, normalized, target.prefix)
            for key in output_specs(target, out_dtype):
                writer.write(key, outputs[key.removeprefix(target.prefix)].to(out_dtype))
            progress.step(f"layer {target.block.layer}")
        for key in det.passthrough:
            tensor = adapter.load(key)
            writer.write(prefix + key, tensor.to(out_dtype) if tensor.is_floating_point() else tensor)
    finally:
        writer.file.close()
    writer.close()  # every header entry was written
    if not active:
        raise RelayoutError(f"{adapter.path}: every expert LoRA is zero (lora_A or lora_B all zeros in every block): "
                            f"the converted adapter would change nothing")


def _any_active(normalized: dict[str, torch.Tensor]) -> bool:
    """Whether some projection of a block has both factors non-zero (it changes the model)."""
    projections = dict.fromkeys(t.split(".")[0] for t in normalized)
    return any(bool(normalized[f"{p}.lora_a"].any() and normalized[f"{p}.lora_b"].any()) for p in projections)


def _prepare_out(out: Path, source: Path, force: bool) -> Path:
    if out.resolve() == source.resolve() or source.resolve() in out.resolve().parents:
        raise RelayoutError(f"{out}: the output must not be the input adapter or inside it")
    if out.exists() and not force:
        raise RelayoutError(f"{out}: already exists (pass --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.parent / f".{out.name}.relayout-tmp-{os.getpid()}"


def _commit(tmp: Path, out: Path) -> None:
    old = out.parent / f".{out.name}.relayout-old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    if old.is_dir():
        shutil.rmtree(old)
    elif old.exists():
        old.unlink()


def convert(adapter: str | Path | Loaded, out: str | Path, to: str, *, arch: str | None = None,
            model_config: str | Path | None = None, layout: str | None = None, device: str = "cpu",
            dtype: str | None = None, rules: list[str | Path] = (), peft_version: str = LATEST_PEFT,
            force: bool = False, progress: bool | None = None) -> Path:
    """Write `adapter` in format `to` (peft-2d, peft-3d or normalized) at `out`; all or nothing, input untouched."""
    if to not in FORMATS:
        raise RelayoutError(f"unknown output format {to!r}; choose one of {', '.join(FORMATS)}")
    if dtype is not None and dtype not in DTYPES:
        raise RelayoutError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    where = _device(device)
    loaded = adapter if isinstance(adapter, Loaded) else load_adapter(adapter, arch, model_config, layout, rules)
    if to == "normalized":
        _one_block_per_layer(loaded)
    out = Path(out)
    tmp = _prepare_out(out, loaded.adapter.path, force)
    try:
        targets = [plan_target(loaded.detected, b, to, to == "peft-3d" and _shared(loaded.adapter, b), peft_version)
                   for b in loaded.detected.blocks]
        file_out = tmp if to == "normalized" and out.suffix == ".safetensors" else None
        if file_out is None:
            tmp.mkdir()
        target_file = file_out or tmp / (NORMALIZED_FILE if to == "normalized" else "adapter_model.safetensors")
        metadata = _normalized_metadata(loaded) if to == "normalized" else {"format": "pt"}
        _write(loaded, targets, target_file, where, DTYPES.get(dtype), metadata,
               _Progress(len(targets), progress))
        if to != "normalized":
            config = peft_config(loaded.adapter, loaded.detected, targets, to, peft_version)
            (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise
    finally:
        loaded.adapter.close()
    return out
