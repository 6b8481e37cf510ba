"""`train.chunked_loss`: the loss over the vocabulary a chunk of tokens at a time equals
transformers' unchunked loss (value and every gradient, token weighting included, 1e-6 relative
in fp32), and the logits of the whole micro-batch never exist (tiny Llama and GPT-2, one process)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import tiny_recipe_dict
from launcher.errors import RecipeError
from launcher.recipe import from_dict
from launcher.runtime.chunked_loss import (
    causal_lm_loss,
    chunked_causal_lm_loss,
    enable_chunked_loss,
    supports_chunked_loss,
)

VOCAB = 300
CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=64,  # tied head, dropout
                 bos_token_id=0, eos_token_id=0),
}


def assert_grads_close(grads, ref, msg=""):
    """1e-6 relative, per parameter tensor as a whole (||g - ref|| <= 1e-6 ||ref||): the chunks
    multiply in other block sizes, so single near-zero entries differ by a few ulps of the largest."""
    assert grads.keys() == ref.keys()
    for n in grads:
        err = torch.linalg.vector_norm(grads[n] - ref[n])
        assert err <= 1e-6 * torch.linalg.vector_norm(ref[n]), f"{msg} {n}: {float(err)}"


def _model(name: str, **over):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(**{**CONFIGS[name], "vocab_size": VOCAB, **over})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    return model.train()


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (3, 13), generator=g)
    labels = ids.clone()
    labels[0, :6] = -100  # a prompt
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0  # padding
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(model, loss_fn):
    model.zero_grad()
    torch.manual_seed(11)  # the same dropout masks in both computations
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name,tied,num_items", [("llama", False, 17.0), ("llama", True, torch.tensor(40.0)),
                                                 ("gpt2", True, None)],  # None: transformers' mean
                         ids=["llama-untied-float", "llama-tied-tensor", "gpt2-tied-mean"])
def test_chunked_loss_and_gradients_equal_the_hf_loss(name, tied, num_items):
    model = _model(name, tie_word_embeddings=tied)
    assert supports_chunked_loss(model)
    batch = _batch()
    ref, ref_grads = _loss_and_grads(model, lambda: model(**batch, num_items_in_batch=num_items).loss)
    for chunk in (1, 7, 4096):  # one token per chunk, uneven chunks, one chunk
        loss, grads = _loss_and_grads(model, lambda: causal_lm_loss(model, batch, num_items, chunk))
        torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0, msg=f"chunk {chunk}")
        assert_grads_close(grads, ref_grads, f"chunk {chunk}")


def test_token_weighting_is_sum_over_label_tokens_divided_by_num_items():
    """Independent of transformers: sum of per-token CE of the shifted labels, -100 left out."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 8, dtype=torch.float64)
    weight = torch.randn(11, 8, dtype=torch.float64)
    bias = torch.randn(11, dtype=torch.float64)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [1, 2, -100, 7, 10]])
    want = 0.0
    for b in range(2):
        for t in range(4):
            y = int(labels[b, t + 1])
            if y != -100:
                logits = hidden[b, t] @ weight.T + bias
                want += float(torch.logsumexp(logits, 0) - logits[y])
    got = chunked_causal_lm_loss(hidden, weight, labels, 4.0, chunk_tokens=3, bias=bias)
    assert got.dtype == torch.float32  # logits upcast to fp32, as transformers does
    assert float(got) == pytest.approx(want / 4.0, rel=1e-6)
    got_mean = chunked_causal_lm_loss(hidden, weight, labels, None, chunk_tokens=3, bias=bias)
    assert float(got_mean) == pytest.approx(want / 6, rel=1e-6)  # 6 label tokens after the shift


class _LargestLogits(TorchDispatchMode):
    """The most rows of any new tensor an op produces with the vocabulary as last dimension."""

    def __init__(self) -> None:
        super().__init__()
        self.rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # views and in-place ops allocate nothing (the head's weight.t() is (hidden, vocab))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == VOCAB:
                self.rows = max(self.rows, t.numel() // VOCAB)
        return out


def test_the_whole_micro_batch_logits_never_exist():
    model = _model("llama")
    batch = _batch()  # 3 x 13 = 39 tokens
    with _LargestLogits() as full:
        model(**batch, num_items_in_batch=10.0).loss.backward()
    with _LargestLogits() as chunked:
        causal_lm_loss(model, batch, 10.0, chunk_tokens=8).backward()
    assert full.rows == 39
    assert chunked.rows == 8  # forward, recompute and backward alike


def test_enable_chunked_loss_makes_the_model_forward_return_the_chunked_loss():
    """What the training loop calls, through the DeepSpeed engine: `model(**batch, num_items_in_batch=n)`."""
    batch = _batch()
    plain = _model("gpt2")
    ref, ref_grads = _loss_and_grads(plain, lambda: plain(**batch, num_items_in_batch=17.0).loss)
    model = enable_chunked_loss(_model("gpt2"), 5)
    with _LargestLogits() as seen:
        loss, grads = _loss_and_grads(model, lambda: model(**batch, num_items_in_batch=17.0).loss)
    assert seen.rows == 5
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    assert_grads_close(grads, ref_grads)
    assert model(**batch, num_items_in_batch=17.0).logits is None  # the loss is all the step needs
    with torch.no_grad():  # generation (no labels) gets logits, from the model's own forward
        out = model.eval()(input_ids=batch["input_ids"])
    assert out.logits.shape == (3, 13, VOCAB)
    assert "launcher_chunked_loss" not in dict(model.named_parameters()) and model.state_dict().keys() == \
        plain.state_dict().keys()


def test_softcapping_falls_back_to_the_full_loss():
    model = _model("llama")
    model.config.final_logit_softcapping = 30.0  # Gemma 2's: tanh between the head and the loss
    assert not supports_chunked_loss(model)
    assert enable_chunked_loss(model, 8).forward.__func__ is type(model).forward
    batch = _batch()
    want = model(**batch, num_items_in_batch=10.0).loss
    torch.testing.assert_close(causal_lm_loss(model, batch, 10.0, 8), want)


def test_recipe_key():
    assert from_dict(tiny_recipe_dict()).train.chunked_loss == 1024
    d = tiny_recipe_dict()
    d["train"]["chunked_loss"] = 0
    assert from_dict(d).train.chunked_loss == 0
    d["train"]["chunked_loss"] = -1
    with pytest.raises(RecipeError, match="train.chunked_loss: must be 0"):
        from_dict(d)


def test_16_bit_pipelines_compute_the_loss_whole_and_the_estimate_knows():
    from launcher.estimate.estimator import chunked_loss
    from launcher.recipe import load_recipe
    from launcher.runtime.chunked_loss import recipe_chunk_tokens

    tiny = Path(__file__).resolve().parents[1] / "recipes/examples/tiny-sft.yaml"
    bf16_pp = load_recipe(tiny, ["model.dtype=bf16", "parallelism.pipeline_stages=2", "parallelism.zero_stage=0"])
    assert recipe_chunk_tokens(bf16_pp) == 0 and chunked_loss(bf16_pp) == {"chunked_loss": False}
    fp32_pp = load_recipe(tiny, ["parallelism.pipeline_stages=2", "parallelism.zero_stage=0"])
    assert recipe_chunk_tokens(fp32_pp) == fp32_pp.train.chunked_loss > 0
    assert recipe_chunk_tokens(load_recipe(tiny, ["model.dtype=bf16"])) > 0
