"""DPO through the trainer on gloo ranks: the reward metrics reach metrics.jsonl, and pair
accounting makes one rank accumulating two micro-batches (no ZeRO, a plain frozen reference)
train exactly like two ZeRO-3 ranks of one micro-batch each (the reference a partitioned
engine)."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_recipe_dict
from train_spawn import train_ranks

pytestmark = pytest.mark.slow

RTOL = 1e-5
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def _initial_model(path) -> str:
    """One starting model for both layouts (zero.Init draws a random init differently)."""
    from launcher.data import build_tokenizer
    from launcher.recipe import from_dict
    from launcher.runtime.model import build_model

    recipe = from_dict(tiny_recipe_dict(name="dpo"))
    build_model(recipe.model, build_tokenizer(recipe.tokenizer, None), seed=0).save_pretrained(path)
    return str(path)


def _recipe(model_dir: str, workers: int, accum: int, zero: int, cache) -> dict:
    d = tiny_recipe_dict(name="dpo", parallelism={"zero_stage": zero}, resources={"cpu_workers": workers},
                         sample={"from_eval": 0})
    d["model"] = {"name_or_path": model_dir, "dtype": "fp32"}
    d["data"] = {"format": "alpaca", "synthetic": {"task": "reverse_pairs", "num_examples": 120},
                 "prompt_template": "{instruction}\n{input_block}", "max_seq_len": 48,
                 "eval_fraction": 0.05, "cache_dir": str(cache)}
    d["train"] = {"task": "dpo", "max_steps": 3, "micro_batch_size": 2, "grad_accum": accum, "lr": 1e-3,
                  "schedule": "constant", "eval_batches": 4}  # all 6 held-out pairs on any layout
    d["preference"] = {"beta": 0.5, "reference": "copy"}
    return d


def _records(run_dir) -> tuple[list[dict], list[float]]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    return [r for r in rows if "loss" in r and not r.get("eval")], [r["eval_loss"] for r in rows if r.get("eval")]


def test_dpo_loss_and_metrics_equal_across_accumulation_and_ranks(tmp_path):
    model_dir = _initial_model(tmp_path / "init")
    runs = {}
    for name, (workers, accum, zero) in {"1rank-accum2": (1, 2, 0), "2ranks-zero3": (2, 1, 3)}.items():
        train_ranks(_recipe(model_dir, workers, accum, zero, tmp_path / "cache"), tmp_path / name, world=workers)
        runs[name] = _records(tmp_path / name)
    (one, one_eval), (two, two_eval) = runs["1rank-accum2"], runs["2ranks-zero3"]
    assert len(one) == len(two) == 3 and one_eval and two_eval
    for a, b in zip(one, two):
        assert a["label_tokens"] == b["label_tokens"] == 4  # pairs of the global batch
        assert b["loss"] == pytest.approx(a["loss"], rel=RTOL), a["step"]
        for m in METRICS:
            # margins: a difference of rewards, whose rounding (ZeRO-3 vs none) it keeps absolute
            assert b[m] == pytest.approx(a[m], rel=RTOL, abs=1e-6), (m, a["step"])
    assert one[0]["loss"] == pytest.approx(0.6931472, rel=1e-6)  # the policy starts as its reference
    assert one[-1]["loss"] != pytest.approx(one[0]["loss"], rel=1e-4)  # ... and moves away from it
    assert two_eval[-1] == pytest.approx(one_eval[-1], rel=RTOL)  # the held-out pairs at the end
