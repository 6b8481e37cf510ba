"""Preference rows (DPO, ORPO: chosen and rejected; KTO: one response and a desirable label) ->
token examples, in the alpaca, sharegpt and chat forms of LLaMA-Factory's `dpo_en_demo` and
`kto_en_demo`:

- alpaca: `instruction`, `input` (optional), then `chosen` and `rejected` (strings); KTO:
  `output` and `label`;
- sharegpt: `conversations` (the shared prompt, ending with a human turn), then `chosen` and
  `rejected`, one `{"from": "gpt", "value": ...}` message each; KTO: `conversations` (or
  `messages`) ending with the judged gpt turn, and `label`;
- chat: `messages` (or `prompt`: a list of messages or a string), then `chosen` and `rejected`,
  each an assistant message, a list of messages or a string; KTO: `messages` ending with the
  judged assistant turn (or `prompt` and `completion`), and `label`.

`label` (LLaMA-Factory's `kto_tag`, also read under that name) is a boolean: true desirable.
A pair's example is `{"input_ids", "labels"}` of the chosen sequence plus `rejected_input_ids`,
`rejected_labels`; a KTO example carries `desirable`. Only the final response has labels (the
prompt, earlier turns included, is masked, as in TRL), and both sequences share the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from launcher.data.chat import TemplateRowError, render_with_spans, strip_bos
from launcher.data.formats import (
    IGNORE_INDEX, Counts, RowError, _field, _malformed, _messages, _tools, adds_bos, alpaca_prompt,
)  # fmt: skip
from launcher.data.sources import Row
from launcher.recipe.sections import DataConfig

PAIR_TASKS = ("dpo", "orpo")
PREFERENCE_TASKS = ("dpo", "orpo", "kto")
LABEL_KEYS = ("label", "kto_tag")


def kind(task: str) -> str | None:
    """How a task's examples are stored: `pairs`, `kto`, or None (SFT and pretraining)."""
    return "pairs" if task in PAIR_TASKS else "kto" if task == "kto" else None


@dataclass
class PrefItem:
    """A validated preference row: the shared prompt and its response(s)."""

    row: Row
    prompt: str = ""
    """alpaca: the prompt text (template applied)."""
    messages: list[dict] = field(default_factory=list)
    """sharegpt/chat: the prompt conversation."""
    responses: list[str] = field(default_factory=list)
    """[chosen, rejected] for a pair, [response] for KTO."""
    desirable: bool | None = None
    tools: list[dict] | None = None


def _response(value: Any, name: str) -> str:
    """A `chosen`/`rejected`/`completion` value: a string, a message, or a list of messages
    (the last assistant one is the response)."""
    if isinstance(value, list):
        said = [m for m in value if isinstance(m, dict) and _speaker(m) in ("gpt", "assistant")]
        value = said[-1] if said else None
    if isinstance(value, dict):
        value = value.get("value") if value.get("value") is not None else value.get("content")
    if value is None:
        raise RowError(f"missing field '{name}'")
    if not isinstance(value, str):
        raise RowError(f"field '{name}' must be a string or an assistant message, got {type(value).__name__}")
    return value


def _speaker(message: dict) -> str | None:
    return message.get("from") or message.get("role")


def _label(row: dict) -> bool:
    value = next((row[k] for k in LABEL_KEYS if row.get(k) is not None), None)
    if value is None:
        raise RowError("missing field 'label' (KTO's desirable/undesirable boolean, LLaMA-Factory's kto_tag)")
    if not isinstance(value, bool):
        raise RowError(f"field 'label' must be true or false, got {value!r}")
    return value


def _prompt_messages(row: dict) -> list[dict]:
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and row.get("messages") is None and row.get("conversations") is None:
        row = {**row, "messages": prompt}
    turns = row.get("conversations") if row.get("conversations") is not None else row.get("messages")
    if not isinstance(turns, list) or not turns:
        raise RowError("needs a non-empty list 'conversations' (or 'messages', or 'prompt')")
    # formats._messages wants an assistant turn; the prompt of a pair ends before it
    messages = _messages({**row, "conversations": [*turns, {"from": "gpt", "value": ""}]})
    return messages[:-1]


def _validate(row: Row, data: DataConfig, task: str) -> PrefItem:
    d = row.data
    if not isinstance(d, dict):
        raise RowError(f"must be an object, got {type(d).__name__}")
    if task == "kto":
        item = PrefItem(row=row, desirable=_label(d))
        if data.format == "alpaca":
            item.prompt = _alpaca_prompt(d, data)
            item.responses = [_field(d, "output")]
        elif d.get("completion") is not None:
            item.messages, item.tools = _prompt_messages(d), _tools(d)
            item.responses = [_response(d["completion"], "completion")]
        else:
            messages = _messages(d)
            if messages[-1]["role"] != "assistant":
                raise RowError("the last turn must be the assistant (gpt) response the label judges")
            item.messages, item.tools, item.responses = messages[:-1], _tools(d), [messages[-1]["content"]]
        return item
    if d.get("chosen") is None and d.get("rejected") is None:
        have = "output" if d.get("output") is not None else None
        hint = f" (it has '{have}': SFT data, train.task=sft)" if have else ""
        raise RowError(f"missing fields 'chosen' and 'rejected' that train.task={task} needs{hint}")
    chosen, rejected = _response(d.get("chosen"), "chosen"), _response(d.get("rejected"), "rejected")
    if data.format == "alpaca":
        return PrefItem(row=row, prompt=_alpaca_prompt(d, data), responses=[chosen, rejected])
    return PrefItem(row=row, messages=_prompt_messages(d), responses=[chosen, rejected], tools=_tools(d))


def _alpaca_prompt(d: dict, data: DataConfig) -> str:
    instruction, input_text = _field(d, "instruction"), _field(d, "input", optional=True)
    if not (instruction.strip() or input_text.strip()):
        raise RowError("'instruction' and 'input' are both empty")
    return alpaca_prompt(data.prompt_template, instruction, input_text)


def normalize(rows: list[Row], data: DataConfig, task: str, counts: Counts) -> list[PrefItem]:
    """Validated preference rows; a malformed one stops with a DataError naming the file, row and
    missing field, or is counted and skipped with `data.skip_malformed`."""
    items = []
    counts.rows += len(rows)
    for row in rows:
        try:
            items.append(_validate(row, data, task))
        except RowError as e:
            _malformed(row, str(e), data, counts)
    return items


def _pieces(item: PrefItem, response: str, tokenizer: Any) -> tuple[str, str]:
    """(prompt text, response text) as the model sees them: tokenized apart, as at generation."""
    if not item.messages:
        return item.prompt, response
    messages = [*item.messages, {"role": "assistant", "content": response}]
    full, spans = render_with_spans(tokenizer, messages, item.tools)
    start, end = spans[-1]
    return strip_bos(tokenizer, full[:start], adds_bos(tokenizer)), full[start:end]


def _sequence(prompt: list[int], reply: list[int], data: DataConfig, counts: Counts) -> dict | None:
    ids, labels = prompt + reply, [IGNORE_INDEX] * len(prompt) + reply
    if len(ids) > data.max_seq_len:
        ids, labels = ids[: data.max_seq_len], labels[: data.max_seq_len]
        counts.truncated += 1
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None
    return {"input_ids": ids, "labels": labels}


def encode(items: list[PrefItem], tokenizer: Any, data: DataConfig, counts: Counts) -> list[dict]:
    """Token examples of validated items (see the module docstring); a pair whose chosen or
    rejected response is cut off entirely by `data.max_seq_len` is dropped and counted."""
    head = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    # alpaca responses end with eos, as SFT's do; a chat template writes its own end of turn
    tail = [tokenizer.eos_token_id]
    out = []
    for item in items:
        seqs = []
        try:
            for response in item.responses:
                prompt, reply = _pieces(item, response, tokenizer)
                p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
                r = tokenizer(reply, add_special_tokens=False)["input_ids"]
                r += [] if item.messages else tail
                seqs.append(_sequence(head + p, r, data, counts))
        except TemplateRowError as e:
            _malformed(item.row, str(e), data, counts)
            continue
        if any(s is None for s in seqs):
            counts.dropped_no_labels += 1
            continue
        example = {**seqs[0], "position_ids": None}
        if len(seqs) == 2:
            example |= {"rejected_input_ids": seqs[1]["input_ids"], "rejected_labels": seqs[1]["labels"]}
        else:
            example["desirable"] = bool(item.desirable)
        out.append(example)
    return out


def generation_prompt(item: PrefItem, tokenizer: Any) -> dict[str, Any] | None:
    """`{"prompt", "expected"}` for the end-of-run samples: the prompt and the chosen (or the
    desirable) response."""
    if item.desirable is False:
        return None
    if not item.messages:
        return {"prompt": item.prompt, "expected": item.responses[0]}
    try:
        prompt, _ = _pieces(item, item.responses[0], tokenizer)
    except TemplateRowError:
        return None
    return {"prompt": prompt, "expected": item.responses[0]}
