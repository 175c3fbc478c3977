"""Normalized adapter file (relayout-normalized v1 safetensors) -> per-layer dict proj -> (lora_a, lora_b, scaling)."""
import json

from safetensors import safe_open

from .errors import NormalizedFormatError

FORMAT, VERSION = "relayout-normalized", 1
PROJS = ("w1", "w3", "w2")


def read_metadata(path):
    """The parsed `relayout` metadata JSON of a normalized file."""
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("relayout")
    if raw is None:
        raise NormalizedFormatError(f"{path}: no 'relayout' metadata key; not a normalized file")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise NormalizedFormatError(f"{path}: 'relayout' metadata is not JSON ({exc})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise NormalizedFormatError(f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}, "
                                    f"expected {FORMAT!r} version {VERSION}")
    return meta


def load_normalized_layer(path, layer, device=None, dtype=None):
    """Read one layer of a normalized file: dict proj -> (lora_a, lora_b, scaling).

    proj in w1 (gate), w3 (up), w2 (down); lora_a (E, r, in), lora_b (E, out, r); scaling a
    float from the metadata (not folded into the tensors). Projections the layer lacks are
    absent from the dict. The result feeds `LoraSlots.load` directly.
    """
    meta = read_metadata(path)
    if layer not in meta.get("layers", []):
        raise NormalizedFormatError(f"{path}: layer {layer} not in file layers {meta.get('layers')}")
    out = {}
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        for proj in PROJS:
            ka, kb = f"layers.{layer}.{proj}.lora_a", f"layers.{layer}.{proj}.lora_b"
            if ka not in keys and kb not in keys:
                continue
            if ka not in keys or kb not in keys:
                raise NormalizedFormatError(f"{path}: {ka if ka not in keys else kb} missing "
                                            f"while its pair is present")
            name = f"layers.{layer}.{proj}"
            if name not in meta.get("scaling", {}):
                raise NormalizedFormatError(f"{path}: no scaling for {name} in metadata")
            a, b = f.get_tensor(ka), f.get_tensor(kb)
            rank = meta.get("rank", {}).get(name)
            if rank is not None and (a.ndim != 3 or a.shape[1] != rank):
                raise NormalizedFormatError(f"{path}: {ka} has shape {tuple(a.shape)}, metadata rank is {rank}")
            if device is not None or dtype is not None:
                a, b = a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)
            out[proj] = (a, b, float(meta["scaling"][name]))
    if not out:
        raise NormalizedFormatError(f"{path}: layer {layer} has no lora tensors")
    return out
