"""Global batches: how many steps a run takes and the micro-batches of each step on this rank."""

from __future__ import annotations

import math
from typing import Any, Iterator

import torch

from launcher.recipe.sections import Recipe


def total_steps(recipe: Recipe, train_examples: int, data_parallel: int) -> int:
    t = recipe.train
    if t.max_steps is not None:
        return t.max_steps
    per_step = t.micro_batch_size * t.grad_accum * data_parallel
    steps_per_epoch = train_examples // per_step
    if steps_per_epoch == 0:
        from launcher.errors import RecipeError

        raise RecipeError(
            "train.micro_batch_size",
            f"{train_examples} training examples are fewer than one global batch ({per_step}): "
            "lower train.micro_batch_size or train.grad_accum",
        )
    return max(1, math.floor(t.epochs * steps_per_epoch))


def label_count(batch: dict[str, torch.Tensor]) -> int:
    """Label tokens that contribute to the causal-LM loss: transformers shifts labels by one, so
    the first position of each row never counts."""
    return int((batch["labels"][..., 1:] != -100).sum())


def input_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that are not padding (every token of a packed batch)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return batch["input_ids"].numel()


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class BatchStream:
    """Micro-batches for this rank from the resumable sampler, across epoch boundaries."""

    def __init__(self, examples: Any, sampler: Any, micro_batch_size: int, pad_id: int):
        from launcher.data import collate

        self._collate = collate
        self.examples = examples
        self.sampler = sampler
        self.micro = micro_batch_size
        self.pad_id = pad_id
        self._it: Iterator[int] = iter(sampler)
        self.last_ids: list[int] = []

    def next(self) -> dict[str, torch.Tensor]:
        idx: list[int] = []
        while len(idx) < self.micro:
            try:
                idx.append(next(self._it))
            except StopIteration:
                self.sampler.set_epoch(self.sampler.state_dict()["epoch"] + 1)
                self._it = iter(self.sampler)
        self.last_ids = idx
        return self._collate([self.examples[i] for i in idx], pad_id=self.pad_id)

    def global_batch(self, grad_accum: int) -> tuple[list[dict[str, torch.Tensor]], list[int]]:
        """The `grad_accum` micro-batches of one step and the sample ids they hold."""
        batches, ids = [], []
        for _ in range(grad_accum):
            batches.append(self.next())
            ids += self.last_ids
        return batches, ids
