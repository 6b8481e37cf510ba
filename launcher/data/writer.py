"""Tokenized rows (Arrow batches out of `encode.encode_batch`) -> a split's files, with the
sequence layout of packing.py computed on whole arrays instead of per token.

- SFT, unpacked: one example per row.
- SFT, packed: whole examples next-fit into sequences of at most `max_seq_len` (pack_examples).
- Text, packed: documents back to back, cut every `max_seq_len` tokens; position ids restart at
  every document start and every sequence start; a last sequence of one token is dropped
  (pack_documents).
- Text, unpacked: each document cut into chunks of `max_seq_len`; a chunk of one token has
  nothing to predict and is dropped (chunk_documents).

tests/test_data_prepared.py checks each against the in-memory functions, token by token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from launcher.data.store import DESIRABLE, IGNORE_INDEX, LABEL, RESTART, SECOND, SplitWriter


def _flat(column: Any) -> tuple[np.ndarray, np.ndarray]:
    """A pyarrow list column -> (values, lengths) as numpy arrays."""
    import pyarrow as pa

    col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = col.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
    values = col.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    return values, np.nan_to_num(lengths).astype(np.int64)


class _SftPacker:
    """Next-fit packing of whole SFT examples; the open sequence may span batches."""

    def __init__(self, writer: SplitWriter, max_seq_len: int) -> None:
        self.w, self.max_len, self.open = writer, max_seq_len, 0

    def add(self, ids: np.ndarray, labels: np.ndarray, lengths: np.ndarray) -> None:
        flags = np.where(labels != IGNORE_INDEX, LABEL, 0).astype(np.uint8)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        flags[starts] = RESTART  # a packed example's first label never counts
        base, ends = self.w.num_tokens, []
        pos = 0
        for n in lengths.tolist():
            if self.open and self.open + n > self.max_len:
                ends.append(base + pos)
                self.open = 0
            self.open += n
            pos += n
        self.w.append(ids, flags)
        self.w.mark_ends(np.array(ends, dtype=np.int64))

    def finish(self) -> None:
        if self.open:
            self.w.mark_ends(np.array([self.w.num_tokens]))


class _TextPacker:
    """Documents back to back, cut every `max_seq_len` tokens."""

    def __init__(self, writer: SplitWriter, max_seq_len: int) -> None:
        self.w, self.max_len = writer, max_seq_len

    def add(self, ids: np.ndarray, labels: np.ndarray, lengths: np.ndarray) -> None:
        base = self.w.num_tokens
        restart = np.zeros(len(ids), dtype=bool)
        restart[np.concatenate([[0], np.cumsum(lengths)[:-1]])] = True  # document starts
        restart[(-base) % self.max_len :: self.max_len] = True  # sequence starts
        flags = np.where(restart, RESTART, LABEL).astype(np.uint8)
        first = (base // self.max_len + 1) * self.max_len
        self.w.append(ids, flags)
        self.w.mark_ends(np.arange(first, self.w.num_tokens + 1, self.max_len, dtype=np.int64))

    def finish(self) -> None:
        tail = self.w.num_tokens % self.max_len
        if tail >= 2:  # a last sequence of one token has nothing to predict
            self.w.mark_ends(np.array([self.w.num_tokens]))


class _TextChunker:
    """Each document cut into chunks of `max_seq_len`; one-token chunks dropped."""

    def __init__(self, writer: SplitWriter, max_seq_len: int) -> None:
        self.w, self.max_len = writer, max_seq_len

    def add(self, ids: np.ndarray, labels: np.ndarray, lengths: np.ndarray) -> None:
        L = self.max_len
        drop_last = lengths % L == 1
        keep = np.ones(len(ids), dtype=bool)
        keep[(np.cumsum(lengths) - 1)[drop_last & (lengths > 0)]] = False
        kept = lengths - drop_last
        ids = ids[keep]
        base, ends, flags = self.w.num_tokens, [], np.full(len(ids), LABEL, dtype=np.uint8)
        start = 0
        for m in kept.tolist():
            chunk_starts = np.arange(start, start + m, L)
            flags[chunk_starts] = RESTART
            ends.append(np.minimum(chunk_starts + L, start + m) + base)
            start += m
        self.w.append(ids, flags)
        if ends:
            self.w.mark_ends(np.concatenate(ends))

    def finish(self) -> None:
        pass


def write_split(
    batches: Iterable[Any], writer: SplitWriter, *, text: bool, packing: bool, max_seq_len: int,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Write every example of `batches` (pyarrow tables with `input_ids`, `labels`, `_stats`)
    into `writer`; returns the `_stats` values. `on_batch(rows, tokens)` hears progress."""
    layout = _TextPacker if text and packing else _TextChunker if text else _SftPacker if packing else None
    packer = layout(writer, max_seq_len) if layout else None
    stats: list[str] = []
    for table in batches:
        ids, lengths = _flat(table["input_ids"])
        labels, _ = _flat(table["labels"])
        batch_stats = [s for s in table["_stats"].to_pylist() if s]
        stats += batch_stats
        real = lengths > 0
        lengths = lengths[real]  # the stats rows
        if len(ids):
            if packer is None:  # SFT (and preference data), unpacked
                flags = np.where(labels != IGNORE_INDEX, LABEL, 0).astype(np.uint8)
                if "_second" in table.column_names:
                    _mark_preference(flags, table, real, lengths)
                writer.write(ids, flags, lengths)
            else:
                packer.add(ids, labels, lengths)
        if on_batch:
            on_batch(sum(_rows(s) for s in batch_stats), len(ids))
    if packer is not None:
        packer.finish()
    return stats


def _mark_preference(flags: np.ndarray, table: Any, real: np.ndarray, lengths: np.ndarray) -> None:
    """Set SECOND where a pair's rejected sequence starts, DESIRABLE on a desirable KTO example."""
    starts = np.cumsum(lengths) - lengths
    second = np.asarray(table["_second"].to_numpy(zero_copy_only=False), dtype=np.int64)[real]
    desirable = np.asarray(table["_desirable"].to_numpy(zero_copy_only=False), dtype=np.int64)[real]
    flags[(starts + second)[second > 0]] |= SECOND
    flags[starts[desirable > 0]] |= DESIRABLE


def _rows(stats: str) -> int:
    import json

    return int(json.loads(stats).get("rows", 0))
