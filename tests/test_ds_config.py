from __future__ import annotations

import json

from conftest import RECIPES
from launcher.recipe import load_recipe
from launcher.runtime.ds_config import build_ds_config
from launcher.runtime.driver import ray_plan
from launcher.runtime.schedule import lr_multiplier


def test_tiny_sft_cpu_config_golden(golden):
    r = load_recipe(RECIPES / "examples/tiny-sft.yaml")
    cfg = build_ds_config(r, data_parallel=2, on_gpu=False)
    golden("ds_config_tiny_sft_cpu.json", json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def test_70b_gpu_config_golden(golden):
    r = load_recipe(RECIPES / "sft/llama-3.1-70b-full-sft.yaml")
    cfg = build_ds_config(r, data_parallel=32, on_gpu=True)
    golden("ds_config_llama70b_gpu.json", json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def test_batch_arithmetic_and_offload():
    r = load_recipe(RECIPES / "sft/llama-3.1-70b-full-sft.yaml")
    cfg = build_ds_config(r, data_parallel=32, on_gpu=True)
    assert cfg["train_batch_size"] == 1 * 8 * 32
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "torch_adam" not in cfg["optimizer"]["params"]  # FusedAdam on GPU
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]


def test_raw_deepspeed_overrides_merge_last():
    r = load_recipe(
        RECIPES / "examples/tiny-sft.yaml",
        ["+deepspeed.zero_optimization.stage3_prefetch_bucket_size=123", "+deepspeed.steps_per_print=7"],
    )
    cfg = build_ds_config(r, data_parallel=2, on_gpu=False)
    assert cfg["zero_optimization"]["stage3_prefetch_bucket_size"] == 123
    assert cfg["zero_optimization"]["stage"] == 3  # untouched keys survive the merge
    assert cfg["steps_per_print"] == 7


def test_ray_plan_maps_resources():
    r = load_recipe(RECIPES / "sft/llama-3.1-70b-full-sft.yaml")
    plan = ray_plan(r)
    assert plan.num_workers == 32 and plan.use_gpu and plan.resources_per_worker["GPU"] == 1
    r = load_recipe(RECIPES / "examples/tiny-sft.yaml", ["resources.nodes=2"])
    plan = ray_plan(r)
    assert plan.num_workers == 2 and not plan.use_gpu and plan.placement_strategy == "SPREAD"


def test_lr_schedules():
    f = lr_multiplier("cosine", warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert f(0) == 0.1 and f(9) == 1.0
    assert abs(f(60) - 0.55) < 1e-9  # halfway through the cosine
    assert abs(f(110) - 0.1) < 1e-9
    g = lr_multiplier("linear", warmup_steps=0, total_steps=100, min_ratio=0.0)
    assert g(50) == 0.5
    assert lr_multiplier("constant", warmup_steps=0, total_steps=10, min_ratio=0.0)(9) == 1.0
