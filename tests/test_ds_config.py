from __future__ import annotations

import json
import os

import pytest
from conftest import RECIPES, ROOT
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


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_bf16_accumulates_and_reduces_in_fp32(zero):
    """bf16 weights and compute; gradients summed over micro-batches and ranks in fp32, fp32 master
    weights, in every ZeRO stage (DeepSpeed's defaults sum them in bf16)."""
    r = load_recipe(RECIPES / "examples/tiny-sft.yaml", [
        "model.dtype=bf16", f"parallelism.zero_stage={zero}"])
    cfg = build_ds_config(r, data_parallel=2, on_gpu=False)
    assert cfg["bf16"] == {"enabled": True, "bf16_master_weights_and_grads": False, "immediate_grad_update": True}
    assert not cfg["fp16"]["enabled"]
    assert cfg["data_types"] == {"grad_accum_dtype": "fp32"}
    assert cfg["communication_data_type"] == "fp32"


def test_fp16_accumulates_in_fp32_where_deepspeed_allows():
    for zero in (1, 2, 3):
        r = load_recipe(RECIPES / "examples/tiny-sft.yaml", [
            "model.dtype=fp16", f"parallelism.zero_stage={zero}"])
        cfg = build_ds_config(r, data_parallel=2, on_gpu=True)
        assert cfg["fp16"]["enabled"] and cfg["data_types"] == {"grad_accum_dtype": "fp32"}
        assert cfg["communication_data_type"] == "fp32"
    # without ZeRO DeepSpeed's FP16_Optimizer refuses another accumulation dtype
    r = load_recipe(RECIPES / "examples/tiny-sft.yaml", ["model.dtype=fp16", "parallelism.zero_stage=0"])
    cfg = build_ds_config(r, data_parallel=2, on_gpu=True)
    assert "data_types" not in cfg and "communication_data_type" not in cfg


def test_fp32_config_names_no_precision_keys():
    r = load_recipe(RECIPES / "examples/tiny-sft.yaml")
    cfg = build_ds_config(r, data_parallel=2, on_gpu=False)
    assert not cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    assert "data_types" not in cfg and "communication_data_type" not in cfg


def test_recipe_deepspeed_block_overrides_the_accumulation_dtype():
    r = load_recipe(RECIPES / "examples/tiny-sft.yaml",
                    ["model.dtype=bf16", "+deepspeed.data_types.grad_accum_dtype=bf16"])
    cfg = build_ds_config(r, data_parallel=2, on_gpu=False)
    assert cfg["data_types"] == {"grad_accum_dtype": "bf16"}
    assert cfg["communication_data_type"] == "fp32"  # untouched keys survive the merge


_ENGINE_PROBE = r"""
import json, os, sys
import torch, deepspeed
from transformers import LlamaConfig, LlamaForCausalLM
from launcher.recipe import load_recipe
from launcher.runtime.ds_config import build_ds_config
from launcher.runtime.precision import install_deepspeed_backports, norm_after_step
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
deepspeed.init_distributed(dist_backend="gloo")

def engine_for(zero):
    r = load_recipe(sys.argv[1], ["model.dtype=bf16", f"parallelism.zero_stage={zero}",
                                  "train.micro_batch_size=2", "train.grad_accum=2"])
    cfg = build_ds_config(r, data_parallel=1, on_gpu=False)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    return deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)[0]

out = {}
try:
    engine_for(0)
    out["stock"] = "accepted"
except NotImplementedError as e:
    out["stock"] = "refused: " + str(e)
install_deepspeed_backports()
for zero in (0, 1):
    engine = engine_for(zero)
    fresh_has_norm = hasattr(engine.optimizer, "_global_grad_norm")  # the trainer asks before step 1
    ids = torch.randint(0, 64, (2, 8))
    for _ in range(2):
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    out[zero] = [type(engine.optimizer).__name__, next(engine.module.parameters()).dtype == torch.bfloat16,
                 norm_after_step(engine), float(engine.get_global_grad_norm()), fresh_has_norm]
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow  # one DeepSpeed start-up in a subprocess: ~15 s idle, minutes on loaded cores
def test_bf16_without_zero_and_zero1_run_on_bf16_optimizer(tmp_path):
    """The generated config makes DeepSpeed pick BF16_Optimizer (fp32 master weights, fp32
    gradient buffers) for ZeRO-0 (with the backport; stock 0.19.8 refuses it) and ZeRO-1, and
    it trains bf16 weights on CPU."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "probe.py"
    script.write_text(_ENGINE_PROBE)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script), str(RECIPES / "examples/tiny-sft.yaml"), str(port)],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT")), None)
    assert line, proc.stdout[-2000:] + proc.stderr[-2000:]
    got = json.loads(line[len("RESULT"):])
    assert got["stock"].startswith("refused: unsupported mix"), got
    for zero in ("0", "1"):
        name, bf16_weights, after_step, norm, fresh_has_norm = got[zero]
        assert name == "BF16_Optimizer" and bf16_weights and after_step and fresh_has_norm, got
        assert 0 < norm < float("inf"), got
