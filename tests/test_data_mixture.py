"""data.sources mixtures: each source at its weight, deterministic from the seed, resumable."""

from __future__ import annotations

import json
import pickle

import pytest

from conftest import ROOT, tiny_recipe_dict
from launcher.data import ResumableSampler, build_tokenizer
from launcher.data.mixture import MixedSplit, mixture_counts
from launcher.data.prepare import prepare_datasets
from launcher.recipe import from_dict, load_recipe


def test_over_10k_samples_each_source_is_within_2_percent_of_its_weight():
    sizes, weights = [500, 3000, 20000], [0.5, 0.3, 0.2]
    mix = MixedSplit([list(range(n)) for n in sizes], mixture_counts(sizes, weights, [None] * 3), seed=7)
    sampler = ResumableSampler(len(mix), num_replicas=1, rank=0, seed=42)
    order = sampler.order()[:10_000]
    for s, w in enumerate(weights):
        share = sum(mix.source_of(i)[0] == s for i in order) / len(order)
        assert abs(share - w) < 0.02, (s, share, w)
    # the small source is repeated whole (every example 10-11 times), the large one subsampled
    firsts = [mix.source_of(i) for i in range(mix.counts[0])]
    assert {k for _, k in firsts} == set(range(500))
    big = [mix.source_of(i)[1] for i in range(mix.ends[1], mix.ends[2])]
    assert len(set(big)) == len(big) == mix.counts[2]


def test_epochs_and_the_layout_depend_only_on_sizes_weights_and_seed():
    assert mixture_counts([100, 40], [None, None], [2.0, 0.5]) == [200, 20]
    a = MixedSplit([list(range(100)), list(range(40))], [150, 25], seed=3)
    b = pickle.loads(pickle.dumps(a))
    assert [a[i] for i in range(len(a))] == [b[i] for i in range(len(b))]
    c = MixedSplit([list(range(100)), list(range(40))], [150, 25], seed=4)
    assert [a[i] for i in range(len(a))] != [c[i] for i in range(len(c))]


def test_the_example_mixture_recipe_prepares_and_a_resumed_sampler_continues_exactly(tmp_path):
    r = load_recipe(ROOT / "recipes/examples/tiny-mix.yaml", [f"data.cache_dir={tmp_path}"])
    import os

    cwd = os.getcwd()
    os.chdir(ROOT)  # the recipe's paths are relative to the repository root
    try:
        splits = prepare_datasets(r, build_tokenizer(r.tokenizer, None))
    finally:
        os.chdir(cwd)
    train = splits.train
    assert isinstance(train, MixedSplit) and len(train) == 570
    # 2 ranks for 10 global samples, then 1 rank: the same global sequence as 1 rank throughout
    def take(world, start, n):
        out = []
        for rank in range(world):
            s = ResumableSampler(len(train), num_replicas=world, rank=rank, seed=r.train.seed)
            s.load_state_dict({"seed": r.train.seed, "epoch": 0, "consumed": start})
            it = iter(s)
            out.append([next(it) for _ in range(n)])
        return [x for group in zip(*out) for x in group]
    whole = take(1, 0, 20)
    assert take(2, 0, 5) + take(1, 10, 10) == whole
    assert [train[i] for i in whole[:3]] == [pickle.loads(pickle.dumps(train))[i] for i in whole[:3]]


def test_a_source_override_on_the_command_line_replaces_the_mixture(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n")
    r = load_recipe(ROOT / "recipes/examples/tiny-mix.yaml", [f"data.path={path}"])
    assert r.data.path == [str(path)] and r.data.sources == []


@pytest.mark.parametrize("entry,key,says", [
    ({"path": ["a.jsonl"], "format": "text", "weight": 1}, "data.sources[1].format", "cannot join a mixture"),
    ({"path": ["a.jsonl"], "weight": 1, "epochs": 1}, "data.sources[1].weight", "set exactly one of weight and epochs"),
    ({"path": ["a.jsonl"]}, "data.sources[1].weight", "set exactly one of weight and epochs"),
    ({"weight": 1}, "data.sources[1]", "set exactly one of path, hub, synthetic"),
    ({"synthetic": {"task": "stories"}, "weight": 1}, "data.sources[1].format", "generates text rows"),
])
def test_a_bad_mixture_entry_names_its_key(entry, key, says):
    from launcher.errors import RecipeError

    d = tiny_recipe_dict()
    d["data"] = {"format": "alpaca", "sources": [{"synthetic": {"task": "add"}, "weight": 1}, entry]}
    with pytest.raises(RecipeError) as e:
        from_dict(d)
    assert e.value.key == key and says in str(e.value), str(e.value)
