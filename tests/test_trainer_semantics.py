"""What the trainer logs and when it lets the ranks go: the learning rate of each step,
overflow-skipped steps (and the schedule that waits for them), the gradient norm without the
loss scale, and an end-of-run export that holds no rank in a collective."""

from __future__ import annotations

import json

import pytest

from launcher.runtime.schedule import lr_multiplier
from train_spawn import train_ranks
from trainer_patches import COLLECTIVE_TIMEOUT_S, EXPORT_DELAY_S, OVERFLOW_STEPS

pytestmark = pytest.mark.slow

LR, WARMUP, STEPS = 1e-3, 2, 6


def _recipe(dtype: str, *, workers: int = 1, steps: int = STEPS, **extra) -> dict:
    return {
        "name": "semantics",
        "model": {"config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                             "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                             "max_position_embeddings": 128}, "dtype": dtype},
        "tokenizer": {"builtin": "bytes"},
        "data": {"format": "alpaca", "synthetic": {"task": "reverse", "num_examples": 64},
                 "prompt_template": "{instruction}\n{input_block}", "max_seq_len": 128, "eval_fraction": 0},
        "train": {"max_steps": steps, "micro_batch_size": 2, "grad_accum": 1, "lr": LR,
                  "warmup_steps": WARMUP, "schedule": "cosine", "min_lr_ratio": 0.1},
        "parallelism": {"zero_stage": 0},
        "resources": {"cpu_workers": workers},
        "logging": {"tensorboard": False},
        "sample": {"from_eval": 0},
        **extra,
    }


def _steps(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r and not r.get("eval")]


def test_overflow_steps_are_reported_and_the_schedule_follows_applied_steps(tmp_path):
    run = tmp_path / "fp16"
    train_ranks(_recipe("fp16"), run, world=1, patch="trainer_patches:fp16_overflow")
    records = _steps(run)
    text = (run / "metrics.jsonl").read_text()
    assert "Infinity" not in text and "NaN" not in text  # strict JSON: an inf norm is logged as null

    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    skipped = [r["step"] for r in records if r.get("skipped")]
    assert skipped == list(OVERFLOW_STEPS)
    assert records[-1]["skipped_steps"] == len(OVERFLOW_STEPS)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["skipped_steps"] == len(OVERFLOW_STEPS)

    # Each step logs the rate it trained with: the schedule at the number of updates applied
    # before it, so a skipped step neither moves it nor is logged with the next step's rate.
    mult = lr_multiplier("cosine", warmup_steps=WARMUP, total_steps=STEPS, min_ratio=0.1)
    applied_before = 0
    for r in records:
        assert r["lr"] == pytest.approx(LR * mult(applied_before), rel=1e-9), r
        applied_before += 0 if r.get("skipped") else 1

    for r in records:
        if r.get("skipped"):
            assert r["grad_norm"] is None
        else:
            # the norm of the gradients, not of the loss-scaled ones (scale 2**16 at the start)
            assert 0 < r["grad_norm"] < 100, r


def test_the_end_of_run_export_holds_no_rank_in_a_collective(tmp_path):
    """Rank 0's export takes longer than the collective timeout: a rank waiting for it in a
    barrier would fail the run."""
    run = tmp_path / "export"
    recipe = _recipe("fp32", workers=2, steps=2, checkpoint={"export_hf_at_end": True})
    train_ranks(recipe, run, world=2, patch="trainer_patches:slow_export",
                timeout=EXPORT_DELAY_S + COLLECTIVE_TIMEOUT_S + 300)
    assert (run / "hf" / "config.json").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["hf_export"] == str(run / "hf")
    assert [r["step"] for r in _steps(run)] == [1, 2]
