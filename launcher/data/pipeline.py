"""The recipe's data, end to end: rows -> validated items -> token examples, train and eval.

Everything is held in plain Python lists of ints: this is the reference path (tests, the parity
harness, a worker started without prepared data). `launcher run` and `launcher data prepare` use
prepare.py, which writes exactly these examples to memory-mapped files, batch by batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from launcher.data import formats, packing, preference
from launcher.data.chat import render, strip_bos
from launcher.data.formats import IGNORE_INDEX, Counts, Item
from launcher.data.holdout import by_sequences, held_out
from launcher.data.sources import Row, load_files, load_train_rows
from launcher.errors import DataError
from launcher.recipe.sections import Recipe

MAX_EVAL_PROMPTS = 64


@dataclass
class DataSplits:
    train: list[dict]
    """Examples: `{"input_ids": list[int], "labels": list[int], "position_ids": list[int] | None}`
    (position ids only for packed examples)."""

    eval: list[dict]
    """Same as `train`; empty without `data.eval_path` or `data.eval_fraction`."""

    eval_prompts: list[dict]
    """Up to 64 SFT eval prompts, `{"prompt": str, "expected": str}`: the prompt text encodes
    with `tokenizer(prompt)` into exactly the prefix the model was trained on."""

    stats: dict
    """rows, skipped_malformed, truncated, dropped_no_labels, train_examples, eval_examples,
    train_tokens (tokens with a label)."""


def split_rows(rows: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Hold out `fraction` of the rows (at least one), chosen by `seed`, before tokenizing, so
    an eval row never shares a packed sequence or a tokenization decision with training."""
    picked = held_out(len(rows), fraction, seed)
    if len(picked) >= len(rows):
        raise DataError(
            f"data.eval_fraction: {len(rows)} rows are too few to hold out {fraction}: lower it, "
            "or give separate eval files in data.eval_path"
        )
    picked = set(picked)
    train = [r for i, r in enumerate(rows) if i not in picked]
    held = [r for i, r in enumerate(rows) if i in picked]
    return train, held


def _split_sequences(examples: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Text with too few documents to hold out whole ones: hold out sequences instead."""
    if len(examples) < 2:
        raise DataError(f"data.eval_fraction: {len(examples)} sequence(s) are too few to hold out "
                        "evaluation data: give more data, or set data.eval_fraction=0")
    picked = set(held_out(len(examples), fraction, seed))
    return ([e for i, e in enumerate(examples) if i not in picked],
            [e for i, e in enumerate(examples) if i in picked])


def _examples(items: list, recipe: Recipe, tokenizer, counts: Counts) -> list[dict]:
    data = recipe.data
    if preference.kind(recipe.train.task):
        return preference.encode(items, tokenizer, data, counts)
    if data.format == "text":
        docs = formats.encode_documents(items, tokenizer)
        if data.packing:
            return packing.pack_documents(docs, data.max_seq_len)
        return packing.chunk_documents(docs, data.max_seq_len)
    examples = formats.encode_sft(items, tokenizer, data, counts)
    return packing.pack_examples(examples, data.max_seq_len) if data.packing else examples


def build_datasets(recipe: Recipe, tokenizer) -> DataSplits:
    """Load, validate, split, tokenize and (optionally) pack the recipe's data."""
    data = recipe.data
    counts = Counts()
    rows, unparsable = load_train_rows(data)
    eval_rows: list[Row] = []
    if data.eval_path:
        eval_rows, eval_unparsable = load_files(data.eval_path, "data.eval_path", data)
        unparsable += eval_unparsable
    elif data.eval_fraction and not by_sequences(data, len(rows)):
        rows, eval_rows = split_rows(rows, data.eval_fraction, recipe.train.seed)
    counts.skipped_malformed += unparsable
    counts.rows += unparsable

    pref = preference.kind(recipe.train.task) is not None
    if pref:
        train_items = preference.normalize(rows, data, recipe.train.task, counts)
        eval_items = preference.normalize(eval_rows, data, recipe.train.task, counts)
    else:
        train_items = formats.normalize(rows, data, counts)
        eval_items = formats.normalize(eval_rows, data, counts)
    train = _examples(train_items, recipe, tokenizer, counts)
    evaluation = _examples(eval_items, recipe, tokenizer, counts)
    if data.eval_fraction and by_sequences(data, len(rows)):
        train, evaluation = _split_sequences(train, data.eval_fraction, recipe.train.seed)
    if not train:
        raise DataError(
            f"no training examples left out of {counts.rows} rows ({counts.skipped_malformed} "
            f"malformed, {counts.dropped_no_labels} with the response cut off by "
            f"data.max_seq_len={data.max_seq_len}): check the data, or raise data.max_seq_len"
        )

    prompts: list[dict] = []
    if data.format != "text":
        for item in eval_items:
            if len(prompts) == MAX_EVAL_PROMPTS:
                break
            prompt = preference.generation_prompt(item, tokenizer) if pref else formats.generation_prompt(item, tokenizer, data)
            if prompt is not None:
                prompts.append(prompt)

    stats = dataclasses.asdict(counts) | {
        "train_examples": len(train),
        "eval_examples": len(evaluation),
        "train_tokens": sum(t != IGNORE_INDEX for ex in train for t in ex["labels"]),
    }
    return DataSplits(train=train, eval=evaluation, eval_prompts=prompts, stats=stats)


def render_prompt(recipe: Recipe, tokenizer, user_text: str) -> str:
    """A free-text prompt (from `sample.prompts`) formatted as in training, ready for
    `tokenizer(prompt)` and generation: the alpaca template with `user_text` as the instruction
    (write "instruction\\n\\ninput" to fill both parts), the chat template with a generation
    prompt for sharegpt/chat, the raw text for text."""
    data = recipe.data
    if data.format == "alpaca":
        return formats.alpaca_prompt(data.prompt_template, user_text, "")
    if data.format == "text":
        return user_text
    text = render(tokenizer, [{"role": "user", "content": user_text}], add_generation_prompt=True)
    return strip_bos(tokenizer, text, formats.adds_bos(tokenizer))
