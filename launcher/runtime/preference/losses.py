"""The preference losses, per pair or per example (the objectives sum them and divide by the
global count), as TRL 1.16 defines them:

- DPO, sigmoid (Rafailov et al. 2023): -logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))),
  pi and ref summed log-probs of the response tokens.
- ORPO (Hong et al. 2024): the chosen sequence's NLL minus beta * logsigmoid(log odds ratio),
  the odds from the mean per-token log-probs (the NLL term is the objective's).
- KTO (Ethayarajh et al. 2024): desirable 1 - sigmoid(beta * (r - z0)), undesirable
  1 - sigmoid(beta * (z0 - r)), r = pi - ref, z0 the batch's KL estimate (clamped at 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_sigmoid(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses, chosen rewards, rejected rewards) per pair; rewards are beta * log ratios."""
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and far below it (TRL's and Maechler's rule)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_odds_ratio(mean_chosen: torch.Tensor, mean_rejected: torch.Tensor,
                    beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(beta * logsigmoid(log odds ratio), log odds ratio) per pair, from the mean per-token
    log-probs; the ORPO loss subtracts the first from the NLL."""
    c, r = mean_chosen.float(), mean_rejected.float()
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
    return beta * F.logsigmoid(log_odds), log_odds


def kto(policy: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, beta: float,
        desirable_weight: float, undesirable_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted losses, rewards) per example; `kl` is a detached scalar."""
    ratio = policy - ref
    chosen = desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl)))
    rejected = undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio)))
    return torch.where(desirable, chosen, rejected), beta * ratio.detach()
