"""The model as the runtime builds it keeps packed documents apart."""

from __future__ import annotations

import torch

from conftest import tiny_recipe_dict
from launcher.data import build_tokenizer
from launcher.recipe import from_dict
from launcher.runtime.model import build_model


def test_training_model_keeps_packed_documents_apart():
    d = tiny_recipe_dict()
    d["model"]["attn_implementation"] = "sdpa"
    r = from_dict(d)
    tok = build_tokenizer(r.tokenizer, None)
    model = build_model(r.model, tok, seed=0)
    model.train()  # as in the training loop, with the forward called without use_cache
    assert model.config.use_cache is False
    a = tok("first document", return_tensors="pt").input_ids[0]
    b = tok("second one", return_tensors="pt").input_ids[0]
    packed = torch.cat([a, b])[None]
    pos = torch.cat([torch.arange(len(a)), torch.arange(len(b))])[None]
    with torch.no_grad():
        together = model(input_ids=packed, position_ids=pos).logits[0, len(a):]
        alone = model(input_ids=b[None]).logits[0]
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_a_hub_id_is_not_taken_for_a_missing_local_directory(monkeypatch):
    """`org/name` goes to transformers as a hub id; offline and not cached, the message says so."""
    import pytest

    from launcher.errors import RecipeError
    from launcher.recipe import ModelConfig
    from launcher.runtime.model import model_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = build_tokenizer(from_dict(tiny_recipe_dict()).tokenizer, None)
    want = (r"^model\.name_or_path: nobody/no-such-model not found locally or in the Hugging Face cache "
            r".* run `hf download nobody/no-such-model`")
    with pytest.raises(RecipeError, match=want):
        model_config(ModelConfig(name_or_path="nobody/no-such-model", dtype="fp32"), tok)


def test_build_model_checkpoints_and_chunks_the_loss_as_the_recipe_says():
    """model.activation_checkpointing reaches the decoder layers; train.chunked_loss the forward."""
    d = tiny_recipe_dict()
    d["model"]["activation_checkpointing"] = "selective"
    r = from_dict(d)
    tok = build_tokenizer(r.tokenizer, None)
    model = build_model(r.model, tok, seed=0, chunked_loss=r.train.chunked_loss)
    layers = model.model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    assert "context_fn" in layers[0]._gradient_checkpointing_func.keywords  # selective's policy
    assert model.launcher_chunked_loss == 1024
    plain = build_model(from_dict(tiny_recipe_dict()).model, tok, seed=0)
    assert not plain.is_activation_checkpointing and not hasattr(plain, "launcher_chunked_loss")
