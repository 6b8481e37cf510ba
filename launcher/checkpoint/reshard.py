"""Load a checkpoint into a freshly built engine: DeepSpeed's loader when the layout is the one
it was saved with, the project's own conversion when the data-parallel size (or ZeRO stage)
changed. DeepSpeed refuses the latter for ZeRO (microsoft/DeepSpeed#2898, #6441, #5405) and its
universal checkpoint has open ZeRO-3 bugs (#7546), so the conversion goes through full
(unpartitioned) fp32 tensors read from the shards by `zero_reader`, one parameter at a time,
and written into the new partitions. Both read the files through `safe_load` only."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from launcher.checkpoint.layout import StepDir
from launcher.checkpoint.manifest import read_manifest
from launcher.checkpoint.state import read_rank_state
from launcher.errors import UserError

MOMENTS = ("exp_avg", "exp_avg_sq")


def layout(recipe: Any, world_size: int) -> dict[str, Any]:
    """The parallel layout a checkpoint records and a resume compares (see `same_layout`)."""
    stages = recipe.parallelism.pipeline_stages
    return {
        "world_size": world_size,
        "data_parallel": world_size // stages,
        "zero_stage": recipe.parallelism.zero_stage,
        "pipeline_stages": stages,
    }


def same_layout(saved: dict[str, Any], layout: dict[str, Any]) -> bool:
    keys = ("world_size", "data_parallel", "zero_stage", "pipeline_stages")
    return all(saved.get(k) == layout.get(k) for k in keys)


def reshard_problem(saved: dict[str, Any], layout: dict[str, Any]) -> str | None:
    """Why a checkpoint cannot be loaded into `layout`, or None if it can (maybe by conversion)."""
    if saved.get("pipeline_stages", 1) != layout.get("pipeline_stages", 1):
        return (
            f"it was written with parallelism.pipeline_stages={saved.get('pipeline_stages', 1)} and this "
            f"recipe asks for {layout.get('pipeline_stages', 1)}; pipeline checkpoints cannot change their "
            "stage count: set parallelism.pipeline_stages back"
        )
    if saved.get("pipeline_stages", 1) > 1 and not same_layout(saved, layout):
        return "pipeline checkpoints resume only with the same number of workers"
    return None


def load_checkpoint(engine: Any, scheduler: Any, step_dir: StepDir, ckpt: Any, layout: dict[str, Any]) -> dict[str, Any]:
    """Restore model, optimizer and scheduler into `engine`; return this rank's saved state
    (with `rng` None when the layout changed, since ranks no longer correspond).

    Nothing is unpickled but tensors and plain data: rank 0 first disassembles every `.pt` file
    of the step (`safe_load.scan_step`, no tensor data read) and all ranks refuse together; the
    files are then read with `safe_load`. When the newest commit cannot be loaded on some rank,
    the previous one that passes a full checksum verify is loaded instead, saying so."""
    problem = reshard_problem(read_manifest(step_dir.path), layout)
    if problem:
        raise UserError(f"{step_dir.path}: cannot resume: {problem}")
    while True:
        state, error = None, None
        try:
            state = _load_one(engine, scheduler, step_dir, ckpt, layout)
        except UserError as e:
            error = str(e)
        errors: list[Any] = [None] * ckpt.world_size
        dist.all_gather_object(errors, error)  # every rank, loaded or not: one decision
        if not any(errors):
            return state
        step_dir = _previous_good(ckpt, step_dir, next(e for e in errors if e))


def _load_one(engine: Any, scheduler: Any, step_dir: StepDir, ckpt: Any, layout: dict[str, Any]) -> dict[str, Any]:
    from launcher.checkpoint.checkpointer import broadcast
    from launcher.checkpoint.safe_load import scan_step

    saved = read_manifest(step_dir.path)
    refused = broadcast(scan_step(step_dir.path) if ckpt.rank == 0 else None)
    if refused:
        raise UserError(refused)
    if same_layout(saved, layout):
        return ckpt.load_same_layout(engine, step_dir)
    load_resharded(engine, step_dir.path)
    state = read_rank_state(step_dir.path, 0)  # sampler position and counters are global
    sched = dict(state["scheduler"])
    sched["lr_lambdas"] = [None] * len(scheduler.lr_lambdas)
    scheduler.load_state_dict(sched)
    # The optimizer's learning rates are not part of the scheduler's state: set them as the
    # scheduler left them, or the first step after a reshard runs at the initial (warmup) rate.
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
    engine.global_steps = int(state["step"])
    state["rng"] = None
    return state


def _previous_good(ckpt: Any, failed: StepDir, error: str) -> StepDir:
    """The newest commit before `failed` whose files all match their checksums (rank 0 checks,
    every rank gets its answer); UserError with `error` when there is none."""
    from launcher.checkpoint.checkpointer import broadcast
    from launcher.checkpoint.layout import list_step_dirs
    from launcher.checkpoint.manifest import verify

    choice = None
    if ckpt.rank == 0:
        print(f"checkpoint: {failed.path.name} cannot be loaded: {error}", flush=True)
        for s in reversed([s for s in list_step_dirs(ckpt.run_dir) if s.committed and s.step < failed.step]):
            problems = verify(s.path, checksums=True, workers=4)
            if not problems:
                print(f"checkpoint: resuming from {s.path.name} instead (full verify passed)", flush=True)
                choice = s
                break
            print(f"checkpoint: {s.path.name} fails its verify too: {problems[0]}", flush=True)
    choice = broadcast(choice)
    if choice is None:
        raise UserError(f"{error} (and no earlier checkpoint passes `launcher ckpt verify`)")
    return choice


def _base_optimizer(engine: Any) -> Any:
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _ensure_states(opt: Any, base: Any, step: float) -> None:
    """Create Adam state (torch creates it lazily at the first step) so it can be filled. ZeRO-3
    hands its fp32 partitions to the base optimizer only during a step, so look there too."""
    tensors = [p for g in base.param_groups for p in g["params"]]
    for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):
        tensors += [t for t in getattr(opt, name, []) or [] if all(t is not x for x in tensors)]
    for p in tensors:
        st = base.state[p]
        for k in MOMENTS:
            if k not in st:
                st[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
        st["step"] = torch.tensor(float(step))


def _set_z3(opt: Any, param: Any, value: torch.Tensor, key: str | None) -> None:
    part, _ = opt._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    n = part.numel()
    start = n * opt._get_param_partition_rank(param)
    flat = value.flatten()
    chunk = flat[start : start + n]
    part.data.zero_()
    part.data[: chunk.numel()].copy_(chunk)


def load_resharded(engine: Any, step_dir: Any) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    from launcher.checkpoint.zero_reader import iter_full_optimizer_states, read_meta

    meta = read_meta(step_dir)
    base = _base_optimizer(engine)
    _ensure_states(engine.optimizer, base, meta.optimizer_step or 0)
    if hasattr(opt_ := engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
        # ZeRO-1/2 link each parameter to its Adam state lazily, after the first step (and in
        # 0.19.8 only for group 0): link them now that the state exists.
        opt_._hp_optimizer_states_linked = False
        opt_._lazy_init_hp_params_optimizer_state()
    opt = engine.optimizer
    named = dict(engine.module.named_parameters())
    stage = getattr(engine, "zero_optimization_stage", lambda: 0)()
    done = set()
    for name, states in iter_full_optimizer_states(step_dir):
        p = named.get(name)
        if p is None or name in done:
            continue
        done.add(name)
        if stage == 3:
            _set_z3(opt, p, states["fp32"], None)
            for k in MOMENTS:
                _set_z3(opt, p, states[k], k)
        elif hasattr(p, "_hp_mapping"):
            safe_set_full_fp32_param(p, states["fp32"].reshape(p.shape))
            for k in MOMENTS:
                safe_set_full_optimizer_state(p, states[k].reshape(p.shape), k)
        else:  # ZeRO-0: the optimizer works on the parameters themselves
            with torch.no_grad():
                p.data.copy_(states["fp32"].reshape(p.shape))
            for k in MOMENTS:
                base.state[p][k] = states[k].reshape(p.shape).clone()
    missing = [n for n, p in named.items() if p.requires_grad and n not in done]
    if missing:
        raise UserError(f"{step_dir}: the checkpoint has no values for {missing[:5]} ({len(missing)} parameters)")
    # the low-precision (or ZeRO-3 partitioned) copies the forward uses follow the fp32 masters
    if stage == 3:
        for lp, hp in zip(opt.fp16_partitioned_groups_flat, opt.fp32_partitioned_groups_flat):
            lp.data.copy_(hp.data)
    elif stage in (1, 2):
        opt.update_lp_params()
