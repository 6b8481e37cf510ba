"""Examples -> padded tensors for one micro-batch."""

from __future__ import annotations

import torch

from launcher.data.formats import IGNORE_INDEX


def collate(
    examples: list[dict], pad_id: int, pad_to: int | None = None
) -> dict[str, torch.Tensor]:
    """Pad `input_ids` with `pad_id` and `labels` with -100 to the longest example (or `pad_to`).

    Unpacked examples get an `attention_mask` (1 real, 0 pad). Packed examples (with
    `position_ids`) get `position_ids` and NO `attention_mask`: transformers only derives the
    per-document mask from position ids when no mask is passed (see packing.py). Their padding
    tail gets positions 0, 1, ... as a pseudo-document of its own, with labels -100, so it
    neither sees nor is seen by real tokens.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    if "rejected_input_ids" in examples[0]:
        return collate_pairs(examples, pad_id)
    if "desirable" in examples[0]:
        return collate_kto(examples, pad_id)
    packed = examples[0].get("position_ids") is not None
    if any((ex.get("position_ids") is not None) != packed for ex in examples):
        raise ValueError("cannot mix packed and unpacked examples in one batch")
    longest = max(len(ex["input_ids"]) for ex in examples)
    if pad_to is not None and pad_to < longest:
        raise ValueError(f"pad_to={pad_to} is shorter than the longest example ({longest})")
    length = pad_to or longest

    input_ids, labels, extra = [], [], []
    for ex in examples:
        pad = length - len(ex["input_ids"])
        input_ids.append(ex["input_ids"] + [pad_id] * pad)
        labels.append(ex["labels"] + [IGNORE_INDEX] * pad)
        if packed:
            extra.append(ex["position_ids"] + list(range(pad)))
        else:
            extra.append([1] * len(ex["input_ids"]) + [0] * pad)
    batch = {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
    }
    batch["position_ids" if packed else "attention_mask"] = torch.tensor(extra, dtype=torch.long)
    return batch


def _rejected(ex: dict) -> dict:
    return {"input_ids": ex["rejected_input_ids"], "labels": ex["rejected_labels"]}


def collate_pairs(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Preference pairs: 2B rows, the B chosen sequences then the B rejected ones, padded to one
    length, so that one forward scores both (TRL's concatenated batch)."""
    plain = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
    return collate(plain + [_rejected(e) for e in examples], pad_id)


def _completion_start(labels: list[int]) -> int:
    return next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


def collate_kto(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """KTO: the B sequences, their `desirable` flags, and the `kl_` sequences that estimate the
    KL term as TRL does: prompt i with the completion of example i-1 of the batch (mismatched
    pairs; with one example per micro-batch its own completion)."""
    plain = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
    batch = collate(plain, pad_id)
    batch["desirable"] = torch.tensor([bool(e["desirable"]) for e in examples])
    cuts = [_completion_start(e["labels"]) for e in examples]
    mismatched = []
    for i, e in enumerate(examples):
        j = (i - 1) % len(examples)
        prompt, completion = e["input_ids"][: cuts[i]], examples[j]["input_ids"][cuts[j] :]
        mismatched.append({"input_ids": prompt + completion,
                           "labels": [IGNORE_INDEX] * len(prompt) + completion})
    kl = collate(mismatched, pad_id)
    batch.update({f"kl_{k}": v for k, v in kl.items()})
    return batch
