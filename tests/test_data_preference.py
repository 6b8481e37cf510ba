"""Preference data (train.task dpo, orpo, kto): LLaMA-Factory's alpaca, sharegpt and chat forms ->
pairs of sequences sharing a prompt (labels on the response only) or KTO's labelled responses;
the prepared files hold exactly the in-memory examples; collation; and the refusals of data
without pairs, packing, pipelines and precomputed references (exit 2, nothing started)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, bytes_tokenizer, tiny_recipe_dict, write_jsonl
from launcher.data import build_datasets, collate
from launcher.data.prepare import prepare_datasets
from launcher.errors import DataError, RecipeError
from launcher.recipe import from_dict

IGNORE = -100
PROMPT = "Reverse the letters."

ALPACA = [{"instruction": PROMPT, "input": "abc", "chosen": "cba", "rejected": "bca"},
          {"instruction": PROMPT, "input": "hgfe", "chosen": "efgh", "rejected": "hgfe"}]
SHAREGPT = [{"conversations": [{"from": "human", "value": "Reverse abc."}],
             "chosen": {"from": "gpt", "value": "cba"}, "rejected": {"from": "gpt", "value": "abc"}},
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                               {"from": "human", "value": "Reverse de."}],
             "chosen": {"from": "gpt", "value": "ed"}, "rejected": {"from": "gpt", "value": "de"}}]
CHAT = [{"messages": [{"role": "user", "content": "Reverse abc."}],
         "chosen": [{"role": "assistant", "content": "cba"}], "rejected": {"role": "assistant", "content": "bca"}},
        {"prompt": "Reverse de.", "chosen": "ed", "rejected": "de"}]
KTO = [{"messages": [{"role": "user", "content": "Reverse abc."}, {"role": "assistant", "content": "cba"}],
        "label": True},
       {"messages": [{"role": "user", "content": "Reverse de."}, {"role": "assistant", "content": "de"}],
        "label": False}]




def recipe(tmp_path: Path, task: str, rows: list | None = None, **data):
    d = tiny_recipe_dict()
    d["train"]["task"] = task
    source = {"path": [str(write_jsonl(tmp_path / "rows.jsonl", rows))]} if rows is not None else {}
    d["data"] = {"cache_dir": str(tmp_path / "cache"), "max_seq_len": 256, **source, **data}
    return from_dict(d)


def response(ex: dict, prefix: str = "") -> str:
    ids, labels = ex[prefix + "input_ids"], ex[prefix + "labels"]
    return bytes_tokenizer().decode([t for t, label in zip(ids, labels) if label != IGNORE])


def prompt_part(ex: dict, prefix: str = "") -> list[int]:
    ids, labels = ex[prefix + "input_ids"], ex[prefix + "labels"]
    first = next(i for i, label in enumerate(labels) if label != IGNORE)
    assert all(label == IGNORE for label in labels[:first])
    return ids[:first]


@pytest.mark.parametrize("fmt,rows,chosen,rejected", [
    ("alpaca", ALPACA, ["cba</s>", "efgh</s>"], ["bca</s>", "hgfe</s>"]),
    ("sharegpt", SHAREGPT, ["cba", "ed"], ["abc", "de"]),
    ("chat", CHAT, ["cba", "ed"], ["bca", "de"]),
])
def test_pairs_share_the_prompt_and_label_only_the_response(tmp_path, fmt, rows, chosen, rejected):
    r = recipe(tmp_path, "dpo", rows, format=fmt)
    mem, prep = build_datasets(r, bytes_tokenizer()), prepare_datasets(r, bytes_tokenizer())
    assert len(mem.train) == len(prep.train) == 2
    for i, ex in enumerate(mem.train):
        assert prep.train[i] == ex  # the memory-mapped files hold exactly these examples
        assert prompt_part(ex) == prompt_part(ex, "rejected_")
        assert chosen[i] in response(ex) and rejected[i] in response(ex, "rejected_")
        assert chosen[i] not in response(ex, "rejected_")
    if fmt == "sharegpt":  # an earlier assistant turn belongs to the prompt: no labels on it
        assert "Hello" not in response(mem.train[1]) and "Hello" in bytes_tokenizer().decode(prompt_part(mem.train[1]))
    assert mem.eval_prompts == prep.eval_prompts


def test_kto_rows_carry_their_label_through_prepare_and_collate(tmp_path):
    r = recipe(tmp_path, "kto", KTO, format="chat")
    mem, prep = build_datasets(r, bytes_tokenizer()), prepare_datasets(r, bytes_tokenizer())
    assert [e["desirable"] for e in mem.train] == [True, False]
    assert [prep.train[i] for i in range(2)] == list(mem.train)
    batch = collate([prep.train[0], prep.train[1]], pad_id=bytes_tokenizer().pad_token_id)
    assert batch["desirable"].tolist() == [True, False]
    # the KL sequences: prompt i with the completion of example i-1 (TRL's mismatched pairs)
    kl = [{"input_ids": [t for t, m in zip(row, mask) if m], "labels": [t for t, m in zip(lab, mask) if m]}
          for row, lab, mask in zip(batch["kl_input_ids"].tolist(), batch["kl_labels"].tolist(),
                                    batch["kl_attention_mask"].tolist())]
    assert prompt_part(kl[0]) == prompt_part(mem.train[0]) and response(kl[0]) == response(mem.train[1])
    assert prompt_part(kl[1]) == prompt_part(mem.train[1]) and response(kl[1]) == response(mem.train[0])


def test_alpaca_kto_and_kto_tag_column_mapping(tmp_path):
    rows = [{"instruction": PROMPT, "input": "ab", "output": "ba", "kto_tag": True},
            {"instruction": PROMPT, "input": "cd", "output": "cd", "kto_tag": False}]
    r = recipe(tmp_path, "kto", rows, format="alpaca")
    assert [e["desirable"] for e in prepare_datasets(r, bytes_tokenizer()).train] == [True, False]
    renamed = [{"instruction": x["instruction"], "input": x["input"], "answer": x["output"], "good": x["kto_tag"]}
               for x in rows]
    source = {"path": [str(write_jsonl(tmp_path / "renamed.jsonl", renamed))],
              "columns": {"output": "answer", "label": "good"}, "epochs": 1}  # as for SFT
    r = recipe(tmp_path, "kto", format="alpaca", sources=[source])
    train = prepare_datasets(r, bytes_tokenizer()).train
    assert [response(e) for e in train] == ["ba</s>", "cd</s>"] and [e["desirable"] for e in train] == [True, False]


def test_pairs_collate_chosen_rows_then_rejected_rows(tmp_path):
    r = recipe(tmp_path, "dpo", ALPACA, format="alpaca")
    train = prepare_datasets(r, bytes_tokenizer()).train
    batch = collate([train[0], train[1]], pad_id=bytes_tokenizer().pad_token_id)
    assert batch["input_ids"].shape[0] == 4
    for row, (ex, key) in enumerate([(train[0], ""), (train[1], ""), (train[0], "rejected_"), (train[1], "rejected_")]):
        n = len(ex[key + "input_ids"])
        assert batch["input_ids"][row, :n].tolist() == ex[key + "input_ids"]
        assert batch["attention_mask"][row].sum() == n


def test_the_task_is_part_of_the_cache_fingerprint(tmp_path):
    rows = [{"instruction": PROMPT, "input": "ab", "output": "ba", "chosen": "ba", "rejected": "ab"}]
    sft, dpo = recipe(tmp_path, "sft", rows, format="alpaca"), recipe(tmp_path, "dpo", rows, format="alpaca")
    assert "rejected_input_ids" not in prepare_datasets(sft, bytes_tokenizer()).train[0]
    assert "rejected_input_ids" in prepare_datasets(dpo, bytes_tokenizer()).train[0]


def test_dpo_on_sft_rows_names_the_file_row_and_missing_fields(tmp_path):
    rows = [{"instruction": PROMPT, "input": "ab", "output": "ba"}]
    r = recipe(tmp_path, "dpo", rows, format="alpaca")
    with pytest.raises(DataError, match=r"rows.jsonl: row 1: missing fields 'chosen' and 'rejected'.*train.task=sft"):
        prepare_datasets(r, bytes_tokenizer())
    with pytest.raises(DataError, match="missing field 'label'"):
        prepare_datasets(recipe(tmp_path, "kto", rows, format="alpaca"), bytes_tokenizer())


@pytest.mark.parametrize("task,data,key", [
    ("dpo", {"format": "text", "synthetic": {"task": "stories"}}, "data.format"),
    ("orpo", {"format": "alpaca", "synthetic": {"task": "reverse"}}, "data.synthetic.task"),
    ("kto", {"format": "alpaca", "synthetic": {"task": "reverse_pairs"}}, "data.synthetic.task"),
    ("dpo", {"format": "alpaca", "synthetic": {"task": "reverse_pairs"}, "packing": True}, "data.packing"),
    ("sft", {"format": "alpaca", "synthetic": {"task": "reverse_pairs"}}, "data.synthetic.task"),
])
def test_recipes_without_pairs_are_refused_by_key(task, data, key):
    d = tiny_recipe_dict(data=data)
    d["train"]["task"] = task
    with pytest.raises(RecipeError) as e:
        from_dict(d)
    assert e.value.key == key


def test_pipelines_and_precomputed_references_are_refused():
    d = tiny_recipe_dict(data={"format": "alpaca", "synthetic": {"task": "reverse_pairs"}})
    d["train"]["task"] = "dpo"
    d["parallelism"] = {"pipeline_stages": 2, "zero_stage": 1}
    d["resources"] = {"cpu_workers": 2}
    with pytest.raises(RecipeError) as e:
        from_dict(d)
    assert e.value.key == "parallelism.pipeline_stages"
    d.pop("parallelism"), d.pop("resources")
    d["preference"] = {"reference": "precomputed"}
    with pytest.raises(RecipeError) as e:
        from_dict(d)
    assert e.value.key == "preference.reference"
    d["preference"] = {"reference": "base"}  # no adapters to disable with train.method=full
    with pytest.raises(RecipeError, match="train.method=lora"):
        from_dict(d)
    d["train"]["task"], d["preference"] = "orpo", {"reference": "precomputed"}  # ORPO has no reference
    assert from_dict(d).train.task == "orpo"


def test_launcher_run_refuses_a_dpo_recipe_on_data_without_pairs(tmp_path):
    """Exit 2, one line naming the file, the row and the missing fields; no run directory."""
    rows = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": PROMPT, "input": "ab", "output": "ba"}])
    cmd = [sys.executable, "-m", "launcher", "run", str(ROOT / "recipes/examples/tiny-dpo.yaml"),
           f"data.path={rows}", "data.synthetic=null", "data.eval_fraction=0", f"data.cache_dir={tmp_path / 'cache'}",
           "--run-dir", str(tmp_path / "run")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "sft.jsonl: row 1: missing fields 'chosen' and 'rejected'" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_new_generator_version_prepares_the_synthetic_pairs_again(tmp_path, monkeypatch):
    from launcher.data import synthetic

    r = recipe(tmp_path, "dpo", format="alpaca", synthetic={"task": "reverse_pairs", "num_examples": 8})
    first = prepare_datasets(r, bytes_tokenizer()).stats["prepared"][0]
    assert prepare_datasets(r, bytes_tokenizer()).stats["prepared"][0] == {**first, "cache_hit": True}
    monkeypatch.setitem(synthetic.GENERATOR_VERSIONS, "reverse_pairs", synthetic.GENERATOR_VERSIONS["reverse_pairs"] + 1)
    again = prepare_datasets(r, bytes_tokenizer()).stats["prepared"][0]
    assert not again["cache_hit"] and again["path"] != first["path"]
