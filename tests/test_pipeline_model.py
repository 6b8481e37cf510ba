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


def _run_layers(model, inputs):
    """The pipeline's layers, all on this process, in order (what the stages do together)."""
    from deepspeed.pipe import TiedLayerSpec

    source = _Source(model)
    tied: dict[str, torch.nn.Module] = {}
    x = inputs
    for spec in _specs(model, source):
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
