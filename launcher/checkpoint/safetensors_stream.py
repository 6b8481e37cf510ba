"""Write safetensors files tensor by tensor, and the `model.safetensors.index.json` of a sharded
Hugging Face checkpoint.

The format: 8 bytes little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}` padded with
spaces to a multiple of 8, then the tensors' raw bytes back to back. Because the header only needs
names, shapes and dtypes, it is written first and each tensor's bytes follow as soon as the tensor
exists: no shard is ever assembled in memory.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from launcher.errors import UserError

DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
INDEX_FILE = "model.safetensors.index.json"

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def parse_size(size: str | int) -> int:
    """'5GB' -> 5*10**9, '500MB', '2GiB', '1.5GB', 1000 -> bytes (as Hugging Face counts them)."""
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(size), re.IGNORECASE)
        if not m:
            raise UserError(f"--max-shard-size {size!r}: expected a size such as 5GB, 500MB, 2GiB or bytes")
        value = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if value <= 0:
        raise UserError(f"--max-shard-size {size!r}: must be positive")
    return value


def plan_shards(specs: Iterable[TensorSpec], max_shard_size: str | int) -> list[list[TensorSpec]]:
    """Split tensors, kept in order, into shards of at most `max_shard_size` bytes of data.

    A tensor larger than the limit gets a shard of its own (as in `transformers`).
    """
    limit = parse_size(max_shard_size)
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards if shards[0] else []


def shard_names(count: int, prefix: str = "model") -> list[str]:
    return [f"{prefix}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def header_bytes(specs: list[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for s in specs:
        if s.dtype not in DTYPES:
            raise ValueError(f"{s.name}: dtype {s.dtype} cannot be stored in safetensors")
        header[s.name] = {"dtype": DTYPES[s.dtype], "shape": list(s.shape),
                          "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


class ShardWriter:
    """One safetensors file, written header first and then tensor by tensor in `specs` order.

    Writes to `path.tmp` and renames to `path` on `close()`, so a file under its final name is
    complete. Use as a context manager; an exception leaves no file behind.
    """

    def __init__(self, path: str | Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None):
        if sys.byteorder != "little":
            raise RuntimeError("safetensors stores little-endian data; this machine is big-endian")
        self.path = Path(path)
        self.specs = list(specs)
        self._next = 0
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._metadata = metadata
        self._places: dict[str, tuple[int, int]] | None = None
        self._lock = threading.Lock()
        self._written: set[int] = set()
        self._f = open(self._tmp, "wb")
        self._f.write(header_bytes(self.specs, metadata))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.specs):
            raise ValueError(f"{self.path.name}: unexpected tensor {name}: all tensors were written")
        spec = self.specs[self._next]
        if name != spec.name or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(
                f"{self.path.name}: expected {spec.name} {spec.shape} {spec.dtype}, got "
                f"{name} {tuple(tensor.shape)} {tensor.dtype}"
            )
        t = tensor.detach().cpu().contiguous()
        if t.numel():
            self._f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.specs):
            missing = next(s.name for i, s in enumerate(self.specs) if i not in self._written and i >= self._next
                           or (self._written and i not in self._written))
            self.abort()
            raise ValueError(f"{self.path.name}: closed before {missing} was written")
        self._f.close()  # no fsync: an export interrupted by a crash is simply run again
        os.replace(self._tmp, self.path)

    def write_at(self, name: str, tensor: torch.Tensor) -> None:
        """Write tensor `name` at its place in the file, in any order and from any thread (the
        header fixed every offset); `close()` checks that every tensor was written."""
        index, begin = self._offsets()[name]
        spec = self.specs[index]
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(f"{self.path.name}: expected {spec.name} {spec.shape} {spec.dtype}, got "
                             f"{name} {tuple(tensor.shape)} {tensor.dtype}")
        t = tensor.detach().cpu().contiguous()
        view = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
        done = 0
        while done < len(view):
            done += os.pwrite(self._f.fileno(), view[done:], begin + done)
        with self._lock:
            self._written.add(index)
            if len(self._written) == len(self.specs):
                self._next = len(self.specs)

    def _offsets(self) -> dict[str, tuple[int, int]]:
        with self._lock:
            if self._places is None:
                self._f.flush()  # the header, before any pwrite past it
                offset = len(header_bytes(self.specs, self._metadata))
                places = {}
                for i, spec in enumerate(self.specs):
                    places[spec.name] = (i, offset)
                    offset += spec.nbytes
                self._places = places
            return self._places

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_index(out_dir: str | Path, shards: dict[str, list[TensorSpec]], extra_weight_map: dict[str, str] | None = None,
                *, total_parameters: int | None = None) -> Path:
    """Write `model.safetensors.index.json`: `metadata.total_size` (bytes of tensor data) and
    `weight_map` (tensor name -> file), as `transformers` reads it."""
    weight_map = {s.name: fname for fname, specs in shards.items() for s in specs}
    weight_map.update(extra_weight_map or {})
    metadata: dict[str, int] = {"total_size": sum(s.nbytes for specs in shards.values() for s in specs)}
    if total_parameters is not None:
        metadata["total_parameters"] = total_parameters
    index = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
    path = Path(out_dir) / INDEX_FILE
    path.write_text(json.dumps(index, indent=2) + "\n")
    return path
