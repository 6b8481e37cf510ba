"""The builtin bytes tokenizer, loading a tokenizer directory, and the synthetic tasks."""

from __future__ import annotations

import pytest

from launcher.data import BYTES_VOCAB_SIZE, build_tokenizer, generate
from launcher.errors import DataError
from launcher.recipe import SyntheticDataConfig, TokenizerConfig

TEXTS = [
    "",
    "plain ascii",
    "naïve café — 日本語 🚀",
    "\t\r\n\x00\x7f tabs",
    " leading and trailing  ",
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(TokenizerConfig(builtin="bytes"), None)


def test_bytes_tokenizer_ids_are_bytes_and_round_trip(tok):
    assert 260 <= BYTES_VOCAB_SIZE <= 264 and len(tok) == BYTES_VOCAB_SIZE
    specials = {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}
    assert len(specials) == 3 and all(256 <= i < BYTES_VOCAB_SIZE for i in specials)
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
        assert tok(text)["input_ids"] == [tok.bos_token_id, *ids]  # adds bos, like Llama


def test_bytes_tokenizer_is_deterministic_and_offline():
    a = build_tokenizer(TokenizerConfig(builtin="bytes"), "ignored/model-id")
    b = build_tokenizer(TokenizerConfig(builtin="bytes"), None)
    assert a.get_vocab() == b.get_vocab() and a.chat_template == b.chat_template


def test_special_tokens_in_text_are_single_tokens(tok):
    ids = tok("<|user|>\nhi</s>", add_special_tokens=False)["input_ids"]
    assert len(ids) == 1 + 1 + 2 + 1 and ids[-1] == tok.eos_token_id


def test_tokenizer_directory_loads_and_gets_a_pad_token(tmp_path, tok):
    tok.save_pretrained(tmp_path / "with-pad")
    loaded = build_tokenizer(TokenizerConfig(name_or_path=str(tmp_path / "with-pad")), None)
    assert loaded("héllo")["input_ids"] == tok("héllo")["input_ids"]
    assert loaded.pad_token_id == tok.pad_token_id

    no_pad = build_tokenizer(TokenizerConfig(builtin="bytes"), None)
    no_pad.pad_token = None
    no_pad.save_pretrained(tmp_path / "no-pad")
    # Falls back to model.name_or_path when tokenizer.name_or_path is empty.
    loaded = build_tokenizer(TokenizerConfig(), str(tmp_path / "no-pad"))
    assert loaded.pad_token_id == loaded.eos_token_id == tok.eos_token_id


def test_missing_model_directory_names_model_key(tmp_path):
    with pytest.raises(DataError, match=r"model\.name_or_path"):
        build_tokenizer(TokenizerConfig(), str(tmp_path / "missing"))


@pytest.mark.parametrize("task", ["reverse", "add", "sort"])
def test_synthetic_rows_are_deterministic_and_correct(task):
    rows = generate(SyntheticDataConfig(task=task, num_examples=500, seed=3))
    assert rows == generate(SyntheticDataConfig(task=task, num_examples=500, seed=3))
    assert rows != generate(SyntheticDataConfig(task=task, num_examples=500, seed=4))
    assert len(rows) == 500 and len({r["input"] for r in rows}) == 500  # no repeated inputs
    assert len({r["instruction"] for r in rows}) == 1 and len(rows[0]["instruction"]) <= 20
    for r in rows:
        if task == "add":
            a, b = r["input"].split("+")
            assert 0 <= int(a) <= 99 and 0 <= int(b) <= 99 and r["output"] == str(int(a) + int(b))
        else:
            assert 3 <= len(r["input"]) <= 6 and set(r["input"]) <= set("abcdefgh")
            want = r["input"][::-1] if task == "reverse" else "".join(sorted(r["input"]))
            assert r["output"] == want


def test_synthetic_allows_repeats_once_inputs_run_out():
    rows = generate(SyntheticDataConfig(task="add", num_examples=10_050, seed=0))
    assert len(rows) == 10_050 and len({r["input"] for r in rows}) <= 10_000
