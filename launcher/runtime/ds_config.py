"""The DeepSpeed config generated from a recipe (a pure function; golden-tested)."""

from __future__ import annotations

import copy
from typing import Any

from launcher.recipe.sections import Recipe


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _offload(device: str, nvme_path: str | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"device": device, "pin_memory": True}
    if device == "nvme":
        entry["nvme_path"] = nvme_path
    return entry


def build_ds_config(recipe: Recipe, *, data_parallel: int, on_gpu: bool) -> dict[str, Any]:
    """DeepSpeed config for `recipe` with `data_parallel` replicas; `recipe.deepspeed` merged last.

    The optimizer is DeepSpeed's AdamW: FusedAdam on GPU, DeepSpeedCPUAdam with optimizer offload,
    and torch's AdamW on CPU workers (`torch_adam`), which needs no compiled op.
    """
    t, par = recipe.train, recipe.parallelism
    zero: dict[str, Any] = {"stage": par.zero_stage}
    if par.zero_stage >= 1:
        zero.update(
            reduce_bucket_size=5e7,
            allgather_bucket_size=5e7,
            overlap_comm=on_gpu,
            contiguous_gradients=True,
        )
    if par.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=5e7,
            stage3_param_persistence_threshold=1e5,
            stage3_max_live_parameters=1e9,
            stage3_max_reuse_distance=1e9,
            stage3_gather_16bit_weights_on_model_save=False,
        )
        del zero["allgather_bucket_size"]  # stage 3 prefetches by its own bucket size
    if par.offload_optimizer != "none":
        zero["offload_optimizer"] = _offload(par.offload_optimizer, par.nvme_path)
    if par.offload_param != "none":
        zero["offload_param"] = _offload(par.offload_param, par.nvme_path)

    adam: dict[str, Any] = {
        "lr": t.lr,
        "betas": list(t.betas),
        "eps": 1e-8,
        "weight_decay": t.weight_decay,
    }
    if not on_gpu and par.offload_optimizer == "none":
        adam["torch_adam"] = True
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * data_parallel,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": adam},
        "bf16": {"enabled": recipe.model.dtype == "bf16"},
        "fp16": {"enabled": recipe.model.dtype == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,  # the launcher logs metrics itself
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if par.offload_optimizer != "none" and not on_gpu:
        config["zero_force_ds_cpu_optimizer"] = False
    return _deep_merge(config, recipe.deepspeed)
