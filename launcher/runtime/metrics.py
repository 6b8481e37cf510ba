"""Metric sinks on rank 0: metrics.jsonl (always), TensorBoard and W&B (when configured)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from launcher.recipe.convert import redact
from launcher.recipe.sections import LoggingConfig
from launcher.runtime.run_identity import wandb_run_id

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
    """Appends one JSON object per line and flushes it, so the driver can tail the file live."""

    def __init__(self, run_dir: Path, cfg: LoggingConfig, *, run_name: str, recipe: dict[str, Any]):
        self._file = open(run_dir / METRICS_FILE, "a", buffering=1)
        self._tb = None
        self._wandb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if cfg.wandb_project:
            import wandb  # checked by the driver's preflight

            self._wandb = wandb.init(
                project=cfg.wandb_project,
                entity=cfg.wandb_entity,
                name=run_name,
                dir=str(run_dir),
                config=redact(recipe),  # `${oc.env:...}` references, never the values
                resume="allow",
                id=wandb_run_id(run_dir),  # one per run directory, the same on every resume
            )

    def log(self, record: dict[str, Any]) -> None:
        # A diverged loss is inf or nan: written as null, so that the file stays strict JSON
        # (Python's json writes Infinity, which other readers refuse)
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        self._file.write(json.dumps(record) + "\n")
        step = record.get("step", 0)
        prefix = "eval/" if record.get("eval") else "train/"
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        scalars.pop("step", None)
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(prefix + k, v, step)
        if self._wandb is not None:
            self._wandb.log({prefix + k: v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All complete lines of a metrics file (a line being written is ignored)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
