"""Prepared data (launcher.data.prepare): the same tokens as the in-memory path for every
format, one cache entry per fingerprint, atomic commits, and splits that pickle as paths."""

from __future__ import annotations

import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, bytes_tokenizer, tiny_recipe_dict, write_jsonl
from launcher.data import build_datasets
from launcher.data import cache as data_cache
from launcher.data.prepare import plan_sources, prepare_datasets
from launcher.data.store import PreparedSplit
from launcher.errors import DataError
from launcher.recipe import from_dict



def recipe(tmp_path: Path, task: str = "sft", **data):
    d = tiny_recipe_dict()
    d["train"]["task"] = task
    d["data"] = {"cache_dir": str(tmp_path / "cache"), "max_seq_len": 64, **data}
    return from_dict(d)


def same(a, b) -> None:
    assert len(a) == len(b)
    for i in range(len(a)):
        assert a[i] == b[i], f"example {i} differs"


def check_same_as_in_memory(r) -> tuple:
    mem, prep = build_datasets(r, bytes_tokenizer()), prepare_datasets(r, bytes_tokenizer())
    same(mem.train, prep.train)
    same(mem.eval, prep.eval)
    assert mem.eval_prompts == prep.eval_prompts
    for k in ("rows", "skipped_malformed", "truncated", "dropped_no_labels", "train_examples", "eval_examples",
              "train_tokens"):
        assert mem.stats[k] == prep.stats[k], k
    return mem, prep



ALPACA = [{"instruction": f"say {i} {'x' * (i % 30)}", "input": "" if i % 3 else "ctx", "output": f"ok {i}" * (1 + i % 4)}
          for i in range(120)]
SHAREGPT = [{"conversations": [{"from": "human", "value": f"hi {i}"}, {"from": "gpt", "value": f"hello {'y' * (i % 20)}"},
                               {"from": "human", "value": "more"}, {"from": "gpt", "value": f"done {i}"}]}
            for i in range(80)]
CHAT = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"q{i}"},
                      {"role": "assistant", "content": "a" * (5 + i % 50)}]} for i in range(80)]
TEXT = [{"text": f"story {i}: " + "word " * (3 + (i * 7) % 40)} for i in range(150)]


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("fmt,rows", [("alpaca", ALPACA), ("sharegpt", SHAREGPT), ("chat", CHAT)])
def test_sft_formats_give_the_in_memory_tokens(tmp_path, fmt, rows, packing):
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    check_same_as_in_memory(recipe(tmp_path, format=fmt, path=[str(path)], packing=packing, eval_fraction=0.1))


@pytest.mark.parametrize("packing", [False, True])
def test_text_gives_the_in_memory_tokens(tmp_path, packing):
    path = write_jsonl(tmp_path / "d.jsonl", TEXT)
    check_same_as_in_memory(recipe(tmp_path, "pretrain", format="text", path=[str(path)], packing=packing,
                                   eval_fraction=0.05))


@pytest.mark.parametrize("sample_by,docs", [("line", 6), ("paragraph", 3), ("document", 1)])
def test_txt_sample_by(tmp_path, sample_by, docs):
    path = tmp_path / "c.txt"
    path.write_text("one article on a line\nanother one\n\nthird, after a blank line\nfourth\n\nfifth\nsixth\n")
    r = recipe(tmp_path, "pretrain", format="text", path=[str(path)], sample_by=sample_by, packing=True,
               max_seq_len=512)
    mem, prep = check_same_as_in_memory(r)
    assert prep.stats["rows"] == docs
    # documents restart the positions: as many restarts as documents (all fit one sequence)
    assert [p for ex in prep.train for p in ex["position_ids"]].count(0) == docs


def test_too_few_documents_are_held_out_by_sequences(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("a single long document " * 80)  # one document, many sequences
    r = recipe(tmp_path, "pretrain", format="text", path=[str(path)], sample_by="document", packing=True,
               eval_fraction=0.2)
    mem, prep = check_same_as_in_memory(r)
    assert len(prep.eval) >= 1 and len(prep.train) >= 1


def test_eval_path_and_synthetic(tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", ALPACA[:10])
    check_same_as_in_memory(recipe(tmp_path, format="alpaca", synthetic={"task": "add", "num_examples": 300},
                                   eval_path=[str(path)]))


def test_second_prepare_is_a_cache_hit_and_a_changed_source_is_prepared_again(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    r = recipe(tmp_path, format="alpaca", path=[str(path)])
    first = prepare_datasets(r, bytes_tokenizer())
    assert [p["cache_hit"] for p in first.stats["prepared"]] == [False]
    again = prepare_datasets(r, bytes_tokenizer())
    assert [p["cache_hit"] for p in again.stats["prepared"]] == [True]
    write_jsonl(path, ALPACA[:50])  # changed: other size and mtime
    changed = prepare_datasets(r, bytes_tokenizer())
    assert [p["cache_hit"] for p in changed.stats["prepared"]] == [False]
    assert changed.stats["prepared"][0]["path"] != first.stats["prepared"][0]["path"]
    same(build_datasets(r, bytes_tokenizer()).train, changed.train)  # the new rows only, nothing of the old
    # other sequence settings: another data set
    r2 = recipe(tmp_path, format="alpaca", path=[str(path)], max_seq_len=128)
    assert prepare_datasets(r2, bytes_tokenizer()).stats["prepared"][0]["cache_hit"] is False


def test_a_split_pickles_as_its_path(tmp_path):
    r = recipe(tmp_path, format="alpaca", synthetic={"task": "reverse", "num_examples": 3000})
    prep = prepare_datasets(r, bytes_tokenizer())
    blob = pickle.dumps(prep)
    assert len(blob) < 4000, len(blob)  # the tokens never travel
    back = pickle.loads(blob)
    same(prep.train, back.train)
    assert isinstance(back.train, PreparedSplit)


def test_malformed_rows_name_file_row_and_field_and_are_counted_per_reason(tmp_path):
    rows = [*ALPACA[:20], {"instruction": "x"}, {"instruction": "y", "output": 3}, {"instruction": "z"}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=r"bad\.jsonl: row 21: missing field 'output'"):
        prepare_datasets(recipe(tmp_path, format="alpaca", path=[str(path)]), bytes_tokenizer())
    prep = prepare_datasets(recipe(tmp_path, format="alpaca", path=[str(path)], skip_malformed=True), bytes_tokenizer())
    assert prep.stats["skipped_malformed"] == 3
    assert prep.stats["skipped_by_reason"] == {"missing field 'output'": 2, "field 'output' must be a string, got int": 1}
    # a failed prepare left nothing behind that counts as prepared
    root = data_cache.cache_root(str(tmp_path / "cache"))
    assert all(data_cache.problem(p) is None for p in root.iterdir() if not p.name.startswith("."))


def test_a_prepare_cut_short_leaves_nothing_training_accepts(tmp_path, monkeypatch):
    from launcher.data import prepare as prep_mod

    r = recipe(tmp_path, format="alpaca", synthetic={"task": "reverse", "num_examples": 500})
    plan = plan_sources(r.data)[0]
    fp = data_cache.fingerprint(prep_mod.fingerprint_inputs(plan, r.train.seed, bytes_tokenizer()))
    root = data_cache.cache_root(r.data.cache_dir)

    def dies(*a, **k):  # the process dies after writing the files, before the manifest
        raise KeyboardInterrupt

    monkeypatch.setattr(data_cache, "commit", dies)
    with pytest.raises(KeyboardInterrupt):
        prepare_datasets(r, bytes_tokenizer())
    assert data_cache.lookup(root, fp) is None
    monkeypatch.undo()
    # a staging directory without its manifest (a SIGKILL) is not a data set either
    stage = root / f"{data_cache.STAGING}{fp}-host-1-x"
    (stage / "train").mkdir(parents=True)
    assert data_cache.problem(stage) is not None and data_cache.lookup(root, fp) is None
    # a committed data set with a truncated file is refused
    prep = prepare_datasets(r, bytes_tokenizer())
    path = Path(prep.stats["prepared"][0]["path"])
    tokens = path / "train" / "tokens.bin"
    tokens.write_bytes(tokens.read_bytes()[:-2])
    assert data_cache.lookup(root, fp) is None
    assert prepare_datasets(r, bytes_tokenizer()).stats["prepared"][0]["cache_hit"] is False  # prepared again
    assert data_cache.lookup(root, fp) is not None


KILL_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from conftest import tiny_recipe_dict
from launcher.recipe import from_dict
from launcher.data import build_tokenizer
from launcher.data.prepare import prepare_datasets
d = tiny_recipe_dict()
d["data"] = {{"format": "alpaca", "synthetic": {{"task": "reverse", "num_examples": 3000}}, "max_seq_len": 64,
             "cache_dir": {cache!r}, "num_proc": 2}}
r = from_dict(d)
print("ready", flush=True)
prepare_datasets(r, build_tokenizer(r.tokenizer, None))
print("done", flush=True)
"""


@pytest.mark.slow
def test_a_prepare_killed_at_a_random_moment_leaves_nothing_training_accepts(tmp_path):
    """SIGKILL a real prepare (two tokenizing processes) at random moments: afterwards the cache
    holds either nothing that counts or a complete data set equal to an uninterrupted prepare."""
    cache = tmp_path / "cache"
    script = tmp_path / "prep.py"
    script.write_text(KILL_SCRIPT.format(root=str(ROOT / "tests"), cache=str(cache)))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rng = random.Random(os.getpid())
    outcomes = []
    for _ in range(2):
        p = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 2.0))
        os.killpg(p.pid, signal.SIGKILL)  # the tokenizing processes too
        p.wait()
        committed = [d for d in cache.iterdir() if not d.name.startswith(".")] if cache.exists() else []
        for d in committed:
            assert data_cache.problem(d) is None, d
        outcomes.append(bool(committed))
        if committed:
            break
    d = tiny_recipe_dict()
    d["data"] = {"format": "alpaca", "synthetic": {"task": "reverse", "num_examples": 3000}, "max_seq_len": 64,
                 "cache_dir": str(cache)}
    r = from_dict(d)
    prep = prepare_datasets(r, bytes_tokenizer())  # finishes the job, or finds the one that was committed
    same(build_datasets(r, bytes_tokenizer()).train, prep.train)
    print("killed before commit / after:", outcomes)


def test_launcher_run_trains_on_prepared_data_equal_to_the_in_memory_examples(tmp_path):
    """`launcher run` (job.preflight) hands the workers prepared, memory-mapped splits: the resume
    and reshard tests (tests/test_checkpoint_resume.py, through `launcher run`) run on them, and
    they hold the examples the in-memory path makes, so the uninterrupted losses are unchanged."""
    from ckpt_harness import RECIPE
    from launcher.recipe import load_recipe
    from launcher.runtime.job import preflight

    path = tmp_path / "ckpt.yaml"
    path.write_text(RECIPE.format(root=ROOT))
    r = load_recipe(path, [f"data.cache_dir={tmp_path / 'cache'}"])
    tokenizer, data = preflight(r)
    assert isinstance(data.train, PreparedSplit) and isinstance(data.eval, PreparedSplit)
    mem = build_datasets(r, tokenizer)
    same(mem.train, data.train)
    same(mem.eval, data.eval)
    assert len(pickle.dumps(data)) < 10_000  # what Ray ships to each worker


def test_a_streamed_hub_source_is_prepared_batch_by_batch(tmp_path, monkeypatch):
    """`streaming: true`: rows come from an IterableDataset (here a local one in place of the
    hub), are tokenized as they arrive, and evaluation is held out by sequences."""
    import datasets

    from launcher.data import sources

    rows = TEXT * 4
    monkeypatch.setattr(sources, "open_hub", lambda data, key="data.hub": datasets.Dataset.from_list(rows).to_iterable_dataset())
    monkeypatch.setattr("launcher.data.prepare._hub_revision", lambda d: "abc123")
    r = recipe(tmp_path, "pretrain", format="text", hub="someone/corpus", streaming=True, packing=True, eval_fraction=0.1)
    prep = prepare_datasets(r, bytes_tokenizer())
    whole = build_datasets(recipe(tmp_path, "pretrain", format="text", path=[str(write_jsonl(tmp_path / "t.jsonl", rows))],
                                  packing=True), bytes_tokenizer()).train
    got = sorted([prep.train[i] for i in range(len(prep.train))] + [prep.eval[i] for i in range(len(prep.eval))],
                 key=lambda e: e["input_ids"])
    assert got == sorted(whole, key=lambda e: e["input_ids"])  # every sequence, in train or eval
    assert len(prep.eval) == round(len(whole) * 0.1) and prep.stats["rows"] == len(rows)
