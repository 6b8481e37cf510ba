"""The seam where training methods plug in: what a micro-batch's loss is and what it is
normalised by.

Today's SFT and pretraining share one objective, the token-weighted next-token cross-entropy.
A method (LoRA changes the model, not the objective; DPO, ORPO and KTO change the objective)
provides another `Objective` and `objective_for` picks it from the recipe; the step strategies
and the evaluation call only these methods.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from launcher.recipe.sections import Recipe
from launcher.runtime.trainer.batches import label_count


class Objective(Protocol):
    name: str

    def items(self, batch: dict[str, torch.Tensor]) -> int:
        """What the step's loss is normalised by, counted in this micro-batch (label tokens)."""

    def loss(self, model: Any, batch: dict[str, torch.Tensor], num_items: float) -> torch.Tensor:
        """sum(per-item losses of `batch`) / `num_items`, differentiable."""

    def begin_step(self, model: Any, batches: list[dict[str, torch.Tensor]], device: Any,
                   reduce: bool = True) -> None:
        """Sees every micro-batch of the step before the first loss (all ranks together; `reduce`
        false in evaluation: this rank's batch alone): what a loss needs of the global batch
        beside `num_items` (ORPO's NLL tokens, KTO's KL estimate)."""

    def take_metrics(self) -> dict[str, tuple[float, float]]:
        """Per-item (sum, count) of each metric since the last call, the same names on every rank
        (the step all-reduces them and logs the means)."""


class CausalLM:
    """SFT and pretraining: next-token cross-entropy summed over label tokens and divided by the
    label tokens of the whole global batch (`num_items`), transformers' `num_items_in_batch`."""

    name = "causal_lm"

    def items(self, batch: dict[str, torch.Tensor]) -> int:
        return label_count(batch)

    def loss(self, model: Any, batch: dict[str, torch.Tensor], num_items: float) -> torch.Tensor:
        return model(**batch, num_items_in_batch=num_items).loss

    def begin_step(self, model: Any, batches: list[dict[str, torch.Tensor]], device: Any,
                   reduce: bool = True) -> None:
        pass

    def take_metrics(self) -> dict[str, tuple[float, float]]:
        return {}


def objective_for(recipe: Recipe, world_size: int = 1) -> Objective:
    """The objective of `recipe.train.task` (sft and pretrain differ only in their data; dpo,
    orpo and kto are launcher.runtime.preference's). `world_size`: the workers, which a ZeRO-3
    reference copy is partitioned over."""
    task = recipe.train.task
    if task in ("dpo", "orpo", "kto"):
        from launcher.runtime.preference.objectives import DPO, KTO, ORPO
        from launcher.runtime.preference.reference import reference_for

        if task == "orpo":
            return ORPO(recipe.preference)
        reference = reference_for(recipe, world_size)
        return DPO(recipe.preference, reference) if task == "dpo" else KTO(recipe.preference, reference)
    return CausalLM()
