"""A mixture of prepared data sets (`data.sources`), indexed like one list of examples.

Each source gets a fixed number of places in the mixture: its weight's share of the sources'
examples taken together, or `epochs` times its own size. A source with more places than examples
is repeated whole (`places // size` times) and the remainder is a seeded choice of distinct
examples; one with fewer is a seeded subsample. The places are laid out source after source; the
trainer's sampler shuffles the whole mixture each epoch with its seed, so any stretch of training
sees each source at its share, and the position it checkpoints (seed, epoch, consumed) resumes
the mixture exactly, with any number of workers. The layout depends only on the sources' sizes,
their weights and the seed: every worker computes the same one, and it pickles as those numbers.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def mixture_counts(sizes: list[int], weights: list[float | None], epochs: list[float | None]) -> list[int]:
    """Places of each source: `epochs` x size, or the weight's share of the weighted sources'
    examples taken together."""
    weighted = [i for i, w in enumerate(weights) if w is not None]
    pool = sum(sizes[i] for i in weighted)
    total_w = sum(weights[i] for i in weighted) or 1.0  # type: ignore[misc]
    out = []
    for size, w, e in zip(sizes, weights, epochs):
        places = round(e * size) if e is not None else round(w / total_w * pool)  # type: ignore[operator]
        out.append(max(1, places) if size else 0)
    return out


class MixedSplit:
    """Sources (each indexable: PreparedSplit or list) with `counts` places each."""

    def __init__(self, parts: list[Any], counts: list[int], seed: int) -> None:
        self.parts, self.counts, self.seed = parts, [int(c) for c in counts], seed
        self.ends = np.cumsum(self.counts)
        self._extra: list[np.ndarray] | None = None

    def __reduce__(self) -> tuple:
        return (MixedSplit, (self.parts, self.counts, self.seed))

    def _extras(self) -> list[np.ndarray]:
        """Per source, the examples of its partial pass (seeded, distinct, in order)."""
        if self._extra is None:
            self._extra = []
            for i, (part, count) in enumerate(zip(self.parts, self.counts)):
                size = len(part)
                rest = count % size if size else 0
                rng = np.random.default_rng([self.seed, i])
                self._extra.append(np.sort(rng.choice(size, rest, replace=False)) if rest else np.zeros(0, np.int64))
        return self._extra

    def label_tokens(self) -> int:
        """Tokens with a label over the mixture's places (a source's mean per example, times
        its places)."""
        total = 0.0
        for part, count in zip(self.parts, self.counts):
            if len(part):
                total += part.label_tokens() * count / len(part)
        return round(total)

    def source_of(self, i: int) -> tuple[int, int]:
        """(source, example within it) at mixture place `i`."""
        s = int(np.searchsorted(self.ends, i, side="right"))
        local = i - (int(self.ends[s - 1]) if s else 0)
        size = len(self.parts[s])
        full = (self.counts[s] // size) * size
        return s, local % size if local < full else int(self._extras()[s][local - full])

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return IndexView(self, range(*i.indices(len(self))))
        if not -len(self) <= i < len(self):
            raise IndexError(f"example {i} of {len(self)}")
        s, k = self.source_of(int(i) % len(self))
        return self.parts[s][k]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __bool__(self) -> bool:
        return len(self) > 0


class IndexView:
    """`base[indices]` without reading anything: what slicing a split gives."""

    def __init__(self, base: Any, indices: range) -> None:
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return IndexView(self.base, self.indices[i])
        return self.base[self.indices[i]]

    def __iter__(self):
        return (self.base[k] for k in self.indices)

    def __bool__(self) -> bool:
        return len(self) > 0
