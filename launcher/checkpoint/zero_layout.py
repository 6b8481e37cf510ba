"""`read_meta`: the metadata of one DeepSpeed checkpoint step directory, whatever its ZeRO stage,
cached while its `.pt` files are unchanged."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from launcher.checkpoint import zero_stage0, zero_stage3, zero_stage12
from launcher.checkpoint.safe_load import safe_load
from launcher.checkpoint.zero_meta import (
    Layout,
    ZeroMeta,
    check_coverage,
    model_files,
    optim_files,
    stage_of,
)
from launcher.errors import UserError


def layout(step_dir: str | Path) -> Layout:
    step_dir = Path(step_dir)
    if not step_dir.is_dir():
        raise UserError(f"{step_dir}: checkpoint directory does not exist")
    files = tuple(sorted((p.name, st.st_size, st.st_mtime_ns) for p in step_dir.iterdir()
                         if p.suffix == ".pt" and (st := p.stat())))
    return _cached_layout(step_dir.resolve(), files)


@functools.lru_cache(maxsize=4)
def _cached_layout(step_dir: Path, files: tuple) -> Layout:
    """Metadata of a step directory; cached while its .pt files are unchanged."""
    models, is_z3 = model_files(step_dir)
    optims = optim_files(step_dir)
    model_sd = safe_load(models[0])
    module = model_sd.get("module")
    if not isinstance(module, dict):
        raise UserError(f"{models[0]}: no 'module' state dict: not a DeepSpeed model states file")
    first_optim = safe_load(optims[0])["optimizer_state_dict"] if optims else None
    stage = 3 if is_z3 else stage_of(model_sd, first_optim)
    buffer_names = list(model_sd.get("buffer_names") or [])
    shared = dict(model_sd.get("shared_params") or {})
    frozen_shapes = dict(model_sd.get("frozen_param_shapes") or {})
    floating = [v for v in module.values() if torch.is_tensor(v) and v.is_floating_point()]

    if stage == 0 or not optims:
        stage = 0
        parsed = zero_stage0.parse(model_sd, module, buffer_names, shared, frozen_shapes)
        shared = parsed.shared or {}
        shapes = parsed.shapes
    else:
        if is_z3 and len(models) != len(optims):
            raise UserError(
                f"{step_dir}: {len(models)} model states files but {len(optims)} optimizer files: "
                "the checkpoint is incomplete"
            )
        fmt = zero_stage3 if stage == 3 else zero_stage12
        parsed = fmt.parse(model_sd.get("param_shapes") or [], first_optim, optims)
        shapes = parsed.shapes
        for name in frozen_shapes:
            shapes[name] = tuple(int(x) for x in frozen_shapes[name])
        if not is_z3:
            # ZeRO-1 saves frozen parameters (a LoRA model's base) only in `module`, in full
            for name, t in module.items():
                if name not in shapes and name not in buffer_names and name not in shared and torch.is_tensor(t):
                    shapes[name] = tuple(t.shape)
        check_coverage(step_dir, parsed.frags, shapes)
        # model order: the module state dict's key order
        order = [k for k in module if k in shapes]
        shapes = {k: shapes[k] for k in order + [k for k in shapes if k not in module]}

    steps = model_sd.get("global_steps")
    meta = ZeroMeta(
        zero_stage=stage,
        dp_world_size=parsed.world,
        param_shapes=shapes,
        param_groups=parsed.groups,
        shared_params=shared,
        buffer_names=buffer_names,
        frozen_params=list(frozen_shapes),
        optimizer_step=parsed.optimizer_step,
        global_steps=int(steps) if steps is not None else None,
        ds_version=str(model_sd.get("ds_version")) if model_sd.get("ds_version") else None,
        model_dtype=floating[0].dtype if floating else torch.float32,
        files=[p.name for p in models + optims],
    )
    del model_sd, module, first_optim
    return Layout(meta, step_dir, models[0], optims, parsed.frags, parsed.stage0_index)


def read_meta(step_dir: str | Path) -> ZeroMeta:
    """Stage, world size, parameter names/shapes/groups, ties, buffers and step of a checkpoint."""
    return layout(step_dir).meta
