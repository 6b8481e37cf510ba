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


class CausalLM:
    """SFT and pretraining: next-token cross-entropy summed over label tokens and divided by the
    label tokens of the whole global batch (`num_items`), transformers' `num_items_in_batch`."""

    name = "causal_lm"

    def items(self, batch: dict[str, torch.Tensor]) -> int:
        return label_count(batch)

    def loss(self, model: Any, batch: dict[str, torch.Tensor], num_items: float) -> torch.Tensor:
        return model(**batch, num_items_in_batch=num_items).loss


def objective_for(recipe: Recipe) -> Objective:
    """The objective of `recipe.train.task` (sft and pretrain differ only in their data)."""
    return CausalLM()
