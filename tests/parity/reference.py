"""The reference: a plain single-process PyTorch training loop, written apart from the launcher.

It shares only the data (token examples from `launcher.data`) and the initial weights (a
directory from `cells.make_model`) with the launcher; model class, optimizer, schedule,
clipping and loss are transformers and torch used directly:

- loss of step k: sum of cross-entropy over every label token of the global batch (labels
  shifted as Hugging Face does: logits at t predict labels at t+1) / the number of those tokens,
  from ONE forward over the whole global batch padded to its longest sequence;
- clipping by the global L2 norm of all gradients (torch's clip_grad_norm_, as DeepSpeed does);
- torch.optim.AdamW, eps 1e-8, weight decay only on parameters with 2+ dimensions whose name has
  no "norm" (biases, norms and other 1-D parameters get none);
- learning rate lr * (k+1)/warmup for the first `warmup` steps, then cosine to lr * min_ratio at
  the last step.

`loss_mode="mean_of_means"` is the classic gradient-accumulation bug, kept to prove that the
harness catches it: the mean over micro-batches of each micro-batch's own token mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

IGNORE = -100


@dataclass
class ReferenceResult:
    losses: list[float]
    grad_norms: list[float]
    sample_ids: list[list[int]]
    label_tokens: list[int]
    state: dict[str, torch.Tensor] = field(repr=False)


def lr_at(step: int, *, lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine decay."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def pad_batch(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input ids with `pad_id`, labels with -100, mask 0."""
    n = max(len(e["input_ids"]) for e in examples)
    ids = [e["input_ids"] + [pad_id] * (n - len(e["input_ids"])) for e in examples]
    labels = [e["labels"] + [IGNORE] * (n - len(e["labels"])) for e in examples]
    mask = [[1] * len(e["input_ids"]) + [0] * (n - len(e["input_ids"])) for e in examples]
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
            "attention_mask": torch.tensor(mask)}


def ce_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the batch's label tokens, and their number."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    target = batch["labels"][:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return loss, int((target != IGNORE).sum())


def run_reference(
    model_dir: Path,
    examples: list[dict],
    *,
    pad_id: int,
    steps: int,
    global_batch: int,
    train: dict[str, Any],
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    loss_mode: str = "token",
    micro: int = 1,
) -> ReferenceResult:
    """Train `steps` steps on examples 0.. in order, `global_batch` per step."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(train["seed"])
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn_implementation)
    model.train()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "norm" not in name.lower() else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": train["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=train["lr"], betas=tuple(train["betas"]), eps=1e-8,
    )
    params = [p for p in model.parameters()]
    losses, norms, ids, counts = [], [], [], []
    for k in range(steps):
        idx = list(range(k * global_batch, (k + 1) * global_batch))
        batch = [examples[i] for i in idx]
        if loss_mode == "token":
            total, n = ce_sum(model, pad_batch(batch, pad_id))
            loss = total / n
        elif loss_mode == "mean_of_means":
            parts = []
            for j in range(0, global_batch, micro):
                s, c = ce_sum(model, pad_batch(batch[j : j + micro], pad_id))
                parts.append(s / c)
            loss = torch.stack(parts).mean()
            n = sum(sum(t != IGNORE for t in e["labels"][1:]) for e in batch)
        else:
            raise ValueError(f"unknown loss_mode {loss_mode!r}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, train["max_grad_norm"])
        rate = lr_at(k, lr=train["lr"], warmup=train["warmup_steps"], total=steps,
                     min_ratio=train["min_lr_ratio"])
        for g in opt.param_groups:
            g["lr"] = rate
        opt.step()
        losses.append(loss.item())
        norms.append(float(norm))
        ids.append(idx)
        counts.append(int(n))
    state = {k: v.detach().to(torch.float64).clone() for k, v in model.state_dict().items()}
    return ReferenceResult(losses, norms, ids, counts, state)
