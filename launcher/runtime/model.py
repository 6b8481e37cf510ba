"""Build the Hugging Face model for a recipe: random init from a config, or pretrained weights."""

from __future__ import annotations

from typing import Any

import torch

from launcher.errors import RecipeError
from launcher.recipe.sections import ModelConfig
from launcher.runtime.chunked_loss import enable_chunked_loss
from launcher.runtime.recompute import apply_activation_checkpointing

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def model_config(cfg: ModelConfig, tokenizer: Any) -> Any:
    """The transformers config: the checkpoint's or the inline one, with recipe overrides."""
    from transformers import AutoConfig

    from launcher.pretrained import load_config

    overrides = dict(cfg.config or {})
    if cfg.name_or_path:
        # a local directory or a hub id, as transformers resolves it (online, or the cache offline)
        overrides.pop("model_type", None)
        config = load_config(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)
        for k, v in overrides.items():
            setattr(config, k, v)
    else:
        model_type = overrides.pop("model_type")
        overrides.setdefault("vocab_size", len(tokenizer))
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if getattr(tokenizer, name, None) is not None:
                overrides.setdefault(name, getattr(tokenizer, name))
        try:
            config = AutoConfig.for_model(model_type, **overrides)
        except ValueError as e:
            raise RecipeError("model.config.model_type", str(e).splitlines()[0]) from None
    if getattr(config, "vocab_size", None) is not None and config.vocab_size < len(tokenizer):
        raise RecipeError(
            "model.config.vocab_size",
            f"the tokenizer has {len(tokenizer)} tokens but the model only {config.vocab_size}",
        )
    return config


def build_model(cfg: ModelConfig, tokenizer: Any, *, seed: int, chunked_loss: int = 0,
                quantization: Any = None) -> torch.nn.Module:
    """Instantiate the model. Under ZeRO-3 the caller keeps an `HfDeepSpeedConfig` alive, so
    transformers builds it inside `deepspeed.zero.Init` and no rank holds the full model.
    `chunked_loss` (`train.chunked_loss`): tokens per chunk of the loss that `model(**batch)`
    returns when given labels (see `launcher.runtime.chunked_loss`); 0 keeps transformers' own.
    `quantization`: a transformers quantization config (QLoRA's 4-bit base), pretrained models only."""
    from transformers import AutoModelForCausalLM

    from launcher.pretrained import source

    torch.manual_seed(seed)  # identical init on every rank; ZeRO also broadcasts from rank 0
    config = model_config(cfg, tokenizer)
    kwargs = {"dtype": TORCH_DTYPES[cfg.dtype], "attn_implementation": cfg.attn_implementation}
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    if cfg.name_or_path:
        model = AutoModelForCausalLM.from_pretrained(
            source(cfg.name_or_path), config=config, trust_remote_code=cfg.trust_remote_code, **kwargs
        )
    else:
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    apply_activation_checkpointing(model, cfg.activation_checkpointing)
    # Training never needs a KV cache, and with one transformers skips packed-sequence detection:
    # packed documents would attend to each other. Generation asks for the cache explicitly.
    model.config.use_cache = False
    return enable_chunked_loss(model, chunked_loss)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norms and embeddings' 1-D parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))  # ZeRO-3 leaves an empty placeholder
        (no_decay if ndim < 2 or "norm" in name.lower() or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups
