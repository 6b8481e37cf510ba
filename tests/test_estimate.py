"""`launcher estimate`: parameter counts, DeepSpeed-equal model states, activations, verdict,
suggestions, time, cost ranking, JSON keys, bad input. Fast: no weights, no network."""

from __future__ import annotations

import json
import math
import time

import pytest

from conftest import RECIPES, tiny_recipe_dict
from launcher.estimate.hardware import GiB
from launcher.errors import UserError
from launcher.estimate import estimate_recipe, format_estimate, model_recipe
from launcher.estimate.catalog import CATALOG, resolve_config
from launcher.estimate.params import count_on_meta, model_shape
from launcher.recipe import from_dict, load_recipe

GiB = 1024**3

# Public parameter counts (model cards / safetensors index metadata), not the estimator's output.
PUBLIC_COUNTS = {
    "meta-llama/Llama-3.1-8B": 8_030_261_248,
    "meta-llama/Llama-3.1-70B": 70_553_706_496,
    "meta-llama/Llama-3.1-405B": 405_853_388_800,
    "meta-llama/Llama-2-7b-hf": 6_738_415_616,
    "meta-llama/Llama-2-13b-hf": 13_015_864_320,
    "meta-llama/Llama-2-70b-hf": 68_976_648_192,
    "mistralai/Mistral-7B-v0.1": 7_241_732_096,
    "Qwen/Qwen2.5-0.5B": 494_032_768,
    "Qwen/Qwen2.5-7B": 7_615_616_512,
    "Qwen/Qwen2.5-72B": 72_706_203_648,
    "tiiuae/falcon-7b": 6_921_720_704,
    "openai-community/gpt2": 124_439_808,
    "openai-community/gpt2-xl": 1_557_611_200,
}


@pytest.mark.parametrize("name", sorted(PUBLIC_COUNTS))
def test_catalog_parameter_counts_are_the_public_ones(name):
    _, cfg = resolve_config(name)
    assert model_shape(cfg).total == PUBLIC_COUNTS[name]


@pytest.mark.parametrize("name", ["openai-community/gpt2", "Qwen/Qwen2.5-0.5B", "meta-llama/Llama-3.2-1B",
                                  "mosaicml/mpt-7b"])
def test_shipped_counts_equal_a_fresh_meta_device_count(name):
    cached = model_shape(CATALOG[name])
    fresh = count_on_meta(CATALOG[name])
    assert cached == fresh


def test_shape_facts_of_llama_3_1_8b():
    _, cfg = resolve_config("meta-llama/Llama-3.1-8B-Instruct")  # variant names resolve to the catalog
    s = model_shape(cfg)
    V, h, f, L = 128256, 4096, 14336, 32
    assert s.largest_module == V * h  # the (untied) embedding matrix
    assert s.embeddings == 2 * V * h
    kv = 8 * 128
    assert s.per_layer == h * h * 2 + 2 * h * kv + 3 * h * f + 2 * h  # q, o, k, v, MLP, two norms
    assert s.total == s.embeddings + L * s.per_layer + h
    assert (s.kv_heads, s.gated_mlp, s.tied) == (8, True, False)


def _est(model, overrides=(), **kw):
    return estimate_recipe(model_recipe(model, list(overrides)), live_prices=False, **kw)


# --- model states equal DeepSpeed's own estimator functions ------------------------------------

LAYOUTS = [(1, 8), (2, 8), (4, 4), (1, 1)]
MODELS = ["meta-llama/Llama-3.1-8B", "Qwen/Qwen2.5-7B", "meta-llama/Llama-2-13b-hf", "mistralai/Mistral-7B-v0.1"]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("nodes,gpn", LAYOUTS)
@pytest.mark.parametrize("offload", ["none", "optimizer", "both"])
def test_zero3_model_states_equal_deepspeed(model, nodes, gpn, offload):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    over = ["parallelism.zero_stage=3"]
    if offload in ("optimizer", "both"):
        over.append("parallelism.offload_optimizer=cpu")
    if offload == "both":
        over.append("parallelism.offload_param=cpu")
    est = _est(model, over, nodes=nodes, gpus_per_node=gpn, gpu="H200")
    _, cfg = resolve_config(model)
    s = model_shape(cfg)
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        s.total, s.largest_module, num_gpus_per_node=gpn, num_nodes=nodes,
        cpu_offload=offload != "none", cpu_offload_params=offload == "both",
        zero_init=True,  # the runtime builds ZeRO-3 models inside deepspeed.zero.Init
    )
    j = est.to_json()
    assert j["deepspeed_model_states_bytes"]["per_gpu"] == gpu
    assert j["deepspeed_model_states_bytes"]["cpu_per_node"] == cpu
    # the rows DeepSpeed leaves out are separate lines, and everything adds up
    assert sum(r["bytes"] for r in j["breakdown"]) == j["per_gpu_bytes"]["total"]
    assert sum(r["bytes"] for r in j["breakdown"] if not r["deepspeed"]) == j["per_gpu_bytes"]["total"] - gpu
    assert j["cpu_bytes_per_node"] >= cpu


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("nodes,gpn", LAYOUTS)
@pytest.mark.parametrize("offload", [False, True])
def test_zero2_model_states_equal_deepspeed(model, nodes, gpn, offload):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    over = ["parallelism.zero_stage=2"] + (["parallelism.offload_optimizer=cpu"] if offload else [])
    est = _est(model, over, nodes=nodes, gpus_per_node=gpn, gpu="H200")
    s = model_shape(resolve_config(model)[1])
    cpu, gpu = estimate_zero2_model_states_mem_needs(s.total, num_gpus_per_node=gpn, num_nodes=nodes,
                                                      cpu_offload=offload)
    j = est.to_json()
    assert j["deepspeed_model_states_bytes"] == {"per_gpu": gpu, "cpu_per_node": cpu}


def test_zero3_breakdown_is_18_bytes_per_param_over_n():
    j = _est("meta-llama/Llama-3.1-8B", ["parallelism.zero_stage=3"], nodes=1, gpus_per_node=8).to_json()
    P, per = 8_030_261_248, j["per_gpu_bytes"]
    assert per["params"] + per["grads"] + per["optimizer"] == pytest.approx(18 * P / 8, abs=64)
    assert per["optimizer"] == pytest.approx(12 * P / 8, abs=64)


# --- activations -------------------------------------------------------------------------------

def _act(over, **kw):
    return _est("meta-llama/Llama-3.1-8B", over, gpus_per_node=8, **kw).to_json()["per_gpu_bytes"]["activations"]


def test_activation_checkpointing_and_attention_kernels():
    base = ["data.max_seq_len=2048", "train.micro_batch_size=2"]
    ckpt = _act(base + ["model.activation_checkpointing=full"])
    full = _act(base + ["model.activation_checkpointing=none"])
    assert full > 3 * ckpt
    # eager attention keeps the s x s scores: fp32 softmax + bf16 copy per head and layer, and copies
    # its output into o_proj's layout (SDPA writes it there); SDPA keeps an fp32 logsumexp per head and the boolean 4D mask
    # (independent formula)
    eager = _act(base + ["model.activation_checkpointing=none", "model.attn_implementation=eager"])
    L, heads, s, b = 32, 32, 2048, 2
    assert eager - full == L * s * b * heads * (s * 6 - 4) - b * s * s
    # checkpointed: the block inputs (2 bytes per token and layer) and the final norm (RMSNorm: fp32
    # input + two 16-bit copies) are kept, with the boolean mask
    kept = _est("meta-llama/Llama-3.1-8B", base + ["model.activation_checkpointing=full"], gpus_per_node=8)
    row = next(r for r in kept.memory.rows if r.name.startswith("block inputs"))
    assert row.bytes == s * b * (L * 2 * 4096 + 8 * 4096) + b * s * s


def test_logits_term_scales_with_vocabulary():
    over = ["data.max_seq_len=1024", "train.chunked_loss=0"]
    small = _est("mistralai/Mistral-7B-v0.1", over, gpus_per_node=8).memory.rows
    big = _est("meta-llama/Llama-3.1-8B", over, gpus_per_node=8).memory.rows
    lg = {n: next(r.bytes for r in rows if r.name.startswith("logits")) for n, rows in [("s", small), ("b", big)]}
    assert lg["b"] / lg["s"] == pytest.approx(128256 / 32000)


def test_chunked_loss_shrinks_the_8b_recipes_logits_row():
    # micro-batch 4 x 4096 tokens x 128k vocabulary: the fp32 logits alone were 27 GiB
    recipe = RECIPES / "sft" / "llama-3.1-8b-full-sft.yaml"
    from launcher.estimate.activations import loss_bytes

    full = estimate_recipe(load_recipe(recipe, ["train.chunked_loss=0"]))
    chunked = estimate_recipe(load_recipe(recipe))
    assert next(r.bytes for r in full.memory.rows if r.name.startswith("logits")) > 27 * GiB
    assert chunked.layout.chunked_loss and chunked.layout.chunk_tokens == 1024
    fwd, bwd = loss_bytes(chunked.shape, chunked.layout)
    hidden_grad = 4 * 4096 * 2 * 4096  # the gradient of the final hidden states, bf16
    assert fwd < bwd - hidden_grad < 2 * GiB  # one 1024-token chunk's logits
    assert chunked.memory.per_gpu["activations"] < full.memory.per_gpu["activations"] - 20 * GiB


# --- verdict and suggestions -------------------------------------------------------------------

def test_fits_on_h100_with_spare_reported():
    est = estimate_recipe(load_recipe(RECIPES / "sft" / "llama-3.1-8b-full-sft.yaml"), live_prices=False)
    j = est.to_json()
    assert j["fits"] is True and j["gpu_capacity_bytes"] > j["per_gpu_bytes"]["total"]
    assert j["spare_bytes"] == j["gpu_capacity_bytes"] - j["per_gpu_bytes"]["total"]
    assert j["suggestions"] == []
    text = format_estimate(est)
    assert "fits, with" in text and "H100-80GB" in text


def test_too_big_for_one_24gb_gpu_gets_suggestions_that_fit():
    over = ["train.micro_batch_size=4", "model.activation_checkpointing=none", "parallelism.zero_stage=2",
            "data.max_seq_len=2048"]
    recipe = model_recipe("Qwen/Qwen2.5-1.5B", over)
    est = estimate_recipe(recipe, gpu="L4", gpus_per_node=1, live_prices=False)
    assert est.fits is False
    assert "does NOT fit: short by" in format_estimate(est)
    fitting = [s for s in est.suggestions if s.fits]
    assert fitting, est.suggestions
    for s in fitting:
        assert s.per_gpu_total_bytes <= 23034 * 1024**2
        # applying the suggested overrides gives that very estimate, and it fits
        again = estimate_recipe(model_recipe("Qwen/Qwen2.5-1.5B", over + s.change.split()), gpu="L4",
                                gpus_per_node=None if "gpus_per_node" in s.change else 1, live_prices=False)
        assert again.fits is True
        assert again.memory.per_gpu["total"] == s.per_gpu_total_bytes
    assert len(fitting) == len(est.suggestions)  # the search lists only what fits
    same = [s for s in est.suggestions if "train.method" not in s.change]
    per_token = [s.gpu_seconds_per_token for s in same]
    assert per_token == sorted(per_token)  # cheapest first
    assert est.suggestions[:len(same)] == same  # then those that train another way (LoRA, QLoRA)


# --- time ----------------------------------------------------------------------------------------

def test_time_from_flops_tokens_and_mfu():
    over = ["train.max_steps=100", "train.micro_batch_size=2", "train.grad_accum=4", "data.max_seq_len=4096",
            "model.activation_checkpointing=none"]
    est = _est("meta-llama/Llama-3.1-8B", over, gpu="H100", gpus_per_node=8, mfu=0.4)
    j = est.to_json()
    N = 8_030_261_248 - 128256 * 4096  # the input embedding is a lookup, not a matmul
    fpt = 6 * N + 12 * 32 * 4096 * 4096
    tokens = 2 * 4 * 8 * 4096
    assert j["flops_per_token"] == pytest.approx(fpt)
    assert j["tokens_per_step"] == tokens
    assert j["step_time_s"] == pytest.approx(tokens * fpt / (8 * 989e12 * 0.4))
    assert j["total_hours"] == pytest.approx(100 * j["step_time_s"] / 3600)
    ck = _est("meta-llama/Llama-3.1-8B", over + ["model.activation_checkpointing=full"], gpus_per_node=8, mfu=0.4)
    assert ck.to_json()["flops_per_token"] == pytest.approx(fpt * 4 / 3)


def test_epochs_use_the_dataset_size():
    est = estimate_recipe(load_recipe(RECIPES / "sft" / "llama-3.1-8b-full-sft.yaml"), live_prices=False)
    # tatsu-lab/alpaca: 52,002 rows, 1% held out; 3 epochs of global batches of 4 x 4 x 8
    assert est.to_json()["steps"] == math.floor(3 * (int(52002 * 0.99) // 128))


def test_multi_node_zero3_warns_when_communication_dominates():
    est = _est("meta-llama/Llama-3.1-70B", ["train.micro_batch_size=1", "data.max_seq_len=512"],
               nodes=8, gpus_per_node=8, network_gbps=100)
    j = est.to_json()
    assert j["comm_time_s"] > 0 and any("communication would dominate" in w for w in j["warnings"])
    assert j["step_time_s"] == pytest.approx(j["comm_time_s"])


# --- cost --------------------------------------------------------------------------------------

def test_costs_sorted_cheapest_fitting_marked_and_onprem_row():
    est = estimate_recipe(load_recipe(RECIPES / "sft" / "llama-3.1-8b-full-sft.yaml"), usd_per_gpu_hour=1.5,
                          onprem_name="mycluster", live_prices=False)
    rows = est.to_json()["costs"]
    # what fits first, then what does not, each by total cost; the first row is the cheapest that fits
    fit_flags = [r["fits"] is not False for r in rows]
    assert fit_flags == sorted(fit_flags, reverse=True) and fit_flags[0] and not fit_flags[-1]
    for group in (True, False):
        totals = [r["total_usd"] for r in rows
                  if (r["fits"] is not False) == group and r["total_usd"] is not None]
        assert totals == sorted(totals)
    marked = [r for r in rows if r["cheapest_that_fits"]]
    assert len(marked) == 1 and marked[0] is rows[0] and marked[0]["fits"] is True
    clouds = {r["cloud"] for r in rows}
    assert {"AWS", "GCP", "Azure", "Lambda", "on-prem"} <= clouds
    onprem = next(r for r in rows if r["cloud"] == "on-prem")
    assert onprem["region"] == "mycluster" and onprem["usd_per_hour"] == pytest.approx(1.5 * 8)
    for r in rows:
        if r["total_usd"] is not None:
            assert r["total_usd"] == pytest.approx(r["usd_per_hour"] * r["hours"], rel=1e-3, abs=0.01)
    p5 = [r for r in rows if r["instance"] == "p5.48xlarge"]
    od, spot = sorted(p5, key=lambda r: r["spot"])
    assert od["usd_per_hour"] == pytest.approx(98.32) and spot["spot"] and spot["hours"] > od["hours"]
    assert "prices as of 2026-11" in format_estimate(est)


def test_price_table_covers_the_gpus_and_clouds():
    from launcher.estimate.prices import load_prices

    table = load_prices()
    assert table.as_of == "2026-11"
    gpus = {o.gpu for o in table.offers}
    assert {"A100-40GB", "A100-80GB", "H100-80GB", "H200-141GB", "L4-24GB", "A10G-24GB", "V100-16GB"} <= gpus
    assert {"AWS", "GCP", "Azure", "Lambda"} <= {o.cloud for o in table.offers}


def test_spot_preemption_cost():
    from launcher.estimate.cost import spot_hours

    # 10 h on 2 instances, 0.05 preemptions per instance-hour, checkpoint every hour, 10 min restart:
    # each preemption loses 0.5 h + 1/6 h
    lost = 0.5 + 10 / 60
    assert spot_hours(10, 2, 1.0, rate=0.05, restart_min=10) == pytest.approx(10 / (1 - 0.1 * lost))
    assert spot_hours(10, 100, None, rate=0.05) == math.inf


# --- JSON and interface ------------------------------------------------------------------------

REQUIRED_KEYS = {"params_total", "largest_layer_params", "per_gpu_bytes", "gpu_capacity_bytes", "fits",
                 "suggestions", "cpu_bytes_per_node", "step_time_s", "total_hours", "costs"}


def test_json_has_the_documented_keys():
    est = _est("meta-llama/Llama-3.1-70B", [], gpu="A100-40GB", gpus_per_node=8)
    j = json.loads(json.dumps(est.to_json(), allow_nan=False))
    assert REQUIRED_KEYS <= set(j)
    assert set(j["per_gpu_bytes"]) == {"params", "grads", "optimizer", "activations", "buffers", "overhead", "total"}
    assert j["fits"] is False and j["suggestions"]
    assert {"change", "per_gpu_total_bytes", "fits"} <= set(j["suggestions"][0])
    for c in j["costs"]:
        assert {"cloud", "region", "instance", "gpus", "spot", "usd_per_hour", "total_usd"} <= set(c)


def test_recipe_without_gpus_has_fits_none():
    est = estimate_recipe(from_dict(tiny_recipe_dict()), live_prices=False)
    assert est.fits is None and est.to_json()["costs"] == [] and est.to_json()["step_time_s"] is None
    assert estimate_recipe(from_dict(tiny_recipe_dict()), gpu="L4", live_prices=False).fits is True


def test_405b_estimate_is_fast():
    recipe = model_recipe("meta-llama/Llama-3.1-405B")
    start = time.perf_counter()
    est = estimate_recipe(recipe, nodes=16, live_prices=False)
    format_estimate(est)
    assert time.perf_counter() - start < 2.0
    assert est.shape.total == 405_853_388_800


# --- bad input ---------------------------------------------------------------------------------

def test_unknown_gpu_lists_the_known_ones():
    with pytest.raises(UserError, match="known GPUs: H100-80GB.*L4-24GB"):
        _est("gpt2", [], gpu="H1000")


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(UserError, match="known models: .*meta-llama/Llama-3.1-8B"):
        model_recipe_est = estimate_recipe(model_recipe("meta-llama/Llama-9-8B"), live_prices=False)  # noqa: F841


def test_more_pipeline_stages_than_layers_is_refused():
    # gpt2 has 12 layers
    with pytest.raises(UserError, match="16 pipeline stages but the model has only 12 layers"):
        _est("gpt2", ["parallelism.zero_stage=1", "parallelism.pipeline_stages=16", "resources.nodes=2"])


def test_more_data_parallel_ranks_than_examples_is_refused():
    d = tiny_recipe_dict()
    d["train"] = {"epochs": 1, "micro_batch_size": 4}
    with pytest.raises(UserError, match="more than the 200 training examples: use at most 50 GPUs"):
        estimate_recipe(from_dict(d), gpu="L4", nodes=8, gpus_per_node=8, live_prices=False)


def test_cli_json_and_exit_codes():
    from test_cli import run_cli

    res = run_cli("estimate", str(RECIPES / "sft" / "llama-3.1-8b-full-sft.yaml"), "train.micro_batch_size=2",
                  "--gpu", "A100-80GB", "--json", "--offline-prices")
    assert res.returncode == 0, res.stderr
    j = json.loads(res.stdout)
    assert j["gpu"] == "A100-80GB" and j["layout"]["micro_batch_size"] == 2 and REQUIRED_KEYS <= set(j)
    bad = run_cli("estimate", "--model", "gpt2", "--gpu", "B300")
    assert bad.returncode == 2 and "known GPUs" in bad.stderr and "Traceback" not in bad.stderr
    helped = run_cli("estimate", "--help")
    assert helped.returncode == 0 and "Example: launcher estimate" in helped.stdout
