"""Log-probabilities of label tokens, per sequence, in fp32."""

from __future__ import annotations

from typing import Any

import torch

IGNORE_INDEX = -100


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each next label token, mask of the tokens that count), both [N, L-1]: logits at
    t predict the label at t+1 (labels -100 do not count)."""
    labels = labels[:, 1:]
    logits = logits[:, :-1].float()
    mask = labels != IGNORE_INDEX
    picked = torch.gather(logits, -1, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    return (picked - torch.logsumexp(logits, dim=-1)) * mask, mask


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, *, average: bool = False) -> torch.Tensor:
    """Sum (or mean, `average`) of the label tokens' log-probabilities of each sequence, [N]."""
    per_token, mask = token_logps(logits, labels)
    total = per_token.sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def forward_logits(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The model's logits (no labels: the chunked-loss forward is not taken)."""
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
