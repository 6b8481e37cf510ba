"""Where a recipe value came from: a base in `defaults:`, the recipe itself, or the command line.

A data source set over a base replaces the base's, `key: null` clears an inherited value, and a
rejected value's message names the file (or the command line) that set it."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import RECIPES
from launcher.errors import RecipeError
from launcher.recipe import load_recipe
from launcher.recipe.load import resolve_traced

BASE = """\
name: base
model:
  config: {model_type: llama, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2,
           num_attention_heads: 4, num_key_value_heads: 2}
tokenizer: {builtin: bytes}
data:
  format: alpaca
  hub: org/some-dataset
  max_seq_len: 64
train: {epochs: 2, micro_batch_size: 4, lr: 1.0e-3}
parallelism: {zero_stage: 2}
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def tree(tmp_path):
    """base.yaml <- mid.yaml <- child.yaml, in a temporary directory."""
    write(tmp_path / "base.yaml", BASE)
    write(tmp_path / "mid.yaml", "defaults: [base.yaml]\nname: mid\ntrain: {lr: 2.0e-3}\n")
    child = write(tmp_path / "child.yaml", "defaults: [mid.yaml]\nname: child\ndata: {path: [rows.jsonl]}\n")
    return tmp_path, child


def test_a_data_source_set_over_a_base_replaces_the_bases(tree):
    root, child = tree
    r = load_recipe(child)
    assert r.data.path == ["rows.jsonl"] and r.data.hub is None and r.data.synthetic is None
    # the other data keys are still inherited
    assert r.data.max_seq_len == 64 and r.data.format == "alpaca"


def test_an_override_source_replaces_the_recipes(tree):
    root, child = tree
    r = load_recipe(child, ["data.synthetic.task=reverse"])
    assert r.data.synthetic is not None and r.data.path == [] and r.data.hub is None
    r = load_recipe(root / "base.yaml", ["data.path=mine.jsonl"])
    assert r.data.path == ["mine.jsonl"] and r.data.hub is None
    # clearing a source is not setting one: nothing else is dropped
    r = load_recipe(child, ["data.synthetic=null"])
    assert r.data.path == ["rows.jsonl"]


def test_two_sources_in_one_file_are_still_refused(tmp_path):
    write(tmp_path / "base.yaml", BASE)
    both = write(tmp_path / "both.yaml", "defaults: [base.yaml]\nname: both\ndata: {path: [a.jsonl], hub: x/y}\n")
    with pytest.raises(RecipeError, match="set exactly one of data.path, data.hub, data.synthetic"):
        load_recipe(both)


def test_origins_name_the_file_of_each_value(tree):
    root, child = tree
    _, origins = resolve_traced(child, ["train.micro_batch_size=2"])
    assert origins["data.path"] == str(child)
    assert origins["train.lr"].endswith("mid.yaml")
    assert origins["train.epochs"].endswith("base.yaml") and origins["data.format"].endswith("base.yaml")
    assert origins["train.micro_batch_size"] == "command line"
    assert "data.hub" not in origins


def test_error_names_the_base_that_set_the_value(tree):
    root, child = tree
    with pytest.raises(RecipeError) as e:
        load_recipe(child, ["parallelism.pipeline_stages=2"])  # the base's ZeRO-2 cannot pipeline
    assert str(e.value).startswith(f"{child}: parallelism.zero_stage (set in {root / 'base.yaml'}): ZeRO-2")
    write(root / "bad-mid.yaml", "defaults: [base.yaml]\nname: m\ntrain: {lr: fast}\n")
    bad = write(root / "bad.yaml", "defaults: [bad-mid.yaml]\nname: b\n")
    with pytest.raises(RecipeError, match=r"train\.lr \(set in .*bad-mid\.yaml\): expected a number"):
        load_recipe(bad)


def test_error_in_an_override_names_the_command_line(tree):
    root, child = tree
    with pytest.raises(RecipeError) as e:
        load_recipe(child, ["train.max_step=5"])
    assert str(e.value) == (
        f"{child}: train.max_step (set on the command line): unknown key; did you mean 'max_steps'?"
    )
    with pytest.raises(RecipeError, match=r"train\.lr \(set on the command line\): expected a number"):
        load_recipe(child, ["train.lr=fast"])


def test_error_in_the_recipe_itself_names_only_the_recipe(tmp_path):
    path = write(tmp_path / "r.yaml", BASE.replace("lr: 1.0e-3", "lr: fast"))
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert str(e.value) == f"{path}: train.lr: expected a number, got 'fast'"


def test_null_clears_an_inherited_value(tree):
    root, child = tree
    # the base sets train.epochs; a recipe that counts steps instead clears it
    steps = write(root / "steps.yaml", "defaults: [child.yaml]\nname: s\ntrain: {epochs: null, max_steps: 7}\n")
    r = load_recipe(steps)
    assert r.train.max_steps == 7 and r.train.epochs is None
    r = load_recipe(child, ["train.epochs=null", "train.max_steps=3"])
    assert r.train.max_steps == 3 and r.train.epochs is None
    # null on a key whose type has no null (a list, a section) means "back to the default"
    r = load_recipe(child, ["data.path=null", "data.hub=org/other", "parallelism=null"])
    assert r.data.path == [] and r.data.hub == "org/other"
    assert r.parallelism.pipeline_stages == 1 and r.parallelism == type(r.parallelism)()


def test_shipped_sft_recipe_with_local_files(tmp_path):
    """What getting-started tells users to do: a shipped base, your own files."""
    r = load_recipe(RECIPES / "sft/mistral-7b-full-sft.yaml", ["data.path=conversations.json"])
    assert r.data.path == ["conversations.json"] and r.data.hub is None and r.data.format == "sharegpt"
