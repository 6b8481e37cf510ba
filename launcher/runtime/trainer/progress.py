"""What a run has done so far, saved with every checkpoint and restored on resume, and the
run directory's metrics file kept in step with it."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Progress:
    step: int = 0
    """The last step trained (0 before the first)."""
    tokens_seen: int = 0
    elapsed_before: float = 0.0
    """Seconds trained by the run's earlier attempts (before this resume)."""
    last_eval: float | None = None
    skipped_steps: int = 0
    """Steps whose update the optimizer skipped (fp16 overflow), over the whole run."""
    started: float = field(default_factory=time.time)

    def elapsed(self, now: float | None = None) -> float:
        return self.elapsed_before + (now or time.time()) - self.started

    def restore(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        self.last_eval = state.get("last_eval")
        self.skipped_steps = int(state.get("skipped_steps", 0))  # absent in older checkpoints

    def saved(self) -> dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "elapsed_s": self.elapsed(),
                "last_eval": self.last_eval, "skipped_steps": self.skipped_steps}


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metrics of steps after the checkpoint being resumed: they will be trained again."""
    from launcher.checkpoint.layout import atomic_write_text
    from launcher.runtime.metrics import METRICS_FILE, read_metrics

    path = run_dir / METRICS_FILE
    if not path.exists():
        return
    keep = [r for r in read_metrics(path) if r.get("step", 0) <= step and r.get("event") not in ("end", "preempted")]
    if step == 0:
        keep = []
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


def last_logged_loss(run_dir: Path) -> float | None:
    from launcher.runtime.metrics import METRICS_FILE, read_metrics

    losses = [r["loss"] for r in read_metrics(run_dir / METRICS_FILE) if r.get("loss") is not None and not r.get("eval")]
    return losses[-1] if losses else None


def jsonable_scheduler(state: dict[str, Any]) -> dict[str, Any]:
    """A scheduler state dict without its (unpicklable, recreated) lambdas."""
    return {k: v for k, v in state.items() if k != "lr_lambdas"}
