"""LoRA and QLoRA without training: target-module defaults, the adapters PEFT puts on the model
(only they train), the refusals before anything starts (exit 2 with the key named), and the
names the LoRA export maps."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml

from conftest import ROOT, tiny_recipe_dict
from launcher.errors import RecipeError, UserError
from launcher.recipe import from_dict


def _lora_dict(**lora) -> dict:
    d = tiny_recipe_dict(name="lora")
    d["train"]["method"] = "lora"
    d["lora"] = {"rank": 4, "alpha": 8.0, "dropout": 0.0, **lora}
    return d


def _meta(model_type: str, **config):
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


# -- target modules ------------------------------------------------------------------------------


def test_default_targets_are_each_familys_attention_and_mlp_projections():
    from launcher.runtime.lora import default_targets

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=300)
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for family in ("llama", "mistral", "qwen2"):
        assert default_targets(_meta(family, **small)) == projections, family
    gpt2 = _meta("gpt2", n_embd=32, n_layer=1, n_head=4, vocab_size=300)
    assert default_targets(gpt2) == ["c_attn", "c_proj", "c_fc"]
    # a family without a table entry: every linear layer but the LM head
    neox = _meta("gpt_neox", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                 vocab_size=300)
    got = default_targets(neox)
    assert got == ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"]
    assert "embed_out" not in got


def test_lora_model_trains_only_the_adapters_and_can_run_the_base():
    from peft import PeftModel

    from launcher.data import build_tokenizer
    from launcher.runtime.lora import apply_lora
    from launcher.runtime.model import build_model, param_groups

    recipe = from_dict(_lora_dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    tok = build_tokenizer(recipe.tokenizer, None)
    model = build_model(recipe.model, tok, seed=0)
    ids = torch.arange(20).reshape(2, 10) % 250
    with torch.no_grad():
        base_logits = model(input_ids=ids).logits
    peft_model = apply_lora(model, recipe, seed=0)
    assert isinstance(peft_model, PeftModel)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or ".modules_to_save." in n for n in trainable)
    assert sum(".q_proj.lora_A." in n for n in trainable) == 2  # one per layer
    assert not any("k_proj" in n or "original_module" in n for n in trainable)
    # DeepSpeed is given the trainable parameters only: only they get optimizer state
    grouped = {id(p) for g in param_groups(peft_model, 0.1) for p in g["params"]}
    assert grouped == {id(p) for p in peft_model.parameters() if p.requires_grad}
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if ".lora_B." in n:
                p.fill_(0.01)  # B starts at zero: make the adapters change the output
        adapted = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():  # preference.reference=base runs this
            unadapted = peft_model(input_ids=ids).logits
    assert not torch.allclose(adapted, base_logits)
    torch.testing.assert_close(unadapted, base_logits)


def test_targets_that_match_nothing_are_refused_naming_the_key():
    with pytest.raises(RecipeError) as e:
        from_dict(_lora_dict(target_modules=["q_proj", "query"]))
    assert e.value.key == "lora.target_modules" and "'query'" in str(e.value) and "q_proj" in str(e.value)
    with pytest.raises(RecipeError) as e:
        from_dict(_lora_dict(target_modules=["mlp"]))  # a block, not a layer
    assert e.value.key == "lora.target_modules" and "LlamaMLP" in str(e.value)
    with pytest.raises(RecipeError) as e:
        from_dict(_lora_dict(modules_to_save=["embeddings"]))
    assert e.value.key == "lora.modules_to_save"
    from_dict(_lora_dict(target_modules=["self_attn.q_proj", "down_proj"], modules_to_save=["embed_tokens"]))


def test_a_pretrained_models_targets_are_checked_by_the_preflight(tmp_path):
    from transformers import AutoConfig

    from launcher.runtime.devices import check_devices

    AutoConfig.for_model("qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=300).save_pretrained(tmp_path)
    d = _lora_dict(target_modules=["c_attn"])
    d["model"] = {"name_or_path": str(tmp_path), "dtype": "fp32"}
    recipe = from_dict(d)  # the recipe alone cannot know a pretrained model's names
    with pytest.raises(RecipeError) as e:
        check_devices(recipe)
    assert e.value.key == "lora.target_modules" and "qwen2" in str(e.value)
    d["lora"]["target_modules"] = []
    check_devices(from_dict(d))


def test_pipeline_stages_with_lora_are_refused():
    d = _lora_dict()
    d.update(parallelism={"pipeline_stages": 2, "zero_stage": 1}, resources={"cpu_workers": 2})
    with pytest.raises(RecipeError) as e:
        from_dict(d)
    assert e.value.key == "parallelism.pipeline_stages" and "train.method=lora" in str(e.value)


def test_qlora_needs_gpus_a_pretrained_model_and_bitsandbytes(tmp_path):
    from launcher.runtime.lora import require_bitsandbytes

    d = _lora_dict()
    d["train"]["method"] = "qlora"
    with pytest.raises(RecipeError) as e:
        from_dict(d)  # CPU workers
    assert e.value.key == "train.method" and "GPU" in str(e.value)
    d["resources"] = {"gpus_per_node": 1}
    with pytest.raises(RecipeError) as e:
        from_dict(d)  # a random-init model: nothing pretrained to quantize
    assert e.value.key == "train.method" and "model.name_or_path" in str(e.value)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match=r"pip install 'launcher\[qlora\]'"):
            require_bitsandbytes()


def test_quantization_config_follows_the_recipe(monkeypatch):
    import types

    from launcher.runtime import lora

    monkeypatch.setattr(lora, "require_bitsandbytes", lambda: None)  # not installed on CPU machines
    d = _lora_dict(quant_type="fp4", double_quant=False)
    d["model"]["dtype"] = "bf16"
    recipe = types.SimpleNamespace(model=from_dict(d).model, lora=from_dict(d).lora)
    q = lora.quantization_config(recipe)
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "fp4" and not q.bnb_4bit_use_double_quant
    # PEFT's ZeRO-3 QLoRA recipe: storage (and compute) in the model dtype
    assert q.bnb_4bit_quant_storage == torch.bfloat16 and q.bnb_4bit_compute_dtype == torch.bfloat16


@pytest.mark.parametrize("override, key", [
    ("train.method=qlora", "train.method"),
    ("lora.target_modules=[q_proj,qkv]", "lora.target_modules"),
])
def test_cli_refuses_before_anything_starts(tmp_path, override, key):
    d = _lora_dict()
    recipe = tmp_path / "lora.yaml"
    recipe.write_text(yaml.safe_dump(d))
    run_dir = tmp_path / "run"
    r = _cli("run", str(recipe), override, "--run-dir", str(run_dir))
    assert r.returncode == 2, r.stderr
    assert key in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not run_dir.exists()  # nothing started


# -- export names ----------------------------------------------------------------------------------


def test_export_maps_peft_names_to_the_plain_models():
    from launcher.checkpoint.export_lora import base_name, hf_name

    p = "base_model.model.model.layers.0.self_attn.q_proj."
    assert hf_name(p + "base_layer.weight") == "model.layers.0.self_attn.q_proj.weight"
    assert hf_name(p + "lora_A.default.weight") is None and base_name(p + "lora_B.default.weight") is None
    assert hf_name("base_model.model.model.norm.weight") == "model.norm.weight"
    # modules_to_save: the merged model takes the trained copy, the base its frozen original
    head = "base_model.model.lm_head."
    assert hf_name(head + "modules_to_save.default.weight") == "lm_head.weight"
    assert hf_name(head + "original_module.weight") is None
    assert base_name(head + "original_module.weight") == "lm_head.weight"
    assert base_name(head + "modules_to_save.default.weight") is None


def test_a_stage0_lora_checkpoint_names_its_trainable_parameters(tmp_path):
    """ZeRO-0 records no frozen names: the optimizer's parameters are the PEFT model's adapters
    (and modules_to_save copies), matched in param_groups' order (decay first)."""
    from launcher.checkpoint.zero_reader import iter_full_optimizer_states, read_meta

    p = "base_model.model.model.layers.0.self_attn.q_proj."
    module = {p + "base_layer.weight": torch.ones(8, 8), p + "lora_A.default.weight": torch.full((2, 8), 2.0),
              p + "lora_B.default.weight": torch.full((8, 2), 3.0), "base_model.model.model.norm.weight": torch.ones(8)}
    state = {0: {"step": torch.tensor(3.0), "exp_avg": torch.full((2, 8), 0.5), "exp_avg_sq": torch.zeros(2, 8)},
             1: {"step": torch.tensor(3.0), "exp_avg": torch.full((8, 2), 0.25), "exp_avg_sq": torch.zeros(8, 2)}}
    torch.save({"module": module, "optimizer": {"state": state, "param_groups": [{"params": [0, 1]}]},
                "buffer_names": [], "dp_world_size": 1}, tmp_path / "mp_rank_00_model_states.pt")
    meta = read_meta(tmp_path)
    assert meta.zero_stage == 0 and list(meta.param_groups) == [p + "lora_A.default.weight", p + "lora_B.default.weight"]
    assert len(meta.param_shapes) == 4  # the frozen base is there too, for the export
    states = dict(iter_full_optimizer_states(tmp_path))
    assert float(states[p + "lora_B.default.weight"]["exp_avg"][0, 0]) == 0.25


def test_a_lora_checkpoint_refuses_a_resume_with_other_adapters():
    from launcher.checkpoint.state import fingerprint, fingerprint_diff

    lora = from_dict(_lora_dict())
    assert fingerprint_diff(fingerprint(lora), fingerprint(from_dict(_lora_dict(dropout=0.1)))) == []
    assert fingerprint_diff(fingerprint(lora), fingerprint(from_dict(_lora_dict(rank=8)))) == ["lora.rank: 4 -> 8"]
    full = from_dict(tiny_recipe_dict(name="lora"))
    assert "train.method" not in fingerprint(full)  # full runs' manifests are unchanged
    assert "train.method: 'lora' -> None" in fingerprint_diff(fingerprint(lora), fingerprint(full))


def test_merge_of_a_full_fine_tuning_checkpoint_is_refused(tmp_path):
    from launcher.checkpoint.export import export_checkpoint

    torch.save({"module": {"model.norm.weight": torch.ones(8)}, "buffer_names": [], "dp_world_size": 1},
               tmp_path / "mp_rank_00_model_states.pt")
    with pytest.raises(UserError, match="--merge applies to LoRA runs"):
        export_checkpoint(tmp_path, tmp_path / "out", recipe=from_dict(tiny_recipe_dict()), merge=True)
    assert not (tmp_path / "out").exists()
