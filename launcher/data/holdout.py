"""Which rows (or sequences) are held out for evaluation: one choice for both data paths."""

from __future__ import annotations

import random

from launcher.recipe.sections import DataConfig


def held_out(n: int, fraction: float, seed: int) -> list[int]:
    """Sorted indices of the `fraction` of `n` rows held out for evaluation (at least one),
    chosen by `seed`."""
    n_eval = max(1, round(n * fraction))
    return sorted(random.Random(seed).sample(range(n), min(n_eval, n)))


def by_sequences(data: DataConfig, rows: int) -> bool:
    """Hold out evaluation sequences instead of rows: text with too few documents to hold out
    whole ones (fewer than one at `eval_fraction`)."""
    return bool(data.eval_fraction) and data.format == "text" and rows * data.eval_fraction < 1
