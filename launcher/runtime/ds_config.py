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


def _precision(dtype: str, zero_stage: int) -> dict[str, Any]:
    """The mixed-precision keys: 16-bit weights and compute, fp32 everywhere gradients are summed.

    DeepSpeed's `grad_accum_dtype` defaults to the model dtype, so ZeRO 1-3 would sum the
    micro-batches' partitioned gradients in bf16 (8 bits of mantissa: a 4-step accumulation
    already loses the small contributions), and `communication_data_type` defaults to it too, so
    the all-reduce / reduce-scatter would round the sum over ranks to bf16 as well. fp32 for both
    makes gradient accumulation and data parallelism change nothing but the summation order, as
    in fp32 runs (docs/parity.md, the bf16 cells). With bf16, `grad_accum_dtype: fp32` also makes
    ZeRO-0 and ZeRO-1 use BF16_Optimizer (fp32 master weights and fp32 gradient buffers); ZeRO-0
    needs `launcher.runtime.precision.install_deepspeed_backports()`, DeepSpeed 0.19.8 refuses it
    otherwise. Master weights stay fp32 (`bf16_master_weights_and_grads: false`) in every stage.
    `immediate_grad_update`: BF16_Optimizer adds each parameter's bf16 gradient into its fp32
    buffer from a hook as soon as backward produces it, instead of in the engine's backward
    epilogue, which DeepSpeed's pipe engine does not run for every stage (parity cell
    bf16 w2-z0-ga4-pp2: gradient norm 84% off without it, within the noise floor with it); it
    also frees each bf16 gradient at once.
    fp16 without ZeRO keeps DeepSpeed's FP16_Optimizer (fp32 master weights), which refuses an
    fp32 accumulation dtype.
    """
    if dtype == "bf16":
        return {
            "bf16": {"enabled": True, "bf16_master_weights_and_grads": False, "immediate_grad_update": True},
            "fp16": {"enabled": False, "loss_scale": 0, "initial_scale_power": 16},
            "data_types": {"grad_accum_dtype": "fp32"},
            "communication_data_type": "fp32",
        }
    out: dict[str, Any] = {
        "bf16": {"enabled": False},
        "fp16": {"enabled": dtype == "fp16", "loss_scale": 0, "initial_scale_power": 16},
    }
    if dtype == "fp16" and zero_stage >= 1:
        out.update(data_types={"grad_accum_dtype": "fp32"}, communication_data_type="fp32")
    return out


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
        **_precision(recipe.model.dtype, par.zero_stage),
        "steps_per_print": 10**9,  # the launcher logs metrics itself
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if par.offload_optimizer != "none" and not on_gpu:
        config["zero_force_ds_cpu_optimizer"] = False
    return _deep_merge(config, recipe.deepspeed)
