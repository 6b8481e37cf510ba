"""Tool-calling conversations (sharegpt function_call/observation with a tools column; chat
messages with tool_calls and role tool): rendered through the chat template with the tools, the
loss on the assistant's calls and answers, never on the tool results, checked token by token."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_recipe_dict
from launcher.data import build_datasets, build_tokenizer
from launcher.data.prepare import prepare_datasets
from launcher.errors import DataError
from launcher.recipe import from_dict

TOOLS = [{"type": "function", "function": {"name": "get_weather",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CALL = {"name": "get_weather", "arguments": {"city": "Oslo"}}
SHAREGPT = {"conversations": [{"from": "human", "value": "Weather in Oslo?"},
                              {"from": "function_call", "value": json.dumps(CALL)},
                              {"from": "observation", "value": "SECRET-TOOL-OUTPUT 3C"},
                              {"from": "gpt", "value": "It is 3C in Oslo."}],
            "tools": json.dumps(TOOLS)}
CHAT = {"messages": [{"role": "user", "content": "Weather in Oslo?"},
                     {"role": "assistant", "content": None,
                      "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": json.dumps(CALL["arguments"])}}]},
                     {"role": "tool", "content": "SECRET-TOOL-OUTPUT 3C"},
                     {"role": "assistant", "content": "It is 3C in Oslo."}],
        "tools": json.dumps(TOOLS)}
# a second chat row calling a tool with other arguments: Arrow gives every row's arguments both keys
OTHER = {"messages": [{"role": "user", "content": "Add 2 and 3"},
                      {"role": "assistant", "content": "",
                       "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
                      {"role": "tool", "content": "5"},
                      {"role": "assistant", "content": "5"}]}


def recipe(tmp_path, fmt, rows, **data):
    path = tmp_path / "tools.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = tiny_recipe_dict()
    d["data"] = {"format": fmt, "path": [str(path)], "max_seq_len": 1024, "cache_dir": str(tmp_path / "c"), **data}
    return from_dict(d)


def expected(tok) -> tuple[list[int], list[int]]:
    """The bytes template's rendering, piece by piece: (text, learned?)."""
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call></s>'
    pieces = [("<|system|>\n# Tools\n" + json.dumps(TOOLS[0]) + "\n<|user|>\nWeather in Oslo?\n<|assistant|>\n", False),
              (call, True), ("<|tool|>\nSECRET-TOOL-OUTPUT 3C\n<|assistant|>\n", False),
              ("It is 3C in Oslo.</s>", True)]
    ids, labels = [tok.bos_token_id], [-100]
    for text, learned in pieces:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if learned else [-100] * len(piece)
    return ids, labels


@pytest.mark.parametrize("fmt,row", [("sharegpt", SHAREGPT), ("chat", CHAT)])
def test_tool_calls_are_learned_and_tool_results_are_not(tmp_path, fmt, row):
    r = recipe(tmp_path, fmt, [row])
    tok = build_tokenizer(r.tokenizer, None)
    ex = build_datasets(r, tok).train[0]
    want_ids, want_labels = expected(tok)
    assert ex["input_ids"] == want_ids
    assert ex["labels"] == want_labels  # token by token
    learned = tok.decode([t for t in ex["labels"] if t != -100])
    assert "SECRET" not in learned and "get_weather" in learned
    assert prepare_datasets(r, tok).train[0] == ex  # the prepared path: the same tokens


def test_arrow_filled_arguments_do_not_leak_into_the_rendering(tmp_path):
    r = recipe(tmp_path, "chat", [CHAT, OTHER])
    tok = build_tokenizer(r.tokenizer, None)
    mem = build_datasets(r, tok).train
    text = tok.decode(mem[1]["input_ids"])
    assert '{"name": "add", "arguments": {"a": 2, "b": 3}}' in text and "city" not in text
    assert [prepare_datasets(r, tok).train[i] for i in range(2)] == list(mem)


def test_a_broken_function_call_names_the_row_and_turn(tmp_path):
    bad = json.loads(json.dumps(SHAREGPT))
    bad["conversations"][1]["value"] = "get_weather(Oslo)"
    r = recipe(tmp_path, "sharegpt", [SHAREGPT, bad])
    tok = build_tokenizer(r.tokenizer, None)
    with pytest.raises(DataError, match=r"tools\.jsonl: row 2: turn 2 \(function_call\) is not valid JSON"):
        prepare_datasets(r, tok)
    skipped = prepare_datasets(recipe(tmp_path, "sharegpt", [SHAREGPT, bad], skip_malformed=True), tok)
    assert skipped.stats["skipped_by_reason"] == {"turn N (function_call) is not valid JSON (Expecting value)": 1}
