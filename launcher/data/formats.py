"""Raw rows -> training examples, per data format (alpaca, sharegpt, chat, text).

An SFT example is `{"input_ids", "labels", "position_ids": None}` with prompt labels -100 when
`data.mask_prompt`; a text row becomes a document (token ids ending with eos) that packing.py
cuts into sequences. Every piece is tokenized with `add_special_tokens=False` and bos is added
here, once, exactly when the tokenizer adds it itself (`adds_bos`), so `tokenizer(prompt)` at
generation time reproduces the training prefix.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from launcher.data.chat import TemplateRowError, render, render_with_spans, shift_spans, strip_bos
from launcher.data.sources import Row
from launcher.errors import DataError
from launcher.recipe.sections import DataConfig

IGNORE_INDEX = -100
"""Label of tokens without loss (the value transformers' loss functions skip)."""

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "model": "assistant", "system": "system", "function_call": "assistant",
         "observation": "tool", "tool": "tool"}  # fmt: skip
"""Accepted speaker names (ShareGPT's, LLaMA-Factory's and OpenAI's spellings) -> chat template
roles. A sharegpt `function_call` turn is an assistant turn calling a tool (its value the JSON
`{"name", "arguments"}`), an `observation` the tool's answer."""


class RowError(ValueError):
    """What is wrong with one row; `normalize` adds the file and row number. `hint`: the format
    the row looks like, when it lacks the fields of the recipe's format."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


FORMAT_KEYS = {"alpaca": ("instruction",), "sharegpt": ("conversations", "messages"),
               "chat": ("messages", "conversations"), "text": ("text",)}  # fmt: skip
"""The field(s) a row of each format must have: sharegpt and chat read either list of turns."""

_TELLTALE = (("messages", "chat"), ("conversations", "sharegpt"), ("instruction", "alpaca"), ("text", "text"))
"""A field that marks what format a row was written in, most specific first."""


def guess_format(row: dict, expected: str) -> str | None:
    """`data.format=X (it has 'key')` when `row` lacks `expected`'s fields but has another
    format's telltale field: a wrong data.format is the likely mistake, not a broken file."""
    if any(row.get(k) is not None for k in FORMAT_KEYS[expected]):
        return None
    for key, fmt in _TELLTALE:
        if fmt != expected and row.get(key) is not None:  # Arrow fills absent columns with None
            return f"data.format={fmt} (it has '{key}')"
    return None


@dataclass
class Counts:
    """What happened to rows on the way to examples (reported in DataSplits.stats)."""

    rows: int = 0
    skipped_malformed: int = 0
    truncated: int = 0
    dropped_no_labels: int = 0
    """SFT examples whose response was cut off entirely by max_seq_len."""

    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    """Skipped rows per kind of problem (with `data.skip_malformed`)."""

    def add(self, other: "Counts") -> None:
        self.rows += other.rows
        self.skipped_malformed += other.skipped_malformed
        self.truncated += other.truncated
        self.dropped_no_labels += other.dropped_no_labels
        for reason, n in other.skipped_by_reason.items():
            self.skipped_by_reason[reason] = self.skipped_by_reason.get(reason, 0) + n


@dataclass
class Item:
    """A validated row: alpaca (prompt, response), chat messages, or a text document."""

    row: Row
    prompt: str = ""
    response: str = ""
    messages: list[dict] = field(default_factory=list)
    text: str = ""
    tools: list[dict] | None = None
    """Tool definitions (JSON schemas) handed to the chat template with `tools=`."""


def adds_bos(tokenizer) -> bool:
    """Whether `tokenizer(text)` starts with bos by itself (Llama, the bytes tokenizer: yes;
    GPT-2, Qwen: no). Training sequences follow the same convention."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def alpaca_prompt(template: str, instruction: str, input_text: str) -> str:
    block = f"{input_text}\n\n" if input_text else ""
    values = {"instruction": instruction, "input_block": block}
    # One pass, so braces inside the instruction or input are left alone.
    return re.sub(r"\{(instruction|input_block)\}", lambda m: values[m.group(1)], template)


def _field(row: dict, name: str, *, optional: bool = False) -> str:
    value = row.get(name)
    if value is None and optional:
        return ""
    if value is None:
        raise RowError(f"missing field '{name}'")
    if not isinstance(value, str):
        raise RowError(f"field '{name}' must be a string, got {type(value).__name__}")
    return value


def _alpaca(row: Row, data: DataConfig) -> Item:
    instruction = _field(row.data, "instruction")
    input_text = _field(row.data, "input", optional=True)
    if not (instruction.strip() or input_text.strip()):
        raise RowError("'instruction' and 'input' are both empty")
    prompt = alpaca_prompt(data.prompt_template, instruction, input_text)
    return Item(row=row, prompt=prompt, response=_field(row.data, "output"))


def _first(d: dict, *keys: str) -> Any:
    """The first of `keys` present and not None: Arrow fills a key missing from some rows of a
    file (e.g. `from` where other rows say `role`) with None."""
    return next((d[k] for k in keys if d.get(k) is not None), None)


def _drop_none(value: Any) -> Any:
    """Arrow gives every struct in a column every key seen in any row (filled with None): a tool
    call's arguments or a tool's schema would render keys it never had."""
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def _json_field(value: Any, what: str) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise RowError(f"{what} is not valid JSON ({e.msg})") from None
    return value


def _tool_calls(turn: dict, n: int, content: Any, speaker: str) -> list[dict] | None:
    """An assistant turn's tool calls: chat `tool_calls`, or a sharegpt `function_call` value."""
    if speaker == "function_call":
        call = _json_field(content, f"turn {n} (function_call)")
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise RowError(f'turn {n} (function_call) must hold {{"name": ..., "arguments": {{...}}}}')
        calls = [call]
    else:
        calls = turn.get("tool_calls")
        if not calls:
            return None
        if not isinstance(calls, list):
            raise RowError(f"turn {n}: 'tool_calls' must be a list")
    out = []
    for call in calls:
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RowError(f"turn {n}: a tool call needs a function 'name'")
        args = _json_field(fn.get("arguments") or {}, f"turn {n}: the arguments of {fn['name']}")
        out.append({"type": "function", "function": {"name": fn["name"], "arguments": _drop_none(args)}})
    return out


def _messages(row: dict) -> list[dict]:
    """ShareGPT `conversations` of `{from, value}` or chat `messages` of `{role, content}`, tool
    calls and tool results included."""
    turns = _first(row, "conversations", "messages")
    if not isinstance(turns, list) or not turns:
        raise RowError("needs a non-empty list 'conversations' (or 'messages')")
    messages = []
    system = row.get("system")  # some ShareGPT exports keep the system prompt beside the turns
    if isinstance(system, str) and system:
        messages.append({"role": "system", "content": system})
    for n, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise RowError(f'turn {n} must be an object like {{"from": "human", "value": ...}}')
        speaker, content = _first(turn, "from", "role"), _first(turn, "value", "content")
        if speaker not in ROLES:
            raise RowError(f"turn {n} has speaker {speaker!r}; use one of {', '.join(ROLES)}")
        calls = _tool_calls(turn, n, content, speaker)
        if speaker == "function_call":
            content = ""
        if not isinstance(content, str) and not (calls and content is None):
            raise RowError(f"turn {n} needs a string 'value' (or 'content')")
        message = {"role": ROLES[speaker], "content": content or ""}
        if calls:
            message["tool_calls"] = calls
        if message["role"] == "tool" and turn.get("name"):
            message["name"] = turn["name"]
        messages.append(message)
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError("has no assistant (gpt) turn to learn from")
    return messages


def _tools(row: dict) -> list[dict] | None:
    tools = _json_field(row.get("tools"), "field 'tools'")
    if tools in (None, "", []):
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RowError("field 'tools' must be a list of tool definitions (JSON objects)")
    return _drop_none(tools)


def _validate(row: Row, data: DataConfig) -> Item:
    if not isinstance(row.data, dict):
        raise RowError(f"must be an object, got {type(row.data).__name__}")
    try:
        if data.format == "alpaca":
            return _alpaca(row, data)
        if data.format == "text":
            return Item(row=row, text=_field(row.data, "text"))
        return Item(row=row, messages=_messages(row.data), tools=_tools(row.data))
    except RowError as e:
        raise RowError(str(e), guess_format(row.data, data.format)) from None


def normalize(rows: list[Row], data: DataConfig, counts: Counts) -> list[Item]:
    """Validated rows; a malformed one stops with a DataError naming it, or is counted and
    skipped with `data.skip_malformed`."""
    items = []
    counts.rows += len(rows)
    for row in rows:
        try:
            items.append(_validate(row, data))
        except RowError as e:
            _malformed(row, str(e), data, counts, e.hint)
    return items


def _malformed(
    row: Row, problem: str, data: DataConfig, counts: Counts, looks_like: str | None = None
) -> None:
    if not data.skip_malformed:
        where = f"{row.source}: row {row.number}: {problem} (data.format={data.format})"
        if looks_like:
            fmt = looks_like.split()[0]
            raise DataError(
                f"{where}; this row looks like {looks_like}: set {fmt}, or fix the row, or set "
                "data.skip_malformed=true to skip such rows"
            )
        raise DataError(f"{where}: fix the row, or set data.skip_malformed=true to skip such rows")
    counts.skipped_malformed += 1
    # the kind of problem, without the row-specific numbers and the hint after ';'
    reason = re.sub(r"\d+", "N", problem.split(";")[0])[:100]
    counts.skipped_by_reason[reason] = counts.skipped_by_reason.get(reason, 0) + 1


def _finish(ids: list[int], labels: list[int], data: DataConfig, counts: Counts) -> dict | None:
    if not data.mask_prompt:
        labels = [IGNORE_INDEX, *ids[1:]]  # the first token is never a target
    if len(ids) > data.max_seq_len:
        ids, labels = ids[: data.max_seq_len], labels[: data.max_seq_len]
        counts.truncated += 1
    # labels[0] is never a target (logits[t] predict labels[t+1]), so it does not count.
    if all(label == IGNORE_INDEX for label in labels[1:]):
        counts.dropped_no_labels += 1
        return None
    return {"input_ids": ids, "labels": labels, "position_ids": None}


def _encode_alpaca(items: list[Item], tokenizer, data: DataConfig, counts: Counts) -> list[dict]:
    head = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    eos = tokenizer.eos_token_id
    # Prompt and response are tokenized apart, as at generation time (prompt alone, then output).
    prompts = tokenizer([i.prompt for i in items], add_special_tokens=False)["input_ids"]
    responses = tokenizer([i.response for i in items], add_special_tokens=False)["input_ids"]
    out: list[dict | None] = []
    for p, r in zip(prompts, responses):
        masked = [IGNORE_INDEX] * (len(head) + len(p))
        out.append(_finish(head + p + r + [eos], masked + r + [eos], data, counts))
    return [e for e in out if e is not None]


def _labels_from_offsets(ids: list[int], offsets: list[tuple[int, int]], spans) -> list[int]:
    labels = []
    for token, (start, _) in zip(ids, offsets):
        inside = any(a <= start < b for a, b in spans)
        labels.append(token if inside else IGNORE_INDEX)
    return labels


def _encode_chat(items: list[Item], tokenizer, data: DataConfig, counts: Counts) -> list[dict]:
    bos = adds_bos(tokenizer)
    head = [tokenizer.bos_token_id] if bos else []
    texts, spans = [], []
    for item in items:
        try:
            full, turn_spans = render_with_spans(tokenizer, item.messages, item.tools)
        except TemplateRowError as e:
            _malformed(item.row, str(e), data, counts)
            continue
        text = strip_bos(tokenizer, full, bos)
        texts.append(text)
        spans.append(shift_spans(turn_spans, len(full) - len(text)))
    out: list[dict | None] = []
    if not texts:
        return []
    if tokenizer.is_fast:
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        for ids, offsets, turn_spans in zip(enc["input_ids"], enc["offset_mapping"], spans):
            labels = _labels_from_offsets(ids, offsets, turn_spans)
            out.append(_finish(head + ids, [IGNORE_INDEX] * len(head) + labels, data, counts))
    else:  # no offsets: tokenize prompt and response pieces apart (boundaries may differ slightly)
        for text, turn_spans in zip(texts, spans):
            ids, labels, cursor = list(head), [IGNORE_INDEX] * len(head), 0
            for a, b in [*turn_spans, (len(text), len(text))]:
                prompt = tokenizer.encode(text[cursor:a], add_special_tokens=False)
                reply = tokenizer.encode(text[a:b], add_special_tokens=False)
                ids += prompt + reply
                labels += [IGNORE_INDEX] * len(prompt) + reply
                cursor = b
            out.append(_finish(ids, labels, data, counts))
    return [e for e in out if e is not None]


def encode_sft(items: list[Item], tokenizer, data: DataConfig, counts: Counts) -> list[dict]:
    """SFT examples (unpacked), truncated to `max_seq_len`."""
    if not items:
        return []
    if data.format == "alpaca":
        return _encode_alpaca(items, tokenizer, data, counts)
    return _encode_chat(items, tokenizer, data, counts)


def encode_documents(items: list[Item], tokenizer) -> list[list[int]]:
    """Token ids of each text document: [bos] + text + [eos] (bos as the tokenizer does it)."""
    if not items:
        return []
    head = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    eos = tokenizer.eos_token_id
    texts = [i.text for i in items]
    backend = getattr(tokenizer, "backend_tokenizer", None) if tokenizer.is_fast else None
    if backend is not None:  # the same Rust call `tokenizer(texts)` makes, without its wrapping
        return [[*head, *e.ids, eos] for e in backend.encode_batch(texts, add_special_tokens=False)]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [head + doc + [eos] for doc in ids]


def generation_prompt(item: Item, tokenizer, data: DataConfig) -> dict[str, Any] | None:
    """`{"prompt", "expected"}`: an SFT item's prompt text ready for `tokenizer(prompt)` and
    generation, and the reference answer (the last assistant turn for conversations)."""
    if data.format == "alpaca":
        return {"prompt": item.prompt, "expected": item.response}
    last = max(i for i, m in enumerate(item.messages) if m["role"] == "assistant")
    try:
        text = render(tokenizer, item.messages[:last], add_generation_prompt=True, tools=item.tools)
    except TemplateRowError:
        return None  # e.g. a template that cannot render a conversation without a user turn
    return {
        "prompt": strip_bos(tokenizer, text, adds_bos(tokenizer)),
        "expected": item.messages[last]["content"],
    }
