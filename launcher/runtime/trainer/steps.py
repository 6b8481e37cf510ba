"""Step strategies: one optimizer step over a global batch, per parallel layout.

`DataParallelStep` covers ZeRO 0-3 (every rank holds the whole model or a ZeRO partition of
it); `PipelineStep` covers `parallelism.pipeline_stages > 1` (DeepSpeed's pipeline engine runs
the micro-batches through the stages itself). Both return a `StepOutcome` with this rank's share
of the step's loss, so that the trainer sums it over ranks the same way for both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from launcher.recipe.sections import Recipe
from launcher.runtime.trainer.batches import to_device
from launcher.runtime.trainer.distributed import WorkerContext, all_sum
from launcher.runtime.trainer.objective import Objective


@dataclass
class StepOutcome:
    loss_part: float
    """This rank's share of the step's loss: summed over all ranks it is `stages` times the loss."""
    grad_norm: float | None
    """Global gradient norm before clipping, unscaled (None: not finite, or not known)."""
    applied: bool
    """False when the optimizer skipped the step (fp16 overflow): no weight and no LR change."""
    metrics: dict[str, float] = field(default_factory=dict)
    """The objective's metrics over the global batch (preference rewards), for the step's record."""


def _finite(norm: float | None) -> float | None:
    return norm if norm is not None and math.isfinite(norm) else None


def deepspeed_grad_norm(engine: Any) -> float | None:
    """The norm DeepSpeed's 16-bit and ZeRO optimizers compute while clipping (already divided
    by the loss scale)."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)


def plain_grad_norm(engine: Any) -> float:
    """Global 2-norm of the (already all-reduced) fp32 gradients, before clipping."""
    norms = [p.grad.detach().double().norm() for p in engine.module.parameters() if p.grad is not None]
    # one device-to-host copy per step, not one per parameter
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def global_metrics(objective: Objective, ctx: WorkerContext) -> dict[str, float]:
    """The objective's per-item metrics of this step, averaged over every rank's items."""
    sums = objective.take_metrics()
    if not sums:
        return {}
    from launcher.runtime.preference.objectives import metric_means

    flat = all_sum([v for pair in sums.values() for v in pair], ctx.device)
    return metric_means({name: (flat[2 * i], flat[2 * i + 1]) for i, name in enumerate(sums)})


class DataParallelStep:
    """ZeRO 0-3: forward and backward per micro-batch; DeepSpeed reduces the gradients and steps
    the optimizer (and the LR schedule, unless it skips the step) at the accumulation boundary."""

    can_generate = True

    def __init__(self, engine: Any, objective: Objective, ctx: WorkerContext, recipe: Recipe):
        self.engine, self.objective, self.ctx = engine, objective, ctx
        self.scale = recipe.train.grad_accum * (ctx.world_size // recipe.parallelism.pipeline_stages)
        # Without ZeRO and in fp32 DeepSpeed clips with torch's own routine and keeps no norm; the
        # 16-bit and ZeRO optimizers compute it (unscaled) themselves.
        from launcher.runtime.precision import norm_after_step

        self.own_norm = not norm_after_step(engine)

    def train(self, batches: list[dict[str, torch.Tensor]], num_items: float) -> StepOutcome:
        engine, loss_sum, norm = self.engine, 0.0, None
        self.objective.begin_step(engine, batches, self.ctx.device)
        for i, batch in enumerate(batches):
            loss = self.objective.loss(engine, to_device(batch, self.ctx.device), num_items)
            engine.backward(loss)
            if i == len(batches) - 1 and self.own_norm:
                norm = plain_grad_norm(engine)  # the boundary step below clips these gradients
            engine.step()
            loss_sum += loss.item()
        if norm is None:
            norm = deepspeed_grad_norm(engine)
        # DeepSpeed divides each micro-batch's gradient by grad_accum and averages over the
        # data-parallel ranks; the loss is scaled back the same way
        return StepOutcome(loss_sum / self.scale, _finite(norm), engine.was_step_applied(),
                           global_metrics(self.objective, self.ctx))

    def evaluate(self, examples: Any, recipe: Recipe, pad_id: int) -> float:
        from launcher.runtime.trainer.evaluation import evaluate

        return evaluate(self.engine, self.objective, examples, self.ctx, recipe, pad_id)

    def param_counts(self) -> tuple[int, int]:
        """(parameters of the whole model, parameters held by this rank)."""
        params = list(self.engine.module.parameters())
        # Under ZeRO-3 each parameter is a placeholder; ds_numel is its full size, ds_tensor this rank's part.
        total = sum(getattr(p, "ds_numel", p.numel()) for p in params)
        mine = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
        return total, mine


class PipelineStep:
    """Pipeline stages (x data-parallel replicas): the pipe engine runs all micro-batches of the
    step through the stages and returns the mean of their losses on every rank."""

    can_generate = False  # no rank holds the whole model; generate from the export instead

    def __init__(self, engine: Any, objective: Objective, ctx: WorkerContext, recipe: Recipe):
        self.engine, self.objective, self.ctx = engine, objective, ctx
        self.data_parallel = ctx.world_size // recipe.parallelism.pipeline_stages
        if recipe.parallelism.zero_stage == 0:
            from launcher.runtime.pipeline import record_grad_norm

            record_grad_norm(engine)

    def train(self, batches: list[dict[str, torch.Tensor]], num_items: float) -> StepOutcome:
        from launcher.runtime.pipeline import pipe_micro_batch

        engine = self.engine
        # the mean over micro-batches and replicas of sum(CE) / num_items: sum(CE) / N, on every rank
        step_loss = engine.train_batch(iter([pipe_micro_batch(b, num_items) for b in batches]))
        norm = getattr(engine, "launcher_grad_norm", None)
        if norm is None:
            norm = deepspeed_grad_norm(engine)
        return StepOutcome(step_loss.item() / self.data_parallel, _finite(norm), engine.was_step_applied())

    def evaluate(self, examples: Any, recipe: Recipe, pad_id: int) -> float:
        from launcher.runtime.trainer.evaluation import evaluate_pipeline

        return evaluate_pipeline(self.engine, examples, self.ctx, recipe, pad_id)

    def param_counts(self) -> tuple[int, int]:
        params = list(self.engine.module.parameters())
        # each stage holds its layers: count replica 0's, a tied copy once
        mine = sum(p.numel() for p in params if not getattr(p, "ds_pipe_replicated", False))
        first_replica = self.ctx.rank % self.data_parallel == 0
        (total,) = all_sum([float(mine if first_replica else 0)], self.ctx.device)
        return int(total), sum(p.numel() for p in params)
