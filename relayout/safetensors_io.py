"""Safetensors without mmap or pickle: a validating lazy reader and a streaming writer with bounded memory."""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from relayout.errors import RelayoutError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 << 20


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and absolute byte range."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header: every range inside the file, sizes matching shapes."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise RelayoutError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(MAX_HEADER, size - 8):
            raise RelayoutError(f"{path}: corrupt or truncated safetensors file (header of {n} bytes in a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RelayoutError(f"{path}: corrupt safetensors header: {exc}") from None
    if not isinstance(header, dict):
        raise RelayoutError(f"{path}: corrupt safetensors header (not an object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise RelayoutError(f"{path}: corrupt safetensors header (__metadata__ is not an object of strings)")
    infos = {}
    for key, entry in header.items():
        infos[key] = _info(path, key, entry, 8 + n, size)
    return infos, meta


def _info(path: Path, key: str, entry: dict, base: int, size: int) -> TensorInfo:
    try:
        dtype = DTYPES[entry["dtype"]]
        shape = tuple(int(d) for d in entry["shape"])
        begin, end = (int(x) for x in entry["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise RelayoutError(f"{path}: tensor {key!r}: unsupported or corrupt header entry {entry!r}") from None
    expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if min(shape, default=0) < 0:
        raise RelayoutError(f"{path}: tensor {key!r}: negative dimension in shape {list(shape)}")
    if end - begin != expected or begin < 0:
        raise RelayoutError(f"{path}: tensor {key!r}: {end - begin} bytes for shape {list(shape)} {entry['dtype']}, "
                            f"expected {expected}")
    if base + end > size:
        raise RelayoutError(f"{path}: truncated safetensors file: tensor {key!r} ends at byte {base + end}, "
                            f"the file has {size}")
    return TensorInfo(path, dtype, shape, base + begin, base + end)


def read_tensor(info: TensorInfo, handle: BinaryIO | None = None) -> torch.Tensor:
    """Read one tensor into fresh memory (no mmap: memory stays bounded by what the caller holds).

    handle: an open binary file of info.file to read through (saves an open per tensor); else one is opened.
    """
    if handle is None:
        with info.file.open("rb") as f:
            return read_tensor(info, f)
    out = torch.empty(info.shape, dtype=info.dtype)
    handle.seek(info.start)
    view = out.view(-1).view(torch.uint8).numpy() if out.numel() else None
    if view is not None and handle.readinto(view) != info.nbytes:
        raise RelayoutError(f"{info.file}: truncated while reading {info.shape} at byte {info.start}")
    return out


class StreamWriter:
    """Write a safetensors file whose header (keys, dtypes, shapes) is known up front, tensor by tensor in order."""

    def __init__(self, path: Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str]):
        self.order = list(specs)
        header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for key, (dtype, shape) in specs.items():
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[key] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.specs = specs
        self.file = path.open("wb")
        self.file.write(struct.pack("<Q", len(blob)) + blob)
        self.next = 0

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if self.next >= len(self.order) or self.order[self.next] != key:
            raise RuntimeError(f"internal: tensors written out of order at {key!r}")  # a bug, not a user error
        dtype, shape = self.specs[key]
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise RuntimeError(f"internal: {key!r} is {tensor.dtype} {list(tensor.shape)}, header says {dtype} {list(shape)}")
        data = tensor.detach().to("cpu").contiguous().view(-1)
        if data.numel():
            self.file.write(data.view(torch.uint8).numpy())  # the buffer itself: no bytes copy
        self.next += 1

    def close(self) -> None:
        missing = self.order[self.next:]
        self.file.close()
        if missing:
            raise RuntimeError(f"internal: {len(missing)} tensors never written, first {missing[0]!r}")
