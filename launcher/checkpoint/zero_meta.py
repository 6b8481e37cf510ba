"""What a DeepSpeed checkpoint step directory holds (ZeRO stage 0-3, DeepSpeed 0.19.x), read from
its small metadata only: parameter names, shapes and optimizer groups, and where each parameter's
fp32 slices lie in the ranks' optimizer files. The per-stage parsing lives in `zero_stage0`,
`zero_stage12` and `zero_stage3`; the file layouts are described there.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from launcher.checkpoint.safe_load import safe_load
from launcher.errors import UserError

_OPTIM_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
Z3_MODEL_RE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
STATE_KEYS = ("exp_avg", "exp_avg_sq")

@dataclass
class ZeroMeta:
    """What a checkpoint step holds, read from its small metadata only."""

    zero_stage: int
    dp_world_size: int
    param_shapes: dict[str, tuple[int, ...]]
    """Every parameter that owns its data (trainable and frozen), in the model's order; tied
    aliases are in `shared_params` instead."""
    param_groups: dict[str, int]
    """Optimizer param-group index of each trainable parameter (frozen ones are absent)."""
    shared_params: dict[str, str]
    """Tied weights: alias name -> the name whose data it shares (e.g. lm_head -> embed_tokens)."""
    buffer_names: list[str]
    frozen_params: list[str]
    optimizer_step: int | None
    """The optimizer's own step count (Adam's bias correction), from the saved optimizer state."""
    global_steps: int | None
    """The engine's step counter (`global_steps` in the model states)."""
    ds_version: str | None
    model_dtype: torch.dtype
    """dtype of the saved `module` weights (the training dtype: bf16, fp16 or fp32)."""
    state_keys: tuple[str, ...] = STATE_KEYS
    files: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Frag:
    rank: int
    group: int  # index of the flat tensor in the rank's file
    start: int  # offset in that flat tensor
    numel: int
    dest: int  # offset in the full parameter


@dataclass
class Layout:
    meta: ZeroMeta
    step_dir: Path
    model_file: Path  # rank 0's model states (stage 0-2: the only one)
    optim_files: list[Path]  # by rank; empty for stage 0
    frags: dict[str, list[Frag]]  # trainable parameters
    stage0_index: dict[str, int]  # stage 0: parameter -> index in the torch optimizer state


@dataclass
class Parsed:
    """What one on-disk format's parser finds (see `zero_layout.read_meta`)."""

    shapes: dict[str, tuple[int, ...]]
    groups: dict[str, int]
    frags: dict[str, list[Frag]]
    optimizer_step: int | None
    world: int
    stage0_index: dict[str, int] = field(default_factory=dict)
    shared: dict[str, str] | None = None


def model_files(step_dir: Path) -> tuple[list[Path], bool]:
    z3 = sorted(
        (p for p in step_dir.iterdir() if Z3_MODEL_RE.match(p.name)),
        key=lambda p: int(Z3_MODEL_RE.match(p.name).group(1)),
    )
    if z3:
        return z3, True
    single = step_dir / "mp_rank_00_model_states.pt"
    if single.is_file():
        return [single], False
    raise UserError(
        f"{step_dir}: no DeepSpeed model states (mp_rank_00_model_states.pt or "
        "zero_pp_rank_*_mp_rank_00_model_states.pt): not a DeepSpeed checkpoint directory"
    )


def optim_files(step_dir: Path) -> list[Path]:
    found: dict[int, Path] = {}
    for p in step_dir.iterdir():
        m = _OPTIM_RE.match(p.name)
        if not m:
            continue
        if int(m.group(2)) != 0:
            raise UserError(f"{p}: tensor-parallel checkpoints (mp_rank > 0) are not supported")
        found[int(m.group(1))] = p
    if found and sorted(found) != list(range(len(found))):
        raise UserError(f"{step_dir}: optimizer files for ranks {sorted(found)}: some ranks are missing")
    return [found[r] for r in range(len(found))]


def stage_of(model_sd: dict, optim_sd: dict | None) -> int:
    if optim_sd is not None and "zero_stage" in optim_sd:
        return int(optim_sd["zero_stage"])
    cfg = model_sd.get("ds_config") or {}
    return int((cfg.get("zero_optimization") or {}).get("stage", 0))


def numel(shape: Iterable[int]) -> int:
    return math.prod(int(s) for s in shape)



def step_of(state: dict) -> int | None:
    """Adam's step count from a torch optimizer `state` dict."""
    for s in state.values():
        if isinstance(s, dict) and "step" in s:
            v = s["step"]
            return int(v.item() if torch.is_tensor(v) else v)
    return None


def check_coverage(step_dir: Path, frags: dict[str, list[Frag]], shapes: dict[str, tuple[int, ...]]) -> None:
    for name, parts in frags.items():
        if sum(p.numel for p in parts) != numel(shapes[name]):
            raise UserError(f"{step_dir}: the shards do not cover parameter {name}: checkpoint incomplete")
