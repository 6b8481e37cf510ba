"""Learning-rate schedules as multipliers of the peak rate (for torch's LambdaLR)."""

from __future__ import annotations

import math
from typing import Callable


def lr_multiplier(
    schedule: str, *, warmup_steps: int, total_steps: int, min_ratio: float
) -> Callable[[int], float]:
    """Linear warmup to 1, then `schedule` down to `min_ratio` at `total_steps`."""

    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        if schedule == "linear":
            return 1.0 - (1.0 - min_ratio) * progress
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f
