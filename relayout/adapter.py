"""Adapter folders in: adapter_config.json + (sharded) safetensors, read lazily and checked, never unpickled."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from relayout.errors import RelayoutError
from relayout.safetensors_io import TensorInfo, read_header, read_tensor

PEFT_PREFIX = "base_model.model."
WEIGHTS = "adapter_model.safetensors"
INDEX = "adapter_model.safetensors.index.json"
PICKLES = ("adapter_model.bin", "adapter_model.pt", "pytorch_model.bin")


@dataclass
class Adapter:
    """A PEFT-style adapter on disk: its config and, per key, where each tensor lives (nothing loaded yet)."""

    path: Path
    config: dict
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    _handles: dict = field(default_factory=dict, repr=False, compare=False)

    def read(self, key: str) -> torch.Tensor:
        """Read one tensor as stored, through one open handle per shard (see close())."""
        info = self.tensors[key]
        if info.file not in self._handles:
            self._handles[info.file] = info.file.open("rb")
        return read_tensor(info, self._handles[info.file])

    def close(self) -> None:
        """Close the shard files read() opened; a later read() opens them again."""
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def load(self, key: str) -> torch.Tensor:
        """Read one tensor; NaN or Inf values are an error naming the key."""
        tensor = self.read(key)
        if tensor.is_floating_point() and tensor.numel():
            low, high = torch.aminmax(tensor)  # NaN propagates and +-Inf is an extreme: exact, and ~20x faster
            if not (torch.isfinite(low) and torch.isfinite(high)):  # than isfinite().all() on bf16
                bad = int((~torch.isfinite(tensor)).sum())
                raise RelayoutError(f"{self.path}: tensor '{key}' holds {bad} NaN/Inf value(s)")
        return tensor

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def dtype(self) -> torch.dtype:
        """The LoRA tensors' dtype (one, as read_adapter checks); the first tensor's if no key names a LoRA."""
        first = next(iter(self.tensors.values())).dtype
        return next((t.dtype for k, t in self.tensors.items() if ".lora_" in k), first)

    def scaling(self, module: str, rank: int) -> float:
        """PEFT's scale for a module (model-relative name): alpha / r, or alpha / sqrt(r) under rsLoRA."""
        alpha = _pattern_value(self.config.get("alpha_pattern") or {}, module, self.config.get("lora_alpha", 8))
        return alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank

    def rank(self, module: str) -> int:
        """The rank the config gives a module (rank_pattern, else r)."""
        return int(_pattern_value(self.config.get("rank_pattern") or {}, module, self.config.get("r", 8)))


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's get_pattern_key: the first pattern key matching `(.*\\.)?(key)$`."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_config(path: Path) -> dict:
    cfg = path / "adapter_config.json"
    if not cfg.is_file():
        raise RelayoutError(f"{path}: no adapter_config.json (is this a PEFT adapter folder?)")
    try:
        config = json.loads(cfg.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RelayoutError(f"{cfg}: not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise RelayoutError(f"{cfg}: expected a JSON object")
    _check_positive(cfg, "r", config.get("r", 1), integer=True)
    _check_positive(cfg, "lora_alpha", config.get("lora_alpha", 1), integer=False)
    for name, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        patterns = config.get(name) or {}
        if not isinstance(patterns, dict):
            raise RelayoutError(f"{cfg}: {name} must be an object mapping module patterns to numbers")
        for key, value in patterns.items():
            try:
                re.compile(key)
            except re.error as exc:
                raise RelayoutError(f"{cfg}: {name} key {key!r} is not a regular expression ({exc})") from None
            _check_positive(cfg, f"{name}[{key!r}]", value, integer)
    for name in ("peft_version", "base_model_name_or_path"):
        if not isinstance(config.get(name) or "", str):
            raise RelayoutError(f"{cfg}: {name} must be a string, got {config[name]!r}")
    for name, kinds in (("target_modules", (str, list)), ("target_parameters", (list,))):
        value = config.get(name) or []
        if not isinstance(value, kinds) or not all(isinstance(v, str) for v in value):
            raise RelayoutError(f"{cfg}: {name} must be {'a string or ' * (str in kinds)}a list of strings, "
                                f"got {value!r}")
    return config


def _check_positive(cfg: Path, name: str, value, integer: bool) -> None:
    """A rank (integer) or alpha (number) from adapter_config.json: positive, and not a bool."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not 0 < value < math.inf:
        raise RelayoutError(f"{cfg}: {name} must be a positive {'integer' if integer else 'number'}, got {value!r}")


def _shards(path: Path) -> list[Path]:
    if (path / WEIGHTS).is_file():
        return [path / WEIGHTS]
    if (path / INDEX).is_file():
        try:
            weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise RelayoutError(f"{path / INDEX}: not a safetensors index ({exc})") from None
        shards = [path / name for name in dict.fromkeys(weight_map.values())]
        missing = [str(s) for s in shards if not s.is_file()]
        if missing:
            raise RelayoutError(f"{path / INDEX}: shard(s) missing: {', '.join(missing)}")
        return shards
    pickles = [p for p in PICKLES if (path / p).exists()]
    if pickles:
        raise RelayoutError(
            f"{path / pickles[0]}: pickle checkpoints are never loaded (unpickling runs arbitrary code). "
            "If you trust the file, convert it once with: python -c \"import torch; from safetensors.torch import "
            f"save_file; save_file(torch.load('{pickles[0]}', weights_only=True), '{WEIGHTS}')\"")
    raise RelayoutError(f"{path}: no {WEIGHTS} (nor {INDEX})")


def _check_dtypes(path: Path, tensors: dict[str, TensorInfo]) -> None:
    by_dtype: dict[torch.dtype, str] = {}
    for key, info in tensors.items():
        if ".lora_" in key:
            by_dtype.setdefault(info.dtype, key)
    for dtype, key in by_dtype.items():
        if not dtype.is_floating_point:
            raise RelayoutError(f"{path}: tensor '{key}' is {str(dtype).removeprefix('torch.')}: LoRA tensors must be "
                                f"floating point")
    if len(by_dtype) > 1:
        listed = "; ".join(f"{str(d).removeprefix('torch.')} (e.g. '{k}')" for d, k in by_dtype.items())
        raise RelayoutError(f"{path}: LoRA tensors mix dtypes: {listed}; re-save the adapter in one dtype")


def read_adapter(path: str | Path) -> Adapter:
    """Open an adapter folder; checks structure, headers and dtypes, loads no tensor data."""
    path = Path(path)
    if not path.is_dir():
        raise RelayoutError(f"{path}: not an adapter folder")
    config = _read_config(path)
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    for shard in _shards(path):
        infos, meta = read_header(shard)
        metadata.update(meta)
        for key in infos.keys() & tensors.keys():
            raise RelayoutError(f"{shard}: tensor '{key}' also appears in {tensors[key].file}")
        tensors.update(infos)
    if not tensors:
        raise RelayoutError(f"{path}: the adapter holds no tensors")
    _check_dtypes(path, tensors)
    return Adapter(path, config, tensors, metadata)
