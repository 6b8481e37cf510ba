"""`--calibrate`: run a few real steps of the recipe here and compare with the estimate.

The steps go through the normal runtime (`launcher.runtime.job.run_job`) in a temporary run
directory with checkpoints, evaluation and samples off. The measured step time gives the
efficiency this layout really reaches; time and cost are then rescaled with it.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

from launcher.recipe.sections import Recipe

DEFAULT_STEPS = 5


def calibration_recipe(recipe: Recipe, *, steps: int, workers: int | None = None) -> Recipe:
    """The recipe, cut to `steps` optimizer steps with checkpoints, evaluation and samples off."""
    from launcher.recipe.load import from_dict, to_dict

    d = to_dict(recipe)
    d["name"] = f"{recipe.name}-calibrate"[:63]
    d["train"].update(max_steps=steps, epochs=None, eval_every=0, warmup_steps=0)
    d["checkpoint"].update(every_steps=0, at_end=False)
    d["data"].update(eval_fraction=0.0, eval_path=[])
    d["sample"].update(prompts=[], from_eval=0)
    d["logging"].update(tensorboard=False, wandb_project=None)
    if workers is not None:
        res = d["resources"]
        if res.get("gpus_per_node"):
            res["gpus_per_node"], res["nodes"] = workers, 1
        else:
            res["cpu_workers"], res["nodes"] = workers, 1
    return from_dict(d, source="--calibrate")


def measure(recipe: Recipe, *, steps: int = DEFAULT_STEPS, workers: int | None = None,
            run_dir: Path | None = None) -> dict[str, Any]:
    """Run `steps` steps; measured step time (median, first step excluded), tokens/s, peak memory."""
    import json

    from launcher.runtime.job import run_job
    from launcher.runtime.metrics import read_metrics

    cal = calibration_recipe(recipe, steps=steps, workers=workers)
    with tempfile.TemporaryDirectory(prefix="launcher-calibrate-") as tmp:
        out = run_dir or Path(tmp) / "run"
        run_job(cal, out, progress=None)
        records = read_metrics(out / "metrics.jsonl")
        summary = json.loads((out / "summary.json").read_text())
    step_recs = [r for r in records if "step_time_s" in r and not r.get("eval")]
    start = next((r for r in records if r.get("event") == "start"), {})
    times = [r["step_time_s"] for r in step_recs[1:]] or [r["step_time_s"] for r in step_recs]
    tps = [r["tokens_per_s"] for r in step_recs[1:] if "tokens_per_s" in r] or [
        r["tokens_per_s"] for r in step_recs if "tokens_per_s" in r]
    return {
        "recipe": cal,
        "steps": len(step_recs),
        "world_size": summary.get("world_size") or start.get("world_size"),
        "measured_step_time_s": statistics.median(times) if times else None,
        "measured_tokens_per_s": statistics.median(tps) if tps else None,
        "measured_peak_memory_bytes": summary.get("peak_memory_bytes"),
        "on_gpu": cal.resources.gpus_per_node > 0,
    }


def calibrate(est: Any, recipe: Recipe, *, steps: int = DEFAULT_STEPS, workers: int | None = None,
              estimate_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Measure and attach `est.calibration`: measured next to estimated, and the rescaled time."""
    from launcher.estimate.estimator import estimate_recipe

    m = measure(recipe, steps=steps, workers=workers)
    cal_est = estimate_recipe(m["recipe"], **(estimate_kwargs or {}), live_prices=False)
    result: dict[str, Any] = {
        "steps": m["steps"], "world_size": m["world_size"],
        "device": cal_est.gpu.name if m["on_gpu"] and cal_est.gpu else "CPU workers",
        "measured_step_time_s": m["measured_step_time_s"],
        "measured_tokens_per_s": m["measured_tokens_per_s"],
        "measured_peak_memory_bytes": m["measured_peak_memory_bytes"],
        "peak_memory_kind": "max_memory_allocated" if m["on_gpu"] else "peak RSS of a worker process",
        "estimated_peak_bytes": cal_est.memory.per_gpu["total"],
        "estimated_step_time_s": cal_est.time.step_time_s if cal_est.time else None,
        "measured_mfu": None, "rescaled_total_hours": None, "rescaled": False,
    }
    t = est.time
    if m["on_gpu"] and cal_est.time and m["measured_tokens_per_s"] and cal_est.gpu:
        flops = m["measured_tokens_per_s"] * cal_est.time.flops_per_token
        measured_mfu = flops / (m["world_size"] * cal_est.gpu.peak_tflops * 1e12)
        result["measured_mfu"] = measured_mfu
        if t is not None and t.total_hours is not None:
            factor = t.mfu / measured_mfu
            result["rescaled_total_hours"] = t.total_hours * factor
            result["rescaled"] = True
            t.step_time_s *= factor
            t.compute_s *= factor
            t.tokens_per_s /= factor
            t.total_hours *= factor
            t.mfu, t.mfu_source = measured_mfu, "measured by --calibrate"
            for c in est.costs:
                c.hours *= factor
                c.total_usd *= factor
            from launcher.estimate.cost import mark_cheapest

            mark_cheapest(est.costs)
    else:
        est.notes.append("calibration ran on CPU workers: the measured step time does not transfer to GPUs, "
                         "so time and cost are not rescaled")
    est.calibration = result
    return result
