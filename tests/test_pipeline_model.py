"""The pipeline layers compute exactly the Hugging Face forward and loss, for every supported
family, and their saved state maps back to the Hugging Face parameter names (no processes: the
layers are run one after another here; tests/test_pipeline_train.py runs the DeepSpeed engine).

Tolerance: logits and loss equal to 1e-6 absolute in fp32 (the same modules and kernels run in
the same order; only the mask may be built once per layer instead of once per model)."""

from __future__ import annotations

import pytest
import torch

from launcher.runtime.pipeline import (
    PipeLayer,
    _Source,
    _specs,
    causal_lm_loss,
    chunked_causal_lm_loss_fn,
    hf_state_name,
    pipe_micro_batch,
    pipeline_layers,
)

ATOL = 1e-6

CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, sliding_window=5),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  use_sliding_window=True, sliding_window=5, max_window_layers=2),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=4, n_head=4, n_positions=128),
}


def _model(name: str, tied: bool):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(**{**CONFIGS[name], "vocab_size": 300, "tie_word_embeddings": tied})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    return model.eval()


def _run_layers(model, inputs, chunked_loss=False):
    """The pipeline's layers, all on this process, in order (what the stages do together)."""
    from deepspeed.pipe import TiedLayerSpec

    source = _Source(model)
    tied: dict[str, torch.nn.Module] = {}
    x = inputs
    for spec in _specs(model, source, chunked_loss=chunked_loss):
        if isinstance(spec, TiedLayerSpec):
            module = tied.setdefault(spec.key, spec.build())
            x = spec.forward_fn(module, x) if spec.forward_fn else module(x)
        else:
            x = spec.build()(x)
    return x


def _batch(packed: bool):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 300, (3, 12), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    if packed:  # two documents per row: positions restart
        pos = torch.tensor([list(range(5)) + list(range(7))] * 3)
        return {"input_ids": ids, "labels": labels, "position_ids": pos}
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # padding
    mask[2, 6:] = 0
    labels[mask == 0] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_pipeline_layers_equal_the_hf_forward(name, tied, packed):
    model = _model(name, tied)
    batch = _batch(packed)
    with torch.no_grad():
        ref = model(**batch, num_items_in_batch=7.5)
        inputs, labels = pipe_micro_batch(batch, 7.5)
        logits = _run_layers(model, inputs)
        loss = causal_lm_loss(model.config.vocab_size)(logits, labels)
    torch.testing.assert_close(logits, ref.logits, rtol=0, atol=ATOL)
    torch.testing.assert_close(loss, ref.loss, rtol=0, atol=ATOL)


@pytest.mark.parametrize("name,tied", [("llama", False), ("qwen2", True), ("gpt2", True)])
def test_chunked_pipeline_loss_and_gradients_equal_the_hf_loss(name, tied):
    """`train.chunked_loss` in the pipeline: the head hands (hidden, weight) to the loss, which
    computes the logits 5 tokens at a time; loss 1e-6 and every gradient 1e-6 relative (norm)."""
    model = _model(name, tied)  # eval: no dropout, gradients all the same
    batch = _batch(False)

    def grads():
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        return out

    ref = model(**batch, num_items_in_batch=7.5).loss
    ref.backward()
    ref_grads = grads()
    inputs, labels = pipe_micro_batch(batch, 7.5)
    outputs = _run_layers(model, inputs, chunked_loss=True)
    assert len(outputs) == 2 and outputs[1] is model.lm_head.weight  # no logits leave the head
    loss = chunked_causal_lm_loss_fn(5)(outputs, labels)
    loss.backward()
    got = grads()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    assert got.keys() == ref_grads.keys()
    for n in got:
        assert torch.linalg.vector_norm(got[n] - ref_grads[n]) <= 1e-6 * torch.linalg.vector_norm(ref_grads[n]), n


def test_sliding_window_is_in_effect():
    """Mistral with a window of 5 differs from full attention: the mask is not ignored."""
    model = _model("mistral", False)
    batch = _batch(False)
    with torch.no_grad():
        windowed = _run_layers(model, pipe_micro_batch(batch, 1.0)[0])
        model.config.sliding_window = None
        from launcher.runtime import pipeline

        full = _run_layers(model, pipe_micro_batch(batch, 1.0)[0])
        assert pipeline._mask_fn(model.config, 0).__name__ == "create_causal_mask"
    assert not torch.allclose(windowed, full, atol=1e-4)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_saved_layer_keys_map_to_every_hf_parameter_once(name, tied):
    """What each pipe layer saves (its state dict), renamed by `hf_state_name`, is exactly the
    Hugging Face state dict (a tied head saves nothing: transformers ties it again on load)."""
    from deepspeed.pipe import TiedLayerSpec

    model = _model(name, tied)
    expected = {k: v for k, v in model.state_dict().items()}
    if tied:
        expected.pop("lm_head.weight")
    layers = pipeline_layers(model.config)
    specs = _specs(model, _Source(model))
    assert len(layers) == len(specs)
    got: dict[str, torch.Tensor] = {}
    for layer, spec in zip(layers, specs):
        if isinstance(spec, TiedLayerSpec) and spec.forward_fn is not None:
            assert layer.tied  # the pipeline engine saves no file for it
            continue
        for key, value in spec.build().state_dict().items():
            hf = hf_state_name(layer, key)
            assert hf is not None and hf not in got, (layer, key)
            got[hf] = value
    assert got.keys() == expected.keys()
    for k in got:
        assert torch.equal(got[k], expected[k]), k


def test_unsupported_family_is_refused_naming_the_key():
    from transformers import AutoConfig

    from launcher.errors import UserError

    with pytest.raises(UserError, match="pipeline_stages"):
        pipeline_layers(AutoConfig.for_model("opt"))
    assert pipeline_layers(AutoConfig.for_model(**CONFIGS["gpt2"]))[1] == PipeLayer("positions", "transformer.wpe.")


@pytest.mark.parametrize("zero", [2, 3])
def test_zero_2_and_3_with_a_pipeline_are_refused_at_validation(tmp_path, zero):
    """`launcher recipes validate` exits 2 with one line naming parallelism.zero_stage and the fix."""
    import subprocess
    import sys

    from conftest import ROOT

    recipe = tmp_path / "pp.yaml"
    recipe.write_text(
        f"defaults: [{ROOT}/recipes/examples/tiny-sft.yaml]\nname: pp\n"
        f"parallelism: {{zero_stage: {zero}, pipeline_stages: 2}}\n"
    )
    res = subprocess.run([sys.executable, "-m", "launcher", "recipes", "validate", str(recipe)],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2
    out = res.stdout + res.stderr
    assert "parallelism.zero_stage" in out and "zero_stage=1" in out


def test_pipeline_partition_is_checked_and_documented():
    from conftest import tiny_recipe_dict
    from launcher.errors import RecipeError
    from launcher.recipe import from_dict

    d = tiny_recipe_dict(parallelism={"zero_stage": 1, "pipeline_stages": 2, "pipeline_partition": "layer"},
                         resources={"cpu_workers": 2})
    with pytest.raises(RecipeError, match="pipeline_partition"):
        from_dict(d)
    d["parallelism"]["pipeline_partition"] = "layers"
    assert from_dict(d).parallelism.pipeline_partition == "layers"


def test_preflight_refuses_more_stages_than_layers_and_unsupported_models():
    from conftest import tiny_recipe_dict
    from launcher.errors import UserError
    from launcher.recipe import from_dict
    from launcher.runtime.job import preflight

    d = tiny_recipe_dict(parallelism={"zero_stage": 1, "pipeline_stages": 4}, resources={"cpu_workers": 4})
    with pytest.raises(UserError, match="parallelism.pipeline_stages to at most 2"):
        preflight(from_dict(d))  # the tiny recipe's model has 2 decoder layers
    d["parallelism"]["pipeline_stages"] = 2
    d["model"]["config"] = {"model_type": "opt", "hidden_size": 64, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "ffn_dim": 128, "word_embed_proj_dim": 64}
    with pytest.raises(UserError, match="supports model types llama, mistral, qwen2, gpt2"):
        preflight(from_dict(d))


def test_resume_with_another_stage_or_worker_count_is_refused():
    from launcher.checkpoint.reshard import reshard_problem

    saved = {"world_size": 4, "data_parallel": 2, "zero_stage": 1, "pipeline_stages": 2}
    assert reshard_problem(saved, dict(saved)) is None
    assert "set parallelism.pipeline_stages back" in reshard_problem(saved, {**saved, "pipeline_stages": 1})
    assert "same number of workers" in reshard_problem(saved, {**saved, "world_size": 2, "data_parallel": 1})
