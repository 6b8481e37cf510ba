"""DeepSpeed pipeline checkpoints on disk: one `layer_XX-model_states.pt` per pipe layer."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from launcher.checkpoint.safe_load import safe_load
from launcher.errors import UserError

_PIPE_LAYER_RE = re.compile(r"^layer_(\d+)-model_states\.pt$")

def pipeline_layer_files(step_dir: str | Path) -> dict[int, Path]:
    """A pipeline checkpoint's `layer_XX-model_states.pt` files by layer index (empty: not a
    pipeline checkpoint). Each holds one pipe layer's full state dict (bit16 or fp32 weights, as
    the model trains); the optimizer's fp32 copies are in the per-stage optimizer files."""
    step_dir = Path(step_dir)
    if not step_dir.is_dir():
        raise UserError(f"{step_dir}: checkpoint directory does not exist")
    found = {}
    for p in step_dir.iterdir():
        m = _PIPE_LAYER_RE.match(p.name)
        if m:
            found[int(m.group(1))] = p
    return dict(sorted(found.items()))


def read_pipeline_layer(path: str | Path) -> dict[str, torch.Tensor]:
    """One pipe layer's state dict, through `safe_load` (memory-mapped)."""
    sd = safe_load(path)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path}: not a pipeline layer state dict (expected names -> tensors)")
    return sd
