"""Held-out loss and greedy samples, computed the same way in every layout."""

from __future__ import annotations

from typing import Any

import torch

from launcher.recipe.sections import Recipe
from launcher.runtime.trainer.batches import label_count, to_device
from launcher.runtime.trainer.distributed import WorkerContext, all_sum
from launcher.runtime.trainer.objective import Objective


def evaluate(engine: Any, objective: Objective, examples: Any, ctx: WorkerContext, recipe: Recipe,
             pad_id: int) -> float:
    """Token-weighted mean loss (sum of token losses / label tokens) over the first
    `train.eval_batches` micro-batches of the eval set, all ranks."""
    from launcher.data import collate

    micro = recipe.train.micro_batch_size
    cap = micro * recipe.train.eval_batches
    mine = [examples[i] for i in range(ctx.rank, len(examples), ctx.world_size)][:cap]
    # ZeRO-3 forwards are collective, so every rank runs as many as the rank with the most data;
    # a rank that has run out repeats one example and does not count it.
    per_rank = min(-(-len(examples) // ctx.world_size), cap)
    loss_sum, n = 0.0, 0
    engine.eval()
    with torch.no_grad():
        for i in range(0, per_rank, micro):
            chunk = mine[i : i + micro]
            batch = to_device(collate(chunk or [examples[0]], pad_id=pad_id), ctx.device)
            objective.begin_step(engine, [batch], ctx.device, reduce=False)  # this batch's own counts
            # num_items 1: the loss is the sum over tokens, not their mean
            loss = objective.loss(engine, batch, 1.0)
            if chunk:
                loss_sum += loss.item()
                n += objective.items(batch)
    engine.train()
    objective.take_metrics()  # evaluation's forwards are not the next step's metrics
    total_loss, total_n = all_sum([loss_sum, n], ctx.device)
    return total_loss / max(total_n, 1)


def evaluate_pipeline(engine: Any, examples: Any, ctx: WorkerContext, recipe: Recipe, pad_id: int) -> float:
    """`evaluate` through the pipeline engine: each replica (data-parallel rank) evaluates its
    share as one `eval_batch` of micro-batches; a replica that has run out repeats one example
    with every label masked, which adds nothing."""
    from launcher.data import collate
    from launcher.runtime.pipeline import pipe_micro_batch

    stages = recipe.parallelism.pipeline_stages
    replicas = ctx.world_size // stages
    replica = ctx.rank % replicas
    micro = recipe.train.micro_batch_size
    cap = micro * recipe.train.eval_batches
    mine = [examples[i] for i in range(replica, len(examples), replicas)][:cap]
    per_rank = min(-(-len(examples) // replicas), cap)
    batches, n = [], 0
    for i in range(0, per_rank, micro):
        chunk = mine[i : i + micro]
        batch = collate(chunk or [examples[0]], pad_id=pad_id)
        if chunk:
            n += label_count(batch)
        else:
            batch["labels"] = torch.full_like(batch["labels"], -100)
        batches.append(pipe_micro_batch(batch, 1.0))  # num_items 1: each loss is a sum over tokens
    # the mean over micro-batches and replicas of the sums, on every rank
    mean = engine.eval_batch(iter(batches), num_micro_batches=len(batches))
    (total_n,) = all_sum([float(n)], ctx.device)
    engine.module.train()
    return float(mean) * len(batches) * replicas / max(total_n / stages, 1.0)


def generate_samples(engine: Any, tokenizer: Any, prompts: list[dict], ctx: WorkerContext,
                     recipe: Recipe) -> list[dict]:
    """Greedy completions; every rank runs them because ZeRO-3 forwards are collective."""
    model = engine.module
    model.eval()
    results = []
    synced = recipe.parallelism.zero_stage == 3 and ctx.world_size > 1
    with torch.no_grad():
        for p in prompts:
            # the tokenizer's own special-token rule is the one training examples were built with
            ids = tokenizer(p["prompt"], return_tensors="pt").input_ids
            out = model.generate(
                ids.to(ctx.device),
                attention_mask=torch.ones_like(ids).to(ctx.device),
                max_new_tokens=recipe.sample.max_new_tokens,
                do_sample=False,
                synced_gpus=synced,
                use_cache=True,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
            results.append({**p, "generated": text})
    model.train()
    return results
