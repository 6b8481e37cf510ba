"""ZeRO stage 0 on disk: `mp_rank_00_model_states.pt` holds the full `module` state dict and the
plain torch optimizer state (`optimizer`: `state` keyed by parameter index in optimizer order).
Stage 0 records neither names for the optimizer's parameters nor `shared_params`."""

from __future__ import annotations

import torch

from launcher.checkpoint.zero_meta import Parsed, step_of
from launcher.errors import UserError


def parse(model_sd: dict, module: dict, buffer_names: list[str], shared: dict[str, str],
          frozen_shapes: dict) -> Parsed:
    opt = model_sd.get("optimizer")
    shared = shared or aliases_by_storage(module)
    shapes: dict[str, tuple[int, ...]] = {}
    for name, t in module.items():
        if name in buffer_names or name in shared:
            continue
        shapes[name] = tuple(t.shape)
    groups: dict[str, int] = {}
    index: dict[str, int] = {}
    optimizer_step = None
    if isinstance(opt, dict) and "param_groups" in opt:
        trainable = [n for n in shapes if n not in frozen_shapes]
        if sum(len(g["params"]) for g in opt["param_groups"]) != len(trainable):
            # stage 0 records no frozen names; a PEFT model trains only its adapters and the
            # copies of `modules_to_save` (PEFT's own rule), the rest of it is the frozen base
            trainable = [n for n in trainable if peft_trainable(n)] or trainable
        order = optimizer_order(trainable, shapes, opt)
        for gi, g in enumerate(opt["param_groups"]):
            for idx in g["params"]:
                index[order[idx]] = idx
                groups[order[idx]] = gi
        optimizer_step = step_of(opt.get("state", {}))
    world = int(model_sd.get("dp_world_size") or 1)
    return Parsed(shapes, groups, {}, optimizer_step, world, stage0_index=index, shared=shared)


def peft_trainable(name: str) -> bool:
    return ".lora_" in name or ".modules_to_save." in name


def aliases_by_storage(module: dict) -> dict[str, str]:
    """Stage 0 records no `shared_params`; tied tensors share one storage in the saved file."""
    seen: dict[tuple[int, int], str] = {}
    out = {}
    for name, t in module.items():
        if not torch.is_tensor(t) or t.numel() == 0:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            out[name] = seen[key]
        else:
            seen[key] = name
    return out


def optimizer_order(trainable: list[str], shapes: dict, opt: dict) -> list[str]:
    """Names in the torch optimizer's parameter order for a stage-0 checkpoint.

    Stage 0 stores no names: the order is that of the param groups the engine was given. With
    `launcher.runtime.model.param_groups` (decay first, then no-decay) it is recovered by the
    same rule; with one group it is the module order.
    """
    sizes = [len(g["params"]) for g in opt["param_groups"]]
    if len(sizes) == 1:
        ordered = trainable
    else:
        def no_decay(n: str) -> bool:
            return len(shapes[n]) < 2 or "norm" in n.lower() or n.endswith(".bias")

        ordered = [n for n in trainable if not no_decay(n)] + [n for n in trainable if no_decay(n)]
    if sum(sizes) != len(ordered):
        raise UserError(
            f"stage-0 checkpoint: the optimizer has {sum(sizes)} parameters but the model "
            f"{len(ordered)}: cannot match optimizer state to names"
        )
    return ordered
