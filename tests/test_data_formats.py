"""Rows -> examples for every format, on the shared real-world samples and on small files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from launcher.data import build_datasets, build_tokenizer, render_prompt
from launcher.data.sources import load_files
from launcher.data.tokenizer import bytes_tokenizer
from launcher.errors import DataError, RecipeError
from launcher.recipe import TokenizerConfig, from_dict

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TEMPLATE = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared samples not at {SHARED}")


def recipe(task: str = "sft", seed: int = 42, **data):
    return from_dict(
        {
            "name": "data-test",
            "model": {"config": {"model_type": "llama", "vocab_size": 300}},
            "tokenizer": {"builtin": "bytes"},
            "data": data,
            "train": {"max_steps": 1, "task": task, "seed": seed},
        }
    )


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(TokenizerConfig(builtin="bytes"), None)


def labelled_runs(ex: dict) -> list[list[int]]:
    """Maximal runs of consecutive labelled tokens (each should be one response)."""
    runs, current = [], []
    for label in ex["labels"]:
        if label == -100:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    return runs + ([current] if current else [])


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    return path


# --- alpaca -----------------------------------------------------------------------------------


@needs_shared
def test_alpaca_prompt_masked_and_response_is_output_plus_eos(tok):
    rows = json.loads((SHARED / "alpaca_en_demo.json").read_text(encoding="utf-8"))
    splits = build_datasets(
        recipe(path=[str(SHARED / "alpaca_en_demo.json")], max_seq_len=4096), tok
    )
    assert len(splits.train) == len(rows) == splits.stats["rows"]
    assert splits.stats["truncated"] == splits.stats["skipped_malformed"] == 0
    assert any(r["input"] == "" for r in rows) and any(r["input"] for r in rows)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    for row, ex in zip(rows, splits.train):
        block = row["input"] + "\n\n" if row["input"] else ""
        prompt = [
            bos,
            *f"### Instruction:\n{row['instruction']}\n\n{block}### Response:\n".encode(),
        ]
        response = [*row["output"].encode(), eos]  # byte tokenizer: token id == byte value
        assert ex["input_ids"] == prompt + response
        assert ex["labels"] == [-100] * len(prompt) + response
        assert ex["position_ids"] is None
    assert tok.decode(splits.train[0]["labels"][-20:]) == rows[0]["output"][-19:] + "</s>"
    assert splits.stats["train_tokens"] == sum(len((r["output"]).encode()) + 1 for r in rows)


@needs_shared
def test_alpaca_non_ascii_outputs_round_trip(tok):
    rows = json.loads((SHARED / "alpaca_en_demo.json").read_text(encoding="utf-8"))
    splits = build_datasets(
        recipe(path=[str(SHARED / "alpaca_en_demo.json")], max_seq_len=4096), tok
    )
    non_ascii = [i for i, r in enumerate(rows) if not r["output"].isascii()]
    assert len(non_ascii) > 10
    for i in non_ascii:
        labelled = [t for t in splits.train[i]["labels"] if t != -100]
        assert tok.decode(labelled, skip_special_tokens=True) == rows[i]["output"]


def test_truncation_counts_and_drops_examples_without_response(tmp_path, tok):
    rows = [
        {"instruction": "short", "input": "", "output": "x" * 100},  # truncated, keeps a response
        {"instruction": "y" * 200, "input": "", "output": "z"},  # prompt alone is too long
        {"instruction": "ok", "input": "", "output": "fine"},
    ]
    splits = build_datasets(
        recipe(path=[str(write_jsonl(tmp_path / "a.jsonl", rows))], max_seq_len=64), tok
    )
    assert splits.stats["truncated"] == 2
    assert splits.stats["dropped_no_labels"] == 1
    ok_prompt = TEMPLATE.format(instruction="ok", input_block="")
    assert [len(ex["input_ids"]) for ex in splits.train] == [
        64,
        1 + len(ok_prompt) + len("fine") + 1,
    ]
    assert tok.decode([t for t in splits.train[1]["labels"] if t != -100]) == "fine</s>"


def test_mask_prompt_off_labels_everything_but_the_first_token(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Say hi.", "output": "hi"}])
    ex = build_datasets(recipe(path=[str(path)], mask_prompt=False), tok).train[0]
    assert ex["labels"][0] == -100 and ex["labels"][1:] == ex["input_ids"][1:]
    assert tok.decode(ex["input_ids"]) == "<s>### Instruction:\nSay hi.\n\n### Response:\nhi</s>"


# --- sharegpt and chat ------------------------------------------------------------------------


@needs_shared
def test_sharegpt_multi_turn_labels_are_exactly_the_assistant_turns(tok):
    convs = json.loads((SHARED / "sharegpt_dummy_conversation.json").read_text(encoding="utf-8"))
    r = recipe(
        path=[str(SHARED / "sharegpt_dummy_conversation.json")], format="sharegpt", max_seq_len=2048
    )
    splits = build_datasets(r, tok)
    assert len(splits.train) == len(convs)
    assert max(len(c["conversations"]) for c in convs) == 6
    for conv, ex in zip(convs, splits.train):
        gpt = [t["value"] + "</s>" for t in conv["conversations"] if t["from"] == "gpt"]
        assert [tok.decode(run) for run in labelled_runs(ex)] == gpt
        # Everything else (role markers, human turns) is context only.
        text = "".join(
            ("<|user|>\n" + t["value"] + "\n")
            if t["from"] == "human"
            else ("<|assistant|>\n" + t["value"] + "</s>")
            for t in conv["conversations"]
        )
        assert tok.decode(ex["input_ids"]) == "<s>" + text


def test_chat_jsonl_with_system_turn_and_non_ascii(tmp_path, tok):
    conv = [
        {"role": "system", "content": "Réponds brièvement."},
        {"role": "user", "content": "Qu'est-ce que 日本?"},
        {"role": "assistant", "content": "Le Japon 🗾."},
        {"role": "user", "content": "Et\n\nensuite ?"},
        {"role": "assistant", "content": "  fin  "},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conv}])
    ex = build_datasets(recipe(path=[str(path)], format="chat"), tok).train[0]
    assert [tok.decode(run) for run in labelled_runs(ex)] == ["Le Japon 🗾.</s>", "  fin  </s>"]
    assert tok.decode(ex["input_ids"]) == (
        "<s><|system|>\nRéponds brièvement.\n<|user|>\nQu'est-ce que 日本?\n"
        "<|assistant|>\nLe Japon 🗾.</s><|user|>\nEt\n\nensuite ?\n<|assistant|>\n  fin  </s>"
    )


def test_sharegpt_accepts_messages_role_content_spelling(tmp_path, tok):
    rows = [
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
    ]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    train = build_datasets(recipe(path=[str(path)], format="sharegpt"), tok).train
    assert train[0] == train[1]


def test_template_without_prefix_property_falls_back_to_finding_turns(tmp_path):
    tok = bytes_tokenizer()
    # Starts with the number of messages, so a shorter conversation is not a prefix of a longer.
    tok.chat_template = "{{ messages|length }}|" + tok.chat_template
    conv = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]  # fmt: skip
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conv}])
    ex = build_datasets(recipe(path=[str(path)], format="chat"), tok).train[0]
    assert [tok.decode(run) for run in labelled_runs(ex)] == ["a1</s>", "a2</s>"]


def test_bytes_chat_template_prefix_property(tok):
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u\n"},
            {"role": "assistant", "content": "a "}, {"role": "user", "content": ""},
            {"role": "assistant", "content": "b"}]  # fmt: skip
    for k in range(1, len(msgs)):
        prompt = tok.apply_chat_template(msgs[:k], tokenize=False, add_generation_prompt=True)
        longer = tok.apply_chat_template(msgs[: k + 1], tokenize=False)
        if msgs[k]["role"] == "assistant":
            assert longer == prompt + msgs[k]["content"] + "</s>"


# --- text -------------------------------------------------------------------------------------


@needs_shared
def test_c4_lines_longer_than_max_seq_len_are_split_into_chunks(tok):
    texts = [json.loads(line)["text"] for line in (SHARED / "c4_demo.jsonl").open(encoding="utf-8")]
    r = recipe("pretrain", path=[str(SHARED / "c4_demo.jsonl")], format="text", max_seq_len=128)
    splits = build_datasets(r, tok)
    assert sum(len(t.encode()) > 128 for t in texts) > 100
    assert all(len(ex["input_ids"]) <= 128 and ex["position_ids"] is None for ex in splits.train)
    # Chunks in order rebuild each document, `<s>text</s>`; a new document starts with bos.
    docs: list[list[int]] = []
    for ex in splits.train:
        if ex["input_ids"][0] == tok.bos_token_id:
            docs.append([])
        docs[-1] += ex["input_ids"]
    assert len(docs) == len(texts)
    for doc, t in zip(docs, texts):
        n = len(t.encode()) + 2
        # A last chunk of a single token (the eos) has nothing to predict and is dropped.
        assert tok.decode(doc) == (f"<s>{t}" if n % 128 == 1 else f"<s>{t}</s>")


@needs_shared
def test_tinyshakespeare_txt_documents_are_paragraphs(tok):
    text = (SHARED / "tinyshakespeare.txt").read_text(encoding="utf-8")
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    r = recipe(
        "pretrain",
        path=[str(SHARED / "tinyshakespeare.txt")],
        format="text",
        max_seq_len=256,
        packing=True,
    )
    splits = build_datasets(r, tok)
    assert splits.stats["rows"] == len(paragraphs)
    assert all(len(ex["input_ids"]) == 256 for ex in splits.train[:-1])
    stream = [i for ex in splits.train for i in ex["input_ids"]]
    assert tok.decode(stream) == "".join(f"<s>{p}</s>" for p in paragraphs)


def test_synthetic_stories_are_packed_text_documents(tok):
    """The pretraining example's data: generated, so it needs no file beside the project."""
    r = recipe("pretrain", format="text", synthetic={"task": "stories", "num_examples": 300}, max_seq_len=256,
               packing=True, eval_fraction=0.1)
    splits = build_datasets(r, tok)
    again = build_datasets(r, tok)
    assert splits.train == again.train  # same seed, same rows
    assert splits.stats["rows"] == 300 and splits.stats["eval_examples"] > 0
    assert all(len(ex["input_ids"]) == 256 for ex in splits.train[:-1])
    text = tok.decode([i for ex in splits.train for i in ex["input_ids"]])
    stories = [s for s in text.split("<s>") if s]
    assert len(stories) > 200
    assert all(re.search(r"went home( from [a-z ]+)?\.</s>$", s) for s in stories[:-1])  # whole stories
    # the counts in a story add up: what was given plus what is left is what there was
    numbers = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
    for s in stories[:50]:
        m = re.search(r"(\w+) had (\w+) (\w+) (\w+)\..*\1 gave (\w+) .*Now \1 had (\w+) and \w+ had \5\.", s)
        assert m, s
        had, gave, left = (numbers.index(m.group(i)) for i in (2, 5, 6))
        assert had == gave + left and gave >= 1


def test_synthetic_data_must_match_the_format():
    with pytest.raises(RecipeError, match="data.synthetic.task=stories generates text rows: set data.format=text"):
        recipe(format="alpaca", synthetic={"task": "stories"})
    with pytest.raises(RecipeError, match="generates alpaca rows: set data.format=alpaca, or data.synthetic.task=stories"):
        recipe("pretrain", format="text", synthetic={"task": "reverse"})


def test_text_round_trips_non_ascii(tmp_path, tok):
    texts = ["naïve café — 日本語 🚀\tend", "Ελληνικά\r\nи русский"]
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    splits = build_datasets(recipe("pretrain", path=[str(path)], format="text"), tok)
    assert [tok.decode(ex["input_ids"]) for ex in splits.train] == [f"<s>{t}</s>" for t in texts]


# --- errors -----------------------------------------------------------------------------------


def test_malformed_row_names_file_and_row_or_is_skipped(tmp_path, tok):
    rows = [
        {"instruction": "a", "input": "", "output": "b"},
        {"instruction": "a", "input": ""},  # no output
        {"instruction": "a", "input": "", "output": 5},  # wrong type
        {"instruction": "c", "output": "d"},
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as err:
        build_datasets(recipe(path=[str(path)]), tok)
    msg = str(err.value)
    assert str(path) in msg and "row 2" in msg and "output" in msg and "skip_malformed" in msg
    splits = build_datasets(recipe(path=[str(path)], skip_malformed=True), tok)
    assert splits.stats["skipped_malformed"] == 2 and splits.stats["rows"] == 4
    assert len(splits.train) == 2


def test_wrong_type_and_bad_turns_name_the_row(tmp_path, tok):
    path = write_jsonl(
        tmp_path / "b.jsonl",
        [{"instruction": "a", "output": "b"}, {"instruction": ["x"], "output": "y"}],
    )
    with pytest.raises(DataError, match=r"b\.jsonl: row 2: field 'instruction' must be a string"):
        build_datasets(recipe(path=[str(path)]), tok)
    conv = {"conversations": [{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}]}
    path = write_jsonl(tmp_path / "c.json", [])  # a .json array file
    path.write_text(json.dumps([conv]), encoding="utf-8")
    with pytest.raises(DataError, match=r"c\.json: row 1: turn 2 has speaker 'robot'"):
        build_datasets(recipe(path=[str(path)], format="sharegpt"), tok)


def test_rows_of_another_format_name_the_format_they_look_like(tmp_path, tok):
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [chat])
    with pytest.raises(DataError) as err:
        build_datasets(recipe(path=[str(path)], format="alpaca"), tok)
    msg = str(err.value)
    assert "row 1: missing field 'instruction' (data.format=alpaca)" in msg
    assert "looks like data.format=chat (it has 'messages'): set data.format=chat" in msg
    sharegpt = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
    path = write_jsonl(tmp_path / "sg.jsonl", [sharegpt])
    with pytest.raises(DataError, match=r"looks like data\.format=sharegpt \(it has 'conversations'\)"):
        build_datasets(recipe("pretrain", path=[str(path)], format="text"), tok)
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": "plain"}])
    with pytest.raises(DataError, match=r"looks like data\.format=text"):
        build_datasets(recipe(path=[str(path)], format="chat"), tok)
    path = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "a", "output": "b"}])
    with pytest.raises(DataError, match=r"looks like data\.format=alpaca \(it has 'instruction'\)"):
        build_datasets(recipe(path=[str(path)], format="sharegpt"), tok)
    # a row of the right format with a field missing gets no guess
    path = write_jsonl(tmp_path / "noout.jsonl", [{"instruction": "a", "messages": "x"}])
    with pytest.raises(DataError) as err:
        build_datasets(recipe(path=[str(path)], format="alpaca"), tok)
    assert "missing field 'output'" in str(err.value) and "looks like" not in str(err.value)


def test_invalid_json_line_names_the_row(tmp_path, tok):
    path = tmp_path / "broken.jsonl"
    path.write_text(
        '{"instruction": "a", "output": "b"}\n{"instruction": "a", oops}\n', encoding="utf-8"
    )
    with pytest.raises(DataError, match=r"broken\.jsonl: row 2 \(line 2\) is not valid JSON"):
        build_datasets(recipe(path=[str(path)]), tok)
    splits = build_datasets(recipe(path=[str(path)], skip_malformed=True), tok)
    assert splits.stats["skipped_malformed"] == 1 and len(splits.train) == 1
    # Rows after a skipped line keep their own numbers (for later messages).
    path.write_text(path.read_text() + '\n{"instruction": "c", "output": "d"}\n', encoding="utf-8")
    rows, skipped = load_files(
        [str(path)], "data.path", recipe(path=[str(path)], skip_malformed=True).data
    )
    assert [r.number for r in rows] == [1, 3] and skipped == 1


def test_missing_file_and_unknown_extension(tmp_path, tok):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=r"data\.path: .*nope\.jsonl not found"):
        build_datasets(recipe(path=[str(missing)]), tok)
    with pytest.raises(DataError, match=r"data\.eval_path: .*nope\.jsonl not found"):
        good = write_jsonl(tmp_path / "g.jsonl", [{"instruction": "a", "output": "b"}])
        build_datasets(recipe(path=[str(good)], eval_path=[str(missing)]), tok)
    csv = tmp_path / "rows.csv"
    csv.write_text("instruction,output\na,b\n")
    with pytest.raises(DataError, match=r"rows\.csv.*\.json, \.jsonl, \.txt, \.parquet"):
        build_datasets(recipe(path=[str(csv)]), tok)


def test_missing_tokenizer_directory_names_the_key(tmp_path):
    with pytest.raises(DataError, match=r"tokenizer\.name_or_path"):
        build_tokenizer(TokenizerConfig(name_or_path=str(tmp_path / "no-such-tokenizer")), None)


# --- splits, prompts, sources -----------------------------------------------------------------


def test_eval_fraction_is_deterministic_and_prompts_match_training(tok):
    r = recipe(
        synthetic={"task": "reverse", "num_examples": 200}, eval_fraction=0.1, max_seq_len=128
    )
    a, b = build_datasets(r, tok), build_datasets(r, tok)
    assert a.eval == b.eval and a.train == b.train
    assert len(a.eval) == 20 and len(a.train) == 180 and len(a.eval_prompts) == 20
    other = recipe(seed=7, synthetic={"task": "reverse", "num_examples": 200}, eval_fraction=0.1)
    assert build_datasets(other, tok).eval != a.eval
    for prompt, ex in zip(a.eval_prompts, a.eval):
        ids = tok(prompt["prompt"])["input_ids"]  # how the runtime encodes a prompt to generate
        assert ex["input_ids"][: len(ids)] == ids
        assert tok.decode(ex["input_ids"][len(ids) :]) == prompt["expected"] + "</s>"


@needs_shared
def test_sharegpt_eval_prompt_ends_before_last_answer(tok):
    r = recipe(
        path=[str(SHARED / "sharegpt_dummy_conversation.json")],
        format="sharegpt",
        eval_fraction=0.2,
    )
    splits = build_datasets(r, tok)
    assert len(splits.eval_prompts) == 64 and len(splits.eval) == 100
    for prompt, ex in zip(splits.eval_prompts, splits.eval):
        ids = tok(prompt["prompt"])["input_ids"]
        assert ex["input_ids"][: len(ids)] == ids and prompt["prompt"].endswith("<|assistant|>\n")
        assert tok.decode(ex["input_ids"][len(ids) :]) == prompt["expected"] + "</s>"


def test_render_prompt_per_format(tok):
    assert render_prompt(recipe(synthetic={}), tok, "Reverse the letters.\n\nabc") == (
        "### Instruction:\nReverse the letters.\n\nabc\n\n### Response:\n"
    )
    chat = recipe(path=["unused.jsonl"], format="chat")
    assert render_prompt(chat, tok, "hé") == "<|user|>\nhé\n<|assistant|>\n"
    assert render_prompt(recipe("pretrain", path=["x.txt"], format="text"), tok, "Once") == "Once"


def test_parquet_and_several_files(tmp_path, tok):
    import datasets

    datasets.Dataset.from_list([{"instruction": "p", "input": "", "output": "q"}]).to_parquet(
        str(tmp_path / "a.parquet")
    )
    second = write_jsonl(tmp_path / "b.jsonl", [{"instruction": "r", "input": "s", "output": "t"}])
    splits = build_datasets(recipe(path=[str(tmp_path / "a.parquet"), str(second)]), tok)
    assert [tok.decode([t for t in ex["labels"] if t != -100]) for ex in splits.train] == [
        "q</s>",
        "t</s>",
    ]
