"""The prepared-dataset format: token sequences in flat memory-mapped files.

A split directory holds

- `tokens.bin`: every example's token ids back to back, `uint16` (vocabularies up to 65,536) or
  `uint32`;
- `flags.bin`: one `uint8` per token: bit 0 set when the token is its own label (clear: label
  -100, a masked prompt or a sequence start), bit 1 set where position ids restart at 0 (a
  document start inside a packed sequence); bit 2 on the first token of a preference pair's
  second (rejected) sequence; bit 3 on the first token of a desirable KTO example;
- `offsets.bin`: `int64`, example i is tokens[offsets[i]:offsets[i+1]];
- `split.json`: dtype, counts, whether examples are packed (carry `position_ids`), and `kind`
  for preference data: `pairs` (an example is its chosen and rejected sequences back to back)
  or `kto` (one sequence and its desirable flag).

`PreparedSplit` reads one like the list of example dicts the trainer has always indexed
(`len(split)`, `split[i]` -> `{"input_ids", "labels", "position_ids"}`), opening the files by
memory map: a worker holds only the pages it reads. It pickles as its path, so sending it to a
Ray worker sends a few bytes, never the tokens.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

IGNORE_INDEX = -100
LABEL, RESTART, SECOND, DESIRABLE = 1, 2, 4, 8
"""Bits of flags.bin."""

TOKENS, FLAGS, OFFSETS, SPLIT_INFO = "tokens.bin", "flags.bin", "offsets.bin", "split.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class SplitWriter:
    """Appends examples (token ids with their flags) to a new split directory."""

    def __init__(self, path: Path, vocab_size: int, *, packed: bool, kind: str | None = None) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.dtype = token_dtype(vocab_size)
        self.packed = packed
        self.kind = kind
        self._tokens = open(path / TOKENS, "wb")
        self._flags = open(path / FLAGS, "wb")
        self._offsets: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]
        self.num_tokens = 0
        self.label_tokens = 0

    def write(self, ids: np.ndarray, flags: np.ndarray, lengths: np.ndarray) -> None:
        """Append whole examples lying back to back in `ids`/`flags`, `lengths` tokens each."""
        if int(np.sum(lengths)) != len(ids):
            raise ValueError("ids and lengths disagree")
        start = self.num_tokens
        self.append(ids, flags)
        self.mark_ends(start + np.cumsum(lengths, dtype=np.int64))

    def append(self, ids: np.ndarray, flags: np.ndarray) -> None:
        """Append tokens; `mark_ends` says where examples end."""
        if len(ids) != len(flags):
            raise ValueError("ids and flags disagree")
        self._tokens.write(np.ascontiguousarray(ids, dtype=self.dtype).tobytes())
        self._flags.write(np.ascontiguousarray(flags, dtype=np.uint8).tobytes())
        self.num_tokens += len(ids)
        self.label_tokens += int(np.count_nonzero(np.asarray(flags) & LABEL))

    def mark_ends(self, ends: np.ndarray) -> None:
        """Examples end at these absolute token counts (ascending, after the last end marked)."""
        if len(ends):
            self._offsets.append(np.asarray(ends, dtype=np.int64))

    def close(self) -> dict[str, Any]:
        """Flush everything to disk (fsync) and return the split's description."""
        offsets = np.concatenate(self._offsets)
        for f in (self._tokens, self._flags):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        with open(self.path / OFFSETS, "wb") as f:
            f.write(offsets.tobytes())
            f.flush()
            os.fsync(f.fileno())
        info = {"dtype": self.dtype.name, "examples": len(offsets) - 1, "tokens": self.num_tokens,
                "label_tokens": self.label_tokens, "packed": self.packed}
        if self.kind:
            info["kind"] = self.kind
        write_json(self.path / SPLIT_INFO, info)
        return info


def write_json(path: Path, value: Any) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(value, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_examples(path: Path, examples: list[dict], vocab_size: int) -> dict[str, Any]:
    """A split from in-memory example dicts (what `pipeline.build_datasets` makes)."""
    packed = bool(examples) and examples[0].get("position_ids") is not None
    kind = None if not examples else "pairs" if "rejected_input_ids" in examples[0] else "kto" if "desirable" in examples[0] else None
    w = SplitWriter(path, vocab_size, packed=packed, kind=kind)
    for ex in examples:
        second = len(ex["input_ids"])
        ids = np.asarray(ex["input_ids"] + ex.get("rejected_input_ids", []), dtype=np.int64)
        flags = (np.asarray(ex["labels"] + ex.get("rejected_labels", [])) != IGNORE_INDEX).astype(np.uint8) * LABEL
        if packed:
            flags |= (np.asarray(ex["position_ids"]) == 0).astype(np.uint8) * RESTART
        if kind == "pairs":
            flags[second] |= SECOND
        if ex.get("desirable"):
            flags[0] |= DESIRABLE
        w.write(ids, flags, np.array([len(ids)]))
    return w.close()


class PreparedSplit:
    """A prepared split, read by memory map; indexes like a list of example dicts."""

    def __init__(self, path: str | Path, index: np.ndarray | None = None) -> None:
        self.path = Path(path)
        self.index = index
        """Optional example numbers this view shows (a held-out subset, a mixture's share)."""
        self._maps: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self.info = json.loads((self.path / SPLIT_INFO).read_text())

    def __reduce__(self) -> tuple:
        return (PreparedSplit, (str(self.path), self.index))  # the path, never the tokens

    def _open(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._maps is None:
            n = self.info["tokens"]

            def view(name: str, dtype: Any, count: int) -> np.ndarray:
                if count == 0:  # np.memmap refuses empty files
                    return np.zeros(0, dtype=dtype)
                return np.memmap(self.path / name, dtype=dtype, mode="r", shape=(count,))

            self._maps = (view(TOKENS, self.info["dtype"], n), view(FLAGS, np.uint8, n),
                          view(OFFSETS, np.int64, self.info["examples"] + 1))
        return self._maps

    def __len__(self) -> int:
        return self.info["examples"] if self.index is None else len(self.index)

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            rows = np.arange(len(self))[i]
            return PreparedSplit._view(self, rows if self.index is None else self.index[rows])
        if not -len(self) <= i < len(self):
            raise IndexError(f"example {i} of {len(self)}")
        i %= len(self)
        return self.example(int(i if self.index is None else self.index[i]))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __bool__(self) -> bool:
        return len(self) > 0

    @staticmethod
    def _view(base: PreparedSplit, index: np.ndarray) -> PreparedSplit:
        view = PreparedSplit.__new__(PreparedSplit)
        view.path, view.info, view._maps, view.index = base.path, base.info, base._maps, index
        return view

    def example(self, k: int) -> dict[str, Any]:
        """Example number `k` of the files (ignoring `index`)."""
        tokens, flags, offsets = self._open()
        a, b = int(offsets[k]), int(offsets[k + 1])
        ids = tokens[a:b].astype(np.int64)
        f = flags[a:b]
        labels = np.where(f & LABEL, ids, IGNORE_INDEX)
        positions = None
        if self.info["packed"]:
            steps = np.arange(b - a)
            last_restart = np.maximum.accumulate(np.where(f & RESTART, steps, 0))
            positions = (steps - last_restart).tolist()
        kind = self.info.get("kind")
        if kind == "pairs":
            cut = int(np.flatnonzero(f & SECOND)[0])
            return {"input_ids": ids[:cut].tolist(), "labels": labels[:cut].tolist(), "position_ids": None,
                    "rejected_input_ids": ids[cut:].tolist(), "rejected_labels": labels[cut:].tolist()}
        example = {"input_ids": ids.tolist(), "labels": labels.tolist(), "position_ids": positions}
        if kind == "kto":
            example["desirable"] = bool(f[0] & DESIRABLE)
        return example

    def label_tokens(self) -> int:
        """Tokens with a label in the examples of this view. Reads the flags of the smaller of
        the view and its complement only: a large view over a few held-out sequences costs what
        those sequences cost, not a pass over the corpus."""
        total = int(self.info["label_tokens"])
        if self.index is None:
            return total
        n = self.info["examples"]
        if len(self.index) <= n // 2:
            return self._count_labels(self.index)
        return total - self._count_labels(np.setdiff1d(np.arange(n), self.index))

    def _count_labels(self, examples: np.ndarray) -> int:
        _, flags, offsets = self._open()
        return sum(int(np.count_nonzero(flags[offsets[k] : offsets[k + 1]] & LABEL)) for k in examples.tolist())

    def lengths(self) -> np.ndarray:
        """Tokens of every example of the view."""
        offsets = self._open()[2]
        sizes = np.diff(offsets)
        return sizes if self.index is None else sizes[self.index]
