"""Offset reads: a parameter's slices read from the ranks' optimizer files with `pread`, straight
into the output tensor, so the resident set does not grow with the checkpoint."""

from __future__ import annotations

import os
import zipfile
from typing import Any, Iterator

import torch

from launcher.checkpoint import zero_stage3, zero_stage12
from launcher.checkpoint.safe_load import safe_load
from launcher.checkpoint.zero_meta import Layout, numel
from launcher.errors import UserError


class ShardSlices:
    """The ranks' optimizer files, read tensor slice by tensor slice.

    Each file is opened with `safe_load(mmap=True)` for its structure only; the bytes of a slice
    are then read with `pread` straight into the output tensor, at the file offset of the slice's
    storage (found from the mapping, checked against the zip directory). Nothing is read through
    the mapping, so the resident set does not grow with the checkpoint. If an offset cannot be
    established, slices are copied through the mapping instead, and the files are unmapped and
    reopened every `budget` bytes (pages read through a mapping stay resident while it lives).
    """

    def __init__(self, layout: Layout, budget: int) -> None:
        self.layout = layout
        self.budget = budget
        self.read = 0
        self._open: dict[int, dict] = {}
        self._fds: dict[int, int] = {}
        self._base: dict[int, int | None] = {}

    def flat(self, rank: int, key: str, group: int) -> torch.Tensor:
        """Rank `rank`'s flat tensor `group` of `key` ('fp32' or an optimizer state key)."""
        osd = self._open.get(rank)
        if osd is None:
            osd = self._open[rank] = safe_load(self.layout.optim_files[rank])["optimizer_state_dict"]
        fmt = zero_stage3 if self.layout.meta.zero_stage == 3 else zero_stage12
        return fmt.flat(osd, key, group)

    def _file_base(self, rank: int) -> int | None:
        """Address of byte 0 of rank `rank`'s file in its mapping, or None if unknown."""
        if rank in self._base:
            return self._base[rank]
        base = None
        try:
            path = self.layout.optim_files[rank]
            self.flat(rank, "fp32", 0)
            ptrs = [t.untyped_storage().data_ptr() for t in _tensors(self._open[rank]) if t.untyped_storage().nbytes()]
            with zipfile.ZipFile(path) as z, open(path, "rb") as f:
                offsets = []
                for zi in z.infolist():
                    if "/data/" in zi.filename and zi.compress_type == zipfile.ZIP_STORED and zi.file_size:
                        f.seek(zi.header_offset)
                        head = f.read(30)
                        offsets.append(zi.header_offset + 30 + int.from_bytes(head[26:28], "little")
                                       + int.from_bytes(head[28:30], "little"))
            if ptrs and offsets and len(set(ptrs)) == len(offsets):
                base = min(ptrs) - min(offsets)
                if {p - base for p in ptrs} != set(offsets):
                    base = None
        except (OSError, zipfile.BadZipFile, KeyError, IndexError):
            base = None
        self._base[rank] = base
        if base is not None:
            self._fds[rank] = os.open(self.layout.optim_files[rank], os.O_RDONLY)
        return base

    def count(self, nbytes: int) -> None:
        self.read += nbytes
        if self.read >= self.budget:
            self.reset(keep_fds=True)

    def reset(self, keep_fds: bool = False) -> None:
        self._open.clear()
        self.read = 0
        if not keep_fds:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._base.clear()

    def gather(self, name: str, key: str) -> torch.Tensor:
        parts = self.layout.frags[name]
        shape = self.layout.meta.param_shapes[name]
        out = torch.empty(numel(shape), dtype=torch.float32)
        for p in parts:
            src = self.flat(p.rank, key, p.group)
            base = self._file_base(p.rank)
            dst = out.narrow(0, p.dest, p.numel)
            if base is not None and src.dtype == torch.float32 and src.is_contiguous():
                offset = src.untyped_storage().data_ptr() + (src.storage_offset() + p.start) * 4 - base
                _pread_into(self._fds[p.rank], dst, offset)
            else:
                dst.copy_(src.narrow(0, p.start, p.numel))
                self.count(p.numel * src.element_size())
        return out.view(shape)


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _pread_into(fd: int, dst: torch.Tensor, offset: int) -> None:
    view = memoryview(dst.numpy()).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise UserError(f"checkpoint file ended early at byte {offset + done}: the file is truncated")
        done += n
