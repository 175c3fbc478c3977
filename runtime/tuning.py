"""Kernel configs: env pin (RELAYOUT_RUNTIME_CONFIG) -> tuned table (configs/<device>.json) -> heuristic default."""
import functools
import json
import math
import os
from pathlib import Path

from .errors import MoeLoraError

ENV = "RELAYOUT_RUNTIME_CONFIG"
_DIR = Path(__file__).with_name("configs")
GATE_UP_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
DOWN_KEYS = ("BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
SHRINK_KEYS = ("SPLIT_K", "num_warps", "num_stages")  # flat BLOCK_M/BLOCK_K name the GEMMs


def default_config(num_tokens, num_experts, top_k):
    """Heuristic for a GPU with no tuned entry: small blocks when experts see few rows."""
    rows = num_tokens * top_k / max(num_experts, 1)
    if rows <= 16:
        gu = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
        dn = dict(BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
    elif rows <= 64:
        gu = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=4, num_warps=4, num_stages=4)
        dn = dict(BLOCK_N=64, BLOCK_K=128, GROUP_M=4, num_warps=4, num_stages=4)
    else:
        gu = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)
        dn = dict(BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)
    split = 256 if rows <= 16 else 0  # decode: spread the shrink over K; 0 = whole K per program
    shrink = dict(BLOCK_M=16 if rows <= 16 else 32, BLOCK_K=128, SPLIT_K=split, num_warps=4, num_stages=2)
    # FUSE: LoRA shrinks inside the base K loops (no shrink launch) -- pays only while very few
    # experts are active: every N tile re-reads the adapter's A from L2 (measured on the H200)
    # DOWN_IN_GATE_UP: down shrink in the gate/up epilogue (one launch less): wins while blocks
    # hold few adapter runs (T <= 32 on the H200 at E=128, k=8), loses beyond
    # GROUP_K: the LoRA expand of a block's adapter runs as dots of K = GROUP_K (GROUP_K // rank runs
    # each, at most 4, one-hot columns) instead of one masked dot per run; 0 = one dot per run
    return {"gate_up": gu, "down": dn, "shrink": shrink, "FUSE": rows <= 0.125,
            "DOWN_IN_GATE_UP": rows <= 2, "GROUP_K": 0}


def shape_key(num_experts, hidden, inter, top_k, dtype_name):
    return f"E={num_experts},H={hidden},I={inter},k={top_k},{dtype_name}"


@functools.lru_cache(maxsize=None)
def _table(device_name):
    """Tuned table of a device, {} when none ships: keys shape_key -> {T bucket: config}."""
    name = "h200" if "H200" in device_name else device_name.lower().replace(" ", "_")
    path = _DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _merge(base, override):
    """Flat keys apply to every kernel they name; nested 'gate_up'/'down'/'shrink' win."""
    out = {kern: (dict(cfg) if isinstance(cfg, dict) else cfg) for kern, cfg in base.items()}
    for flag in ("FUSE", "DOWN_IN_GATE_UP"):
        if flag in override:
            out[flag] = bool(override[flag])
    if "GROUP_K" in override:
        out["GROUP_K"] = int(override["GROUP_K"])
    for kern, keys in (("gate_up", GATE_UP_KEYS), ("down", DOWN_KEYS), ("shrink", SHRINK_KEYS)):
        out[kern].update({k: v for k, v in override.items() if k in keys})
        out[kern].update(override.get(kern, {}))
    return out


def get_config(num_tokens, num_experts, hidden, inter, top_k, dtype_name, device_name):
    """Config for one forward: env pin > tuned table entry (nearest T bucket) > heuristic."""
    cfg = default_config(num_tokens, num_experts, top_k)
    entries = _table(device_name).get(shape_key(num_experts, hidden, inter, top_k, dtype_name))
    if entries:
        bucket = min(entries, key=lambda t: abs(math.log(int(t)) - math.log(num_tokens)))
        cfg = _merge(cfg, entries[bucket])
    pin = os.environ.get(ENV)
    if pin:
        try:
            cfg = _merge(cfg, json.loads(pin))
        except (json.JSONDecodeError, AttributeError) as exc:
            raise MoeLoraError(f"{ENV}={pin!r} is not a JSON object of config keys ({exc})") from None
    return cfg


def fit_fp32(cfg):
    """fp32 tiles take twice the shared memory of bf16 ones: halve BLOCK_K, at most 3 stages."""
    out = dict(cfg)
    for kern in ("gate_up", "down", "shrink"):
        c = dict(cfg[kern])
        c["BLOCK_K"] = max(16, min(c["BLOCK_K"], 64))
        c["num_stages"] = min(c.get("num_stages", 3), 3)
        out[kern] = c
    return out
