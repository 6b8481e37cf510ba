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
