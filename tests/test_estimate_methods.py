"""`launcher estimate` for every method and task: LoRA's trainable parameters against PEFT's own
count, QLoRA's 4-bit storage against bitsandbytes' layout, DPO's pairs and reference, the new
GPUs, and the everyday command. Fast: no weights, no network, no training."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import RECIPES, tiny_recipe_dict
from launcher.estimate import estimate_recipe, model_recipe
from launcher.estimate.compute import flops_per_token
from launcher.estimate.hardware import GPUS, find_gpu
from launcher.estimate.method import NF4_BLOCK, method_for, quant4_bytes
from launcher.estimate.params import count_on_meta, model_shape
from launcher.recipe import from_dict, load_recipe

GiB = 1024**3
TINY = tiny_recipe_dict()["model"]["config"] | {"vocab_size": 262}


def _tiny(method: str = "lora", lora: dict | None = None, **train) -> object:
    d = tiny_recipe_dict()
    d["model"]["config"] = dict(TINY)
    d["train"] = {**d["train"], "method": method, **train}
    d["lora"] = {"rank": 8, **(lora or {})}
    return from_dict(d)


def _peft_count(target_modules: list[str], modules_to_save: list[str], rank: int = 8) -> int:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from launcher.estimate.params import hf_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(TINY))
    cfg = LoraConfig(r=rank, lora_alpha=16, target_modules=target_modules, modules_to_save=modules_to_save or None,
                     task_type="CAUSAL_LM")
    return get_peft_model(model, cfg).get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("targets,save", [
    ([], []),  # the default: every attention and MLP projection
    (["q_proj", "v_proj"], []),
    (["self_attn.o_proj", "down_proj"], ["lm_head"]),
])
def test_lora_trainable_parameters_equal_peft(targets, save):
    r = _tiny(lora={"target_modules": targets, "modules_to_save": save})
    m = method_for(r, model_shape(TINY, use_cache=False))
    peft_targets = targets or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert m.trainable == _peft_count(peft_targets, save)
    assert m.adapters + (model_shape(TINY).vocab * model_shape(TINY).hidden if save else 0) == m.trainable


def test_llama_3_1_8b_rank_16_adapters_are_41_943_040():
    # PEFT's get_nb_trainable_parameters() on a meta-device Llama-3.1-8B with r=16 on
    # q/k/v/o/gate/up/down gives (41943040, 8072204288) (13 s of CPU; run once, written here):
    # 32 layers x 16 x [(4096+4096) x 2 + (4096+1024) x 2 + (4096+14336) x 3]
    r = model_recipe("meta-llama/Llama-3.1-8B", ["train.method=lora", "lora.rank=16"])
    _, cfg = __import__("launcher.estimate.catalog", fromlist=["resolve_config"]).resolve_config(
        "meta-llama/Llama-3.1-8B")
    m = method_for(r, model_shape(cfg))
    assert m.trainable == m.adapters == 41_943_040 == 32 * 16 * (8192 * 2 + 5120 * 2 + 18432 * 3)


def test_module_table_adds_up_to_the_parameter_count():
    for cfg in (TINY, {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 262}):
        shape = count_on_meta(cfg)
        assert sum(numel * count for _n, _k, numel, _i, _o, count in shape.modules) == shape.total


def test_quant4_bytes_follow_bitsandbytes_layout():
    # bitsandbytes is not installed here (no GPU), so its storage is written out by hand from
    # bitsandbytes.functional.quantize_4bit: ceil(n/2) bytes of packed nibbles; one fp32 absmax per
    # 64-element block, or with compress_statistics (double quantization) the absmax as uint8 plus
    # quantize_blockwise(blocksize=256)'s fp32 absmax per 256 blocks and the fp32 offset; plus the
    # 16-entry fp32 nf4 code each QuantState holds.
    n = 4096 * 4096
    blocks = n // 64  # 262,144
    assert NF4_BLOCK == 64
    assert quant4_bytes(n, double_quant=False) == 8_388_608 + 4 * 262_144 + 64 == 9_437_248
    assert quant4_bytes(n, double_quant=True) == 8_388_608 + 262_144 + 4 * (blocks // 256) + 4 + 64 == 8_654_916
    assert quant4_bytes(100, double_quant=True) == 50 + 2 + 4 + 4 + 64  # 2 blocks, 1 nested block
    # bits per weight: 4.5 with fp32 constants, ~4.127 with double quantization (QLoRA paper: 0.127)
    assert quant4_bytes(n, False) * 8 / n == pytest.approx(4.5, abs=1e-3)
    assert quant4_bytes(n, True) * 8 / n == pytest.approx(4.127, abs=1e-3)


def test_qlora_base_bytes_of_a_tiny_model():
    shape = model_shape(TINY, use_cache=False)
    m = method_for(_tiny(), shape, "qlora")
    h, f, kv, L, V = 64, 128, 2 * 16, 2, 262
    weights = [h * h, h * kv, h * kv, h * h, h * f, h * f, f * h]  # q, k, v, o, gate, up, down
    assert m.quantized == L * sum(weights)
    assert m.quantized_bytes == L * sum(quant4_bytes(w, True) for w in weights)
    # embeddings, LM head and the norms stay 16-bit: 2 x V x h + (2 L + 1) x h
    assert m.base_16bit == 2 * V * h + (2 * L + 1) * h == shape.total - m.quantized


def _8b(*over, gpu="A100-80GB", gpus=1):
    return estimate_recipe(model_recipe("meta-llama/Llama-3.1-8B", list(over)), gpu=gpu, gpus_per_node=gpus,
                           live_prices=False)


def test_lora_and_qlora_need_less_than_full_and_dpo_more_than_sft():
    full, lora, qlora = (_8b(f"train.method={x}") for x in ("full", "lora", "qlora"))
    t = {k: e.memory.per_gpu["total"] for k, e in (("full", full), ("lora", lora), ("qlora", qlora))}
    assert t["qlora"] < t["lora"] < t["full"]
    # LoRA's optimizer: 42M parameters x 12 bytes; QLoRA's base: 7.0B in ~0.52 bytes + 1.05B in 2 bytes
    assert lora.memory.per_gpu["optimizer"] == 12 * 41_943_040
    q_params = sum(r.bytes for r in qlora.memory.rows if r.category == "params")
    assert 5.3 * GiB < q_params < 5.5 * GiB
    sft = _8b("train.method=lora", "train.micro_batch_size=2")
    dpo = _8b("train.method=lora", "train.micro_batch_size=2", "train.task=dpo", "data.format=chat")
    assert dpo.memory.per_gpu["activations"] > 1.9 * sft.memory.per_gpu["activations"]
    assert dpo.memory.per_gpu["total"] > sft.memory.per_gpu["total"]
    copy = _8b("train.method=lora", "train.micro_batch_size=2", "train.task=dpo", "data.format=chat",
               "preference.reference=copy")
    ref = [r for r in copy.memory.rows if r.name.startswith("reference policy")]
    assert ref and ref[0].bytes == 2 * 8_030_261_248  # a whole bf16 copy on one GPU
    assert dpo.time.tokens_per_step == 2 * sft.time.tokens_per_step  # chosen + rejected


def test_lora_flops_are_two_thirds_of_full_plus_the_adapters():
    full, lora = _8b("model.activation_checkpointing=none"), _8b("model.activation_checkpointing=none",
                                                                "train.method=lora")
    s, lay = full.shape, full.layout
    n = s.total - s.vocab * s.hidden
    attn = 12 * s.num_layers * s.heads * s.head_dim * lay.seq_len
    assert flops_per_token(s, lay) == 6 * n + attn
    assert flops_per_token(s, lora.layout, lora.method) == 4 * n + 6 * 41_943_040 + attn
    dpo = _8b("model.activation_checkpointing=none", "train.method=lora", "train.task=dpo", "data.format=chat")
    # each trained sequence also runs through the reference (the base, adapters off): + 2N + attention forward
    assert flops_per_token(s, dpo.layout, dpo.method) == 4 * n + 6 * 41_943_040 + attn + 2 * n + attn / 3


def test_full_on_one_4090_suggests_lora_and_qlora_that_fit():
    est = _8b(gpu="RTX4090-24GB")
    assert est.fits is False
    changes = [s.change for s in est.suggestions if "train.method" in s.change]
    assert any("train.method=qlora" in c for c in changes) and any("train.method=lora" in c for c in changes)
    for s in est.suggestions:
        assert s.fits and s.per_gpu_total_bytes <= GPUS["RTX4090-24GB"].memory_bytes


def test_new_gpus_are_known_with_aliases_and_prices():
    from launcher.estimate.prices import load_prices

    for name, alias, cap_gib in [("RTX3090-24GB", "rtx3090", 24.0), ("RTX4090-24GB", "RTX 4090", 23.99),
                                 ("RTX5090-32GB", "rtx5090", 31.84), ("RTX-A6000-48GB", "A6000", 47.99),
                                 ("L40S-48GB", "l40s", 44.99)]:
        g = find_gpu(alias)
        assert g.name == name and g.memory_bytes / GiB == pytest.approx(cap_gib, abs=0.01)
        assert g.peak_tflops > 0 and g.memory_gbps > 0
    priced = {o.gpu for o in load_prices().offers}
    assert {"RTX3090-24GB", "RTX4090-24GB", "RTX-A6000-48GB", "L40S-48GB"} <= priced
    assert "RTX5090-32GB" not in priced  # no cloud in SkyPilot's catalog offers it: no invented price


def test_the_everyday_command_and_its_json():
    from typer.testing import CliRunner

    from launcher.cli.app import app
    from test_cli import run_cli

    cmd = ["estimate", "--model", "meta-llama/Llama-3.1-8B", "--gpu", "RTX4090-24GB", "train.method=qlora"]
    res = run_cli(*cmd, "--json")  # a real process: exit 0, stdout the JSON alone
    assert res.returncode == 0, res.stderr
    j = json.loads(res.stdout)
    assert j["method"]["method"] == "qlora" and j["method"]["trainable_params"] == 41_943_040
    assert j["layout"]["gpus_per_node"] == 1 and j["fits"] is True
    assert j["per_gpu_bytes"]["total"] < j["gpu_capacity_bytes"]
    text = CliRunner().invoke(app, cmd)
    assert text.exit_code == 0, text.output
    assert "1 RTX4090-24GB" in text.output and "verdict  fits" in text.output
    assert "of 23.99 GiB on RTX4090-24GB" in text.output
    helped = CliRunner().invoke(app, ["estimate", "--help"], env={"COLUMNS": "400"})
    for name in ("RTX3090-24GB", "RTX4090-24GB", "RTX5090-32GB", "RTX-A6000-48GB", "L40S-48GB"):
        assert name in helped.output


@pytest.mark.parametrize("path", ["sft/llama-3.1-8b-lora-sft.yaml", "sft/llama-3.1-8b-qlora-sft.yaml",
                                  "preference/llama-3.1-8b-dpo.yaml"])
def test_real_scale_recipes_fit_their_gpus(path):
    est = estimate_recipe(load_recipe(RECIPES / path), live_prices=False)
    assert est.fits is True, est.memory.per_gpu


@pytest.mark.parametrize("ckpt", ["selective", "full"])
def test_lora_activations_agree_with_the_trace(ckpt):
    """The analytic LoRA terms (rank-sized A outputs, dropout copies, selective's B outputs, the
    frozen head's smaller loss backward) against one LoRA step traced on fake tensors. On
    Llama-3.2-1B at 2048 tokens: +3.1% (none, dropout 0.05: the copies are counted for every
    adapted layer), +0.1% (selective), +0.2% (full); `none` is left to the benchmark (slow)."""
    d = tiny_recipe_dict()
    d["model"] = {"config": {**TINY, "hidden_size": 128, "intermediate_size": 384, "vocab_size": 1024},
                  "dtype": "bf16", "activation_checkpointing": ckpt}
    d["data"]["max_seq_len"] = 256
    d["train"] = {**d["train"], "method": "lora", "micro_batch_size": 2}
    d["lora"] = {"rank": 8, "dropout": 0.05}
    d["resources"] = {"gpus_per_node": 1, "gpu": "H100-80GB"}
    d["parallelism"] = {"zero_stage": 0}
    recipe = from_dict(d, source="test")
    from launcher.estimate.trace import trace_estimate

    est = estimate_recipe(recipe, live_prices=False)
    traced, per = trace_estimate(est, recipe)["traced_per_gpu_bytes"], est.memory.per_gpu
    for k in ("params", "grads", "optimizer"):  # frozen base 16-bit; adapters' fp32 gradients and states
        assert traced[k] == pytest.approx(per[k], rel=0.01), k
    assert per["activations"] == pytest.approx(traced["activations"], rel=0.06)
    assert per["activations"] >= 0.98 * traced["activations"]  # on the safe side
