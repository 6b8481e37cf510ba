"""Rows -> token ids in batches, for `datasets.Dataset.map` on every core while preparing.

Each batch of raw rows goes through the same functions as the in-memory path (formats.py:
validation, prompt masking, truncation), so a prepared data set holds exactly the tokens that
path produces. A batch returns its examples (SFT: `input_ids` and `labels`; text: one document's
`input_ids` each) and one last row with empty `input_ids` whose `_stats` column carries the
batch's counts (rows, skipped per reason, truncated): map's output rows need not match its
input rows one to one, and the counts must survive the worker processes.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import numpy as np

from launcher.data import formats, preference
from launcher.data.formats import Counts
from launcher.data.sources import Row
from launcher.recipe.sections import DataConfig


def rename(row: dict, columns: dict[str, str], roles: dict[str, str]) -> dict:
    """A source's own column and speaker names -> the format's (`columns`: format field ->
    column; `roles`: source speaker -> known speaker)."""
    if columns:
        row = dict(row)
        for wanted, have in columns.items():
            if have in row:
                row[wanted] = row.pop(have)
    if roles:
        for key in ("conversations", "messages"):
            turns = row.get(key)
            if isinstance(turns, list):
                row[key] = [_rename_turn(t, roles) for t in turns]
    return row


def _rename_turn(turn: Any, roles: dict[str, str]) -> Any:
    if not isinstance(turn, dict):
        return turn
    out = dict(turn)
    for k in ("from", "role"):
        if out.get(k) in roles:
            out[k] = roles[out[k]]
    return out


def batch_rows(batch: dict[str, list], names: list[str], columns: dict, roles: dict) -> list[Row]:
    """A map batch (columns of lists) -> Rows naming their file and row number."""
    keys = [k for k in batch if not k.startswith("_")]
    rows = []
    for i, number in enumerate(batch["_row"]):
        data = json.loads(batch["_raw"][i]) if "_raw" in batch else {k: batch[k][i] for k in keys}
        rows.append(Row(names[batch["_src"][i]], number, rename(data, columns, roles)))
    return rows


def encode_batch(
    batch: dict[str, list], *, tokenizer: Any, data: DataConfig, names: list[str], columns: dict, roles: dict,
    task: str = "sft",
) -> dict[str, list]:
    """The map function: a batch of rows -> its examples plus one stats row."""
    counts = Counts()
    if preference.kind(task):
        return _encode_preference(batch_rows(batch, names, columns, roles), tokenizer, data, task, counts)
    items = formats.normalize(batch_rows(batch, names, columns, roles), data, counts)
    if data.format == "text":
        docs = formats.encode_documents(items, tokenizer)
        out: dict[str, list] = {"input_ids": docs, "labels": [[] for _ in docs]}
    else:
        examples = formats.encode_sft(items, tokenizer, data, counts)
        out = {"input_ids": [e["input_ids"] for e in examples], "labels": [e["labels"] for e in examples]}
    n = len(out["input_ids"])
    # int32 arrays: Arrow stores lists of Python ints as int64, twice the bytes to write and read
    out["input_ids"] = [np.asarray(x, dtype=np.int32) for x in out["input_ids"]] + [np.zeros(0, np.int32)]
    out["labels"] = [np.asarray(x, dtype=np.int32) for x in out["labels"]] + [np.zeros(0, np.int32)]
    out["_stats"] = [""] * n + [json.dumps(asdict(counts))]
    return out


def _encode_preference(rows: list[Row], tokenizer: Any, data: DataConfig, task: str, counts: Counts) -> dict:
    """Preference examples as one token row each: a pair's chosen then rejected sequence back to
    back, `_second` the length of the chosen part (where writer.py marks the second sequence);
    a KTO example's `_desirable` 1 or 0."""
    examples = preference.encode(preference.normalize(rows, data, task, counts), tokenizer, data, counts)
    ids = [e["input_ids"] + e.get("rejected_input_ids", []) for e in examples]
    labels = [e["labels"] + e.get("rejected_labels", []) for e in examples]
    second = [len(e["input_ids"]) if "rejected_input_ids" in e else 0 for e in examples]
    desirable = [int(e.get("desirable", False)) for e in examples]
    n = len(examples)
    return {
        "input_ids": [np.asarray(x, dtype=np.int32) for x in ids] + [np.zeros(0, np.int32)],
        "labels": [np.asarray(x, dtype=np.int32) for x in labels] + [np.zeros(0, np.int32)],
        "_second": second + [0], "_desirable": desirable + [0],
        "_stats": [""] * n + [json.dumps(asdict(counts))],
    }


def counts_from(stats: list[str]) -> Counts:
    total = Counts()
    for s in stats:
        if s:
            total.add(Counts(**json.loads(s)))
    return total
