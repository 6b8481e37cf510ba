"""Model, DeepSpeed engine and step strategy for a recipe's layout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from launcher.recipe.sections import Recipe
from launcher.runtime.ds_config import build_ds_config
from launcher.runtime.model import build_model, param_groups
from launcher.runtime.schedule import lr_multiplier
from launcher.runtime.trainer.distributed import WorkerContext
from launcher.runtime.trainer.objective import Objective
from launcher.runtime.trainer.steps import DataParallelStep, PipelineStep


@dataclass
class Built:
    engine: Any
    scheduler: Any
    strategy: DataParallelStep | PipelineStep
    hf_ds_config: Any
    """transformers' weak global that makes ZeRO-3 models build inside zero.Init: held for the
    run's lifetime, dropped before the end-of-run export."""


def _module(recipe: Recipe, tokenizer: Any) -> torch.nn.Module:
    stages = recipe.parallelism.pipeline_stages
    from launcher.runtime.chunked_loss import recipe_chunk_tokens

    seed, chunk = recipe.train.seed, recipe_chunk_tokens(recipe)
    if stages == 1:
        # the chunked loss lives inside the model's forward: the objective still calls the engine,
        # whose forward prepares ZeRO's backward hooks
        return _with_adapters(recipe, tokenizer, seed=seed, chunk=chunk)
    from launcher.runtime.pipeline import build_pipeline_module

    # 16-bit pipelines get chunk 0 from recipe_chunk_tokens (the loss computed whole)
    # the pipeline turns the layers' own checkpointing off and checkpoints per pipe layer
    hf_model = build_model(recipe.model, tokenizer, seed=seed)
    module = build_pipeline_module(
        hf_model, stages=stages, partition=recipe.parallelism.pipeline_partition,
        activation_checkpointing=recipe.model.activation_checkpointing, chunked_loss=chunk)
    del hf_model  # this stage's layers live on in `module`; the others are freed
    return module


def _with_adapters(recipe: Recipe, tokenizer: Any, *, seed: int, chunk: int) -> torch.nn.Module:
    """The model, wrapped in PEFT's LoRA adapters for `train.method: lora | qlora` (checks.py
    refuses LoRA with pipeline stages)."""
    from launcher.runtime.lora import apply_lora, quantization_config, uses_lora

    if not uses_lora(recipe):
        return build_model(recipe.model, tokenizer, seed=seed, chunked_loss=chunk)
    from launcher.runtime.chunked_loss import enable_chunked_loss

    quant = quantization_config(recipe) if recipe.train.method == "qlora" else None
    model = build_model(recipe.model, tokenizer, seed=seed, quantization=quant)
    peft_model = apply_lora(model, recipe, seed=seed)
    # the chunked loss after the wrapping: it applies only while the head is still a plain linear
    # layer (not when lora.modules_to_save or the targets wrap lm_head), and it reads the head's weight
    enable_chunked_loss(peft_model.get_base_model(), chunk)
    return peft_model


def build(recipe: Recipe, ctx: WorkerContext, tokenizer: Any, objective: Objective, *, steps: int) -> Built:
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    t = recipe.train
    stages = recipe.parallelism.pipeline_stages
    data_parallel = ctx.world_size // stages
    ds_config = build_ds_config(recipe, data_parallel=data_parallel, on_gpu=ctx.on_gpu)
    hf_ds = HfDeepSpeedConfig(ds_config) if recipe.parallelism.zero_stage == 3 else None
    from launcher.runtime.precision import install_deepspeed_backports

    # bf16 without ZeRO on BF16_Optimizer (fp32 masters and accumulation), which DeepSpeed
    # 0.19.8 refuses by itself; idempotent
    install_deepspeed_backports()
    model = _module(recipe, tokenizer)
    multiplier = lr_multiplier(t.schedule, warmup_steps=t.warmup_steps, total_steps=steps, min_ratio=t.min_lr_ratio)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, t.weight_decay),
        config=ds_config,
        # DeepSpeed steps it only when it applies an optimizer step: the schedule follows the
        # steps applied, an fp16 overflow step does not advance it
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, multiplier),
    )
    if stages > 1:
        dp_rank = ctx.rank % data_parallel
        assert engine.grid.data_parallel_id == dp_rank and engine.grid.data_parallel_size == data_parallel
        strategy: DataParallelStep | PipelineStep = PipelineStep(engine, objective, ctx, recipe)
    else:
        strategy = DataParallelStep(engine, objective, ctx, recipe)
    return Built(engine, scheduler, strategy, hf_ds)
