"""The loss is token-weighted: sum of token losses over the global batch / its label tokens.

So 4 accumulated micro-batches of 1, one micro-batch of 4, and 2 workers x 2 accumulated
micro-batches of 1 train the same model: the same per-step losses, gradient norms (the gradient
itself, before clipping), final weights and eval loss. Tolerance: 1e-6 relative on losses and
gradient norms, 1e-5 absolute on weights after 3 AdamW steps (fp32 on CPU; the only differences
are summation order and padding shapes).
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_recipe_dict
from train_spawn import train_ranks

pytestmark = pytest.mark.slow

RTOL = 1e-6
WEIGHTS_ATOL = 1e-5


def _initial_model(path):
    """The tiny model saved once, so that every layout starts from the same weights (a random
    init under ZeRO-3's zero.Init draws differently from a plain one)."""
    from launcher.data import build_tokenizer
    from launcher.recipe import from_dict
    from launcher.runtime.model import build_model

    recipe = from_dict(tiny_recipe_dict(name="tw"))
    tok = build_tokenizer(recipe.tokenizer, None)
    build_model(recipe.model, tok, seed=0).save_pretrained(path)
    return str(path)


def _recipe(micro: int, accum: int, workers: int, zero: int, model_dir: str) -> dict:
    d = tiny_recipe_dict(
        name="tw",
        parallelism={"zero_stage": zero},
        resources={"cpu_workers": workers},
        checkpoint={"export_hf_at_end": True},
        sample={"from_eval": 0},
    )
    d["model"] = {"name_or_path": model_dir, "dtype": "fp32"}
    d["data"] = {"format": "alpaca", "synthetic": {"task": "reverse", "num_examples": 200},
                 "max_seq_len": 64, "eval_fraction": 0.05}
    d["train"] = {"max_steps": 3, "micro_batch_size": micro, "grad_accum": accum, "lr": 1e-3,
                  "schedule": "constant", "eval_batches": 16, "max_grad_norm": 1.0}
    return d


def _steps(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    steps = [r for r in rows if "loss" in r and not r.get("eval")]
    evals = [r["eval_loss"] for r in rows if r.get("eval")]
    return steps, evals


def _weights(run_dir):
    from safetensors.torch import load_file

    out = {}
    for f in sorted((run_dir / "hf").glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_accumulation_and_workers_match_one_big_micro_batch(tmp_path):
    layouts = {
        "micro4": (4, 1, 1, 0),
        "accum4": (1, 4, 1, 0),
        "2workers-accum2-zero1": (1, 2, 2, 1),
        # ZeRO-3 too, which also exports at the end with ZeRO-3's transformers config alive
        "2workers-accum2-zero3": (1, 2, 2, 3),
    }
    runs, model_dir = {}, _initial_model(tmp_path / "init")
    for name, (micro, accum, workers, zero) in layouts.items():
        train_ranks(_recipe(micro, accum, workers, zero, model_dir), tmp_path / name, world=workers)
        runs[name] = (*_steps(tmp_path / name), _weights(tmp_path / name))

    ref_steps, ref_eval, ref_w = runs["micro4"]
    assert len(ref_steps) == 3 and len(ref_eval) == 1
    # the micro-batches of a step hold different numbers of label tokens (else a mean of means
    # would be token-weighted too and this test would prove nothing)
    assert len({r["label_tokens"] for r in ref_steps}) > 1
    for name, (steps, evals, weights) in runs.items():
        for a, b in zip(ref_steps, steps):
            assert a["label_tokens"] == b["label_tokens"], name
            assert b["loss"] == pytest.approx(a["loss"], rel=RTOL), (name, a["step"])
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=RTOL), (name, a["step"])
        assert evals[0] == pytest.approx(ref_eval[0], rel=RTOL), name
        assert weights.keys() == ref_w.keys()
        for k in ref_w:
            torch.testing.assert_close(weights[k], ref_w[k], rtol=0, atol=WEIGHTS_ATOL, msg=f"{name} {k}")
