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

`dtype=torch.bfloat16` is mixed precision as it should be: fp32 master weights (the bf16-rounded
initial weights, as a bf16 model holds them) updated by AdamW, a bf16 copy of them for forward and
backward, each micro-batch's bf16 gradients upcast and summed in fp32, the loss computed from fp32
logits (as transformers' loss does). `micro` splits the global batch into micro-batches of that
size (in reverse order with `reverse`): another summation order, for the noise floor.

`loss_mode="mean_of_means"` is the classic gradient-accumulation bug, kept to prove that the
harness catches it: the mean over micro-batches of each micro-batch's own token mean.
"""

from __future__ import annotations

import copy
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
    """The final (master) weights, fp64."""
    init: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)
    """The initial (master) weights, fp64: what the run started from (bf16-rounded in bf16)."""


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
    # fp32 logits for the loss, as transformers' own loss does (a no-op in fp32)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    target = batch["labels"][:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return loss, int((target != IGNORE).sum())


def _chunks(batch: list[dict], micro: int | None, reverse: bool) -> list[list[dict]]:
    size = micro or len(batch)
    parts = [batch[j : j + size] for j in range(0, len(batch), size)]
    return parts[::-1] if reverse else parts


def _accumulate_fp32(master: torch.nn.Module, work: torch.nn.Module) -> None:
    """Add the bf16 copy's gradients, upcast, to the fp32 masters' and clear them."""
    if work is master:
        return
    for pm, pw in zip(master.parameters(), work.parameters()):
        if pw.grad is not None:
            g = pw.grad.to(torch.float32)
            pm.grad = g if pm.grad is None else pm.grad.add_(g)
            pw.grad = None


def _backward(master, work, batch: list[dict], *, pad_id: int, loss_mode: str, micro: int | None,
              reverse: bool) -> tuple[float, int]:
    """One step's gradients on `master` (fp32); returns the step's loss and label tokens."""
    n = sum(sum(t != IGNORE for t in e["labels"][1:]) for e in batch)
    if loss_mode == "token":
        total = 0.0
        for part in _chunks(batch, micro, reverse):
            s, _ = ce_sum(work, pad_batch(part, pad_id))
            (s / n).backward()
            _accumulate_fp32(master, work)
            total += s.item()
        return total / n, n
    if loss_mode == "mean_of_means":
        parts = []
        for part in _chunks(batch, micro or 1, reverse):
            s, c = ce_sum(work, pad_batch(part, pad_id))
            parts.append(s / c)
        loss = torch.stack(parts).mean()
        loss.backward()
        _accumulate_fp32(master, work)
        return loss.item(), n
    raise ValueError(f"unknown loss_mode {loss_mode!r}")


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
    micro: int | None = None,
    reverse: bool = False,
) -> ReferenceResult:
    """Train `steps` steps on examples 0.. in order, `global_batch` per step (one forward over it
    unless `micro` splits it)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(train["seed"])
    mixed = dtype == torch.bfloat16
    work = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn_implementation)
    master = copy.deepcopy(work).to(torch.float32) if mixed else work
    work.train()
    decay, no_decay = [], []
    for name, p in master.named_parameters():
        (decay if p.ndim >= 2 and "norm" not in name.lower() else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": train["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=train["lr"], betas=tuple(train["betas"]), eps=1e-8,
    )
    params = list(master.parameters())
    init = {k: v.detach().to(torch.float64).clone() for k, v in master.state_dict().items()}
    losses, norms, ids, counts = [], [], [], []
    for k in range(steps):
        idx = list(range(k * global_batch, (k + 1) * global_batch))
        opt.zero_grad(set_to_none=True)
        loss, n = _backward(master, work, [examples[i] for i in idx], pad_id=pad_id, loss_mode=loss_mode,
                            micro=micro, reverse=reverse)
        norm = torch.nn.utils.clip_grad_norm_(params, train["max_grad_norm"])
        rate = lr_at(k, lr=train["lr"], warmup=train["warmup_steps"], total=steps,
                     min_ratio=train["min_lr_ratio"])
        for g in opt.param_groups:
            g["lr"] = rate
        opt.step()
        if mixed:
            with torch.no_grad():
                for pw, pm in zip(work.parameters(), master.parameters()):
                    pw.copy_(pm)  # the bf16 copy the next step computes with
        losses.append(loss)
        norms.append(float(norm))
        ids.append(idx)
        counts.append(int(n))
    state = {k: v.detach().to(torch.float64).clone() for k, v in master.state_dict().items()}
    return ReferenceResult(losses, norms, ids, counts, state, init)
