"""The causal-LM loss computed a chunk of tokens at a time (`train.chunked_loss`).

Unchunked, a micro-batch of b x s tokens materialises its logits, b x s x vocabulary, and the fp32
copy the loss upcasts them to: 27 GiB for 4 x 4096 tokens of Llama-3's 128k vocabulary. Here the
LM head and the cross-entropy run on `chunk_tokens` tokens at a time, each chunk under a
non-reentrant `torch.utils.checkpoint`, so its logits are freed after its loss is summed and
recomputed in the backward pass: at most one chunk's logits exist at any time.

The loss is exactly transformers' `ForCausalLMLoss` with `num_items_in_batch`: labels shifted by
one, -100 ignored, logits computed in the model's dtype and upcast to fp32, sum of the token
cross-entropies / `num_items` (the mean over label tokens when `num_items` is None).

Under DeepSpeed the loss must be computed inside the module's forward (the engine's forward hooks
prepare the backward pass), hence `enable_chunked_loss`, which gives a Hugging Face model a forward
that returns the chunked loss whenever it is given labels.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")


def recipe_chunk_tokens(recipe: Any) -> int:
    """Tokens per chunk the runtime uses for `recipe` (0: the loss computed whole). 16-bit
    pipelines compute it whole: there the untied head's weight, handed to the loss as a stage
    output, stopped training (parity cell bf16 w2-z0-ga4-pp2); the estimate reads this too."""
    tokens = int(getattr(recipe.train, "chunked_loss", 0) or 0)
    if recipe.parallelism.pipeline_stages > 1 and recipe.model.dtype != "fp32":
        return 0
    return max(tokens, 0)
"""Models whose `ForCausalLM.forward` computes exactly `lm_head(base(...).last_hidden_state)` and
transformers' causal-LM loss: nothing between the head and the loss (no logit scaling or capping)."""


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                labels: torch.Tensor) -> torch.Tensor:
    logits = nn.functional.linear(hidden, weight, bias).float()  # as the head, then the loss's upcast
    return nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    num_items: float | torch.Tensor | None,
    chunk_tokens: int = 1024,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum(cross-entropy of `hidden @ lm_head_weight.T + bias` against the next token's label) /
    `num_items`, over `chunk_tokens` tokens at a time. `hidden`: (..., seq, hidden) final
    hidden states; `labels`: (..., seq), not yet shifted, -100 where there is no label."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    targets = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1).to(hidden.device)
    # Every token, labelled or not, as transformers does: chunk shapes (and memory) do not depend on
    # the data, which a trace under FakeTensorMode needs (selecting label tokens would be nonzero()).
    tokens = hidden.reshape(-1, hidden.shape[-1])
    total = None
    for start in range(0, max(len(targets), 1), chunk_tokens):
        part = checkpoint(_chunk_loss, tokens[start : start + chunk_tokens], lm_head_weight, bias,
                          targets[start : start + chunk_tokens], use_reentrant=False)
        total = part if total is None else total + part
    assert total is not None
    if num_items is None:  # transformers' mean reduction
        return total / (targets != IGNORE_INDEX).sum()
    if torch.is_tensor(num_items):
        num_items = num_items.to(total.device)
    return total / num_items


def supports_chunked_loss(model: nn.Module) -> bool:
    """Whether the chunked loss equals `model(..., labels=...)`'s: a known family with a plain
    linear head and no final logit softcapping (Gemma 2's), which falls back to the full loss."""
    config = getattr(model, "config", None)
    return (
        getattr(config, "model_type", None) in FAMILIES
        and getattr(config, "final_logit_softcapping", None) is None
        and isinstance(getattr(model, "lm_head", None), nn.Linear)
        and isinstance(getattr(model, getattr(model, "base_model_prefix", ""), None), nn.Module)
    )


def _as_forward_of(module: nn.Module, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` run as `module`'s forward, so that the hooks on `module` wrap it once: ZeRO-3
    gathers the head's weight before the forward and before the backward of the whole chunk loop,
    not once per chunk (and the weight is a partitioned placeholder outside the hooks)."""
    had = "forward" in module.__dict__
    saved = module.__dict__.get("forward")
    module.forward = fn  # type: ignore[method-assign]
    try:
        return module(*args)
    finally:
        if had:
            module.forward = saved  # type: ignore[method-assign]
        else:
            del module.forward


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], num_items: float | torch.Tensor | None,
                   chunk_tokens: int) -> torch.Tensor:
    """The loss of `model(**batch, num_items_in_batch=num_items)`, with the logits computed
    `chunk_tokens` tokens at a time; the model's own forward when chunking does not apply
    (`chunk_tokens` 0, another model family, logit softcapping). `model`: the Hugging Face model
    (call it from inside the DeepSpeed engine's forward: see `enable_chunked_loss`)."""
    if chunk_tokens <= 0 or not supports_chunked_loss(model):
        return model(**batch, num_items_in_batch=num_items).loss
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    base = getattr(model, model.base_model_prefix)
    hidden = base(**inputs, use_cache=False).last_hidden_state
    head = model.lm_head

    def head_loss(h: torch.Tensor) -> torch.Tensor:
        return chunked_causal_lm_loss(h, head.weight, batch["labels"], num_items, chunk_tokens, head.bias)

    return _as_forward_of(head, head_loss, hidden)


def enable_chunked_loss(model: nn.Module, chunk_tokens: int) -> nn.Module:
    """Give the Hugging Face `model` a forward that returns the chunked loss (and no logits) when it
    is called with labels, so `engine(**batch, num_items_in_batch=n).loss` is chunked; calls
    without labels (generation) or asking for more than the loss run the model's own forward."""
    if chunk_tokens <= 0 or not supports_chunked_loss(model):
        return model
    from transformers.modeling_outputs import CausalLMOutputWithPast

    original = model.forward

    def forward(*args: Any, labels: torch.Tensor | None = None, num_items_in_batch: Any = None,
                **kwargs: Any) -> Any:
        more = any(kwargs.get(k) for k in ("output_hidden_states", "output_attentions"))
        # checked per call: a head wrapped after this (PEFT's modules_to_save) makes chunking not
        # apply, and causal_lm_loss's fallback would call this forward again, forever
        if args or labels is None or more or kwargs.get("return_dict") is False or not supports_chunked_loss(model):
            return original(*args, labels=labels, num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs.pop("use_cache", None)
        loss = causal_lm_loss(model, {**kwargs, "labels": labels}, num_items_in_batch, chunk_tokens)
        return CausalLMOutputWithPast(loss=loss)

    model.forward = forward  # type: ignore[method-assign]
    model.launcher_chunked_loss = chunk_tokens  # what `forward` does, for whoever inspects the model
    return model
