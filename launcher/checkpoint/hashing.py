"""Checksums of checkpoint files, computed while the bytes are written (xxh3-128): a save never
reads its files back. Checkpoints written before (manifest format 1) carry sha256 sums, which
`digest_file` still checks."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable

import xxhash

HASH = "xxh3_128"
"""The checksum new manifests record: xxHash's 128-bit XXH3, several GB/s on one core (faster
than a disk writes), from the `xxhash` package."""
LEGACY_HASHES = ("sha256",)
_CHUNK = 8 * 1024 * 1024


def _new(algo: str) -> Any:
    if algo == HASH:
        return xxhash.xxh3_128()
    if algo in LEGACY_HASHES:
        return hashlib.new(algo)
    raise ValueError(f"unknown checksum {algo!r}")


def algo_of(entry: dict[str, Any]) -> str | None:
    """Which checksum a manifest entry carries (None: sizes only)."""
    for algo in (HASH, *LEGACY_HASHES):
        if algo in entry:
            return algo
    return None


class HashingWriter:
    """A binary file that hashes what goes through `write`; `close()` fsyncs it and returns
    `{"size", HASH}`. torch.save accepts it as its file object."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._f = open(self.path, "wb")
        self._h = xxhash.xxh3_128()
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._f.write(view)
        self._h.update(view)
        self.size += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        self._f.flush()

    def close(self, *, fsync: bool = True) -> dict[str, Any]:
        if not self._f.closed:
            self._f.flush()
            if fsync:
                os.fsync(self._f.fileno())
            self._f.close()
        return {"size": self.size, HASH: self._h.hexdigest()}

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> "HashingWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.abort()


def write_hashed(path: str | Path, data: bytes, *, fsync: bool = True) -> dict[str, Any]:
    """Write `data` to `path`; its size and checksum."""
    w = HashingWriter(path)
    try:
        w.write(data)
        return w.close(fsync=fsync)
    except BaseException:
        w.abort()
        raise


def digest_file(path: str | Path, algo: str = HASH, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Read a file and checksum it (verification, and the rare file a save did not write itself)."""
    h = _new(algo)
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
            if progress:
                progress(len(chunk))
    return {"size": size, algo: h.hexdigest()}
