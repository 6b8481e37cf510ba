"""DPO, ORPO and KTO as trainer objectives (see launcher/runtime/trainer/objective.py).

Each micro-batch's loss is sum(per-pair or per-example losses) / `num_items`, `num_items` the
pairs (DPO, ORPO) or examples (KTO) of the whole global batch (scaled as for SFT), so data
parallelism and accumulation change neither the loss nor the gradient. `begin_step` sees every
micro-batch of the step first: ORPO counts the global batch's NLL tokens there (its SFT term is
token-weighted, the odds-ratio term pair-weighted), KTO estimates the KL term over the global
batch. Metrics are summed per item while the losses are computed; the step all-reduces the sums
(`take_metrics`) and logs their means under TRL's names.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from launcher.recipe.sections import PreferenceConfig
from launcher.runtime.preference import losses
from launcher.runtime.preference.logps import forward_logits, sequence_logps
from launcher.runtime.preference.reference import ModuleReference


class MetricSums:
    """Per-item sums and counts of each metric, in a fixed order (all ranks all-reduce them)."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.reset()

    def reset(self) -> None:
        self.sums = {n: [0.0, 0.0] for n in self.names}

    def add(self, name: str, values: torch.Tensor, count: float | None = None) -> None:
        values = values.detach().float()
        self.sums[name][0] += float(values.sum())
        self.sums[name][1] += float(values.numel() if count is None else count)

    def take(self) -> dict[str, tuple[float, float]]:
        out = {n: (s, c) for n, (s, c) in self.sums.items()}
        self.reset()
        return out


Batch = dict[str, torch.Tensor]

REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies")


def _pairs(batch: dict[str, torch.Tensor]) -> int:
    return batch["input_ids"].shape[0] // 2


def _chunk(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    chosen, rejected = t.chunk(2, dim=0)  # collate_pairs: the chosen rows, then the rejected
    return chosen, rejected


class DPO:
    """Direct preference optimisation, sigmoid loss, against a reference policy."""

    name = "dpo"

    def __init__(self, cfg: PreferenceConfig, reference: ModuleReference) -> None:
        self.beta, self.reference = cfg.beta, reference
        self.metrics = MetricSums(REWARDS + ("logps/chosen", "logps/rejected"))

    def items(self, batch: dict[str, torch.Tensor]) -> int:
        return _pairs(batch)

    def begin_step(self, model: Any, batches: list[Batch], device: Any, reduce: bool = True) -> None:
        pass

    def loss(self, model: Any, batch: dict[str, torch.Tensor], num_items: float) -> torch.Tensor:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        policy = sequence_logps(forward_logits(model, ids, mask), labels)
        ref = self.reference.logps(model, ids, mask, labels)
        (pc, pr), (rc, rr) = _chunk(policy), _chunk(ref)
        per_pair, chosen, rejected = losses.dpo_sigmoid(pc, pr, rc, rr, self.beta)
        m = self.metrics
        m.add("rewards/chosen", chosen)
        m.add("rewards/rejected", rejected)
        m.add("rewards/accuracies", (chosen > rejected).float())
        m.add("logps/chosen", pc)
        m.add("logps/rejected", pr)
        return per_pair.sum() / num_items

    def take_metrics(self) -> dict[str, tuple[float, float]]:
        return self.metrics.take()


class ORPO:
    """Odds-ratio preference optimisation: the chosen sequence's NLL (token-weighted over the
    global batch; as TRL, every non-pad token of the chosen sequence after the first, prompt
    included) minus beta * the mean log-sigmoid of the log odds ratio. No reference policy."""

    name = "orpo"

    def __init__(self, cfg: PreferenceConfig) -> None:
        self.beta = cfg.beta
        self.pairs_per_token = 1.0
        self.metrics = MetricSums(REWARDS + ("log_odds_ratio", "log_odds_chosen", "nll_loss"))

    def items(self, batch: dict[str, torch.Tensor]) -> int:
        return _pairs(batch)

    @staticmethod
    def nll_tokens(batch: dict[str, torch.Tensor]) -> int:
        chosen_mask, _ = _chunk(batch["attention_mask"])
        return int(chosen_mask[:, 1:].sum())

    def begin_step(self, model: Any, batches: list[Batch], device: Any, reduce: bool = True) -> None:
        counts = [float(sum(_pairs(b) for b in batches)), float(sum(self.nll_tokens(b) for b in batches))]
        if reduce:
            from launcher.runtime.trainer.distributed import all_sum

            counts = all_sum(counts, device)
        # the NLL sum times pairs/tokens, divided by the global pairs, is the global token mean
        self.pairs_per_token = counts[0] / max(counts[1], 1.0)

    def loss(self, model: Any, batch: dict[str, torch.Tensor], num_items: float) -> torch.Tensor:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        logits = forward_logits(model, ids, mask)
        chosen_logits, _ = _chunk(logits)
        chosen_ids, _ = _chunk(ids.masked_fill(mask == 0, -100))
        nll = F.cross_entropy(chosen_logits[:, :-1].flatten(0, 1).float(), chosen_ids[:, 1:].flatten(),
                              ignore_index=-100, reduction="sum")
        mean_c, mean_r = _chunk(sequence_logps(logits, labels, average=True))
        ratio, log_odds = losses.orpo_odds_ratio(mean_c, mean_r, self.beta)
        m = self.metrics
        chosen, rejected = self.beta * mean_c.detach(), self.beta * mean_r.detach()
        m.add("rewards/chosen", chosen)
        m.add("rewards/rejected", rejected)
        m.add("rewards/accuracies", (chosen > rejected).float())
        m.add("log_odds_ratio", ratio / self.beta)
        m.add("log_odds_chosen", log_odds)
        m.add("nll_loss", nll, count=self.nll_tokens(batch))
        return (nll * self.pairs_per_token - ratio.sum()) / num_items

    def take_metrics(self) -> dict[str, tuple[float, float]]:
        return self.metrics.take()


class KTO:
    """Kahneman-Tversky optimisation on examples labelled desirable or undesirable."""

    name = "kto"

    def __init__(self, cfg: PreferenceConfig, reference: ModuleReference) -> None:
        self.cfg, self.reference = cfg, reference
        self.kl = torch.zeros(())
        self.metrics = MetricSums(("rewards/chosen", "rewards/rejected", "kl"))

    def items(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0]

    def begin_step(self, model: Any, batches: list[Batch], device: Any, reduce: bool = True) -> None:
        """The KL estimate z0 of the step: the mean over the global batch of the policy's minus
        the reference's log-probs of mismatched (prompt, completion) pairs, clamped at 0, no
        gradient (TRL's; TRL averages per micro-batch over the ranks, this over the whole step)."""
        from launcher.runtime.trainer.batches import to_device

        total, n = 0.0, 0.0
        for batch in batches:
            b = to_device(batch, device)
            ids, mask, labels = b["kl_input_ids"], b["kl_attention_mask"], b["kl_labels"]
            with torch.no_grad():
                policy = sequence_logps(forward_logits(model, ids, mask), labels)
            ref = self.reference.logps(model, ids, mask, labels)
            total += float((policy - ref).sum())
            n += ids.shape[0]
        if reduce:
            from launcher.runtime.trainer.distributed import all_sum

            total, n = all_sum([total, n], device)
        self.kl = torch.tensor(max(total / max(n, 1.0), 0.0))

    def loss(self, model: Any, batch: dict[str, torch.Tensor], num_items: float) -> torch.Tensor:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        policy = sequence_logps(forward_logits(model, ids, mask), labels)
        ref = self.reference.logps(model, ids, mask, labels)
        desirable = batch["desirable"].bool()
        c = self.cfg
        per_example, rewards = losses.kto(policy, ref, desirable, self.kl.to(policy.device), c.beta,
                                          c.desirable_weight, c.undesirable_weight)
        m = self.metrics
        m.add("rewards/chosen", rewards[desirable])
        m.add("rewards/rejected", rewards[~desirable])
        m.add("kl", self.kl.reshape(1), count=1)
        return per_example.sum() / num_items

    def take_metrics(self) -> dict[str, tuple[float, float]]:
        return self.metrics.take()


def metric_means(sums: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Means of all-reduced sums; `rewards/margins` = chosen - rejected (per pair for DPO and
    ORPO, the mean over the pairs being the difference of the means; KTO as TRL logs it)."""
    out = {name: s / c for name, (s, c) in sums.items() if c > 0}
    if "rewards/chosen" in out and "rewards/rejected" in out:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out
