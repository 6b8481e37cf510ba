"""`launcher estimate --calibrate`: a few real steps of the tiny recipe, measured next to the estimate."""

from __future__ import annotations

import pytest

from conftest import RECIPES
from launcher.estimate import estimate_recipe, format_estimate
from launcher.estimate.calibrate import calibrate, calibration_recipe
from launcher.recipe import load_recipe


def test_calibration_recipe_turns_off_everything_but_training():
    r = calibration_recipe(load_recipe(RECIPES / "examples" / "tiny-sft.yaml"), steps=3, workers=1)
    assert r.train.max_steps == 3 and r.checkpoint.every_steps == 0 and not r.checkpoint.at_end
    assert r.data.eval_fraction == 0 and r.sample.from_eval == 0 and r.resources.cpu_workers == 1


@pytest.mark.slow
def test_calibrate_tiny_recipe_on_cpu():
    recipe = load_recipe(RECIPES / "examples" / "tiny-sft.yaml")
    est = estimate_recipe(recipe, live_prices=False)
    cal = calibrate(est, recipe, steps=3)
    assert cal["steps"] == 3 and cal["world_size"] == 2
    assert cal["measured_step_time_s"] > 0 and cal["measured_tokens_per_s"] > 0
    assert cal["estimated_peak_bytes"] == est.memory.per_gpu["total"]
    if cal["measured_peak_memory_bytes"] is not None:  # peak RSS of a CPU worker
        assert cal["measured_peak_memory_bytes"] > 0
    assert cal["rescaled"] is False  # CPU speed says nothing about GPUs
    text = format_estimate(est)
    assert "calibration (3 measured steps on 2 worker(s), CPU workers)" in text
    assert est.to_json()["calibration"]["measured_step_time_s"] == cal["measured_step_time_s"]
