"""LoRA and QLoRA (`train.method: lora | qlora`): PEFT adapters on the built model.

The base model is built as for full fine-tuning (under ZeRO-3 inside `zero.Init`, so the frozen
base is partitioned); `apply_lora` then wraps it in a `peft.PeftModel` whose only trainable
parameters are the adapters and `lora.modules_to_save`. `launcher.runtime.model.param_groups`
hands DeepSpeed only parameters that require grad, so only they carry optimizer state.
QLoRA loads a pretrained base in bitsandbytes 4-bit (`quantization_config`), NVIDIA GPUs only.
"""

from __future__ import annotations

from typing import Any

import torch

from launcher.errors import RecipeError, UserError
from launcher.recipe.sections import Recipe

LORA_METHODS = ("lora", "qlora")

_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FAMILY_TARGETS: dict[str, list[str]] = {
    family: _PROJECTIONS for family in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")
}
"""Default `lora.target_modules` per model_type: every attention and MLP projection (QLoRA's
paper: adapters on all linear layers match full fine-tuning better than q/v alone). Other
families: all linear layers but the LM head."""
FAMILY_TARGETS["gpt2"] = ["c_attn", "c_proj", "c_fc"]
FAN_IN_FAN_OUT = {"gpt2"}
"""Families whose projections are transformers' `Conv1D` (weight stored in x out)."""

ADAPTER_LAYERS = (torch.nn.Linear, torch.nn.Embedding)


def uses_lora(recipe: Recipe) -> bool:
    return recipe.train.method in LORA_METHODS


def _model_type(model: torch.nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", "") or "")


def _adaptable(module: torch.nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (*ADAPTER_LAYERS, Conv1D)) or type(module).__name__ == "Linear4bit"


def default_targets(model: torch.nn.Module) -> list[str]:
    """The family's projections, or the leaf names of every linear layer except the LM head."""
    family = FAMILY_TARGETS.get(_model_type(model))
    if family:
        return list(family)
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
             if name and m is not out and _adaptable(m) and not isinstance(m, torch.nn.Embedding)}
    return sorted(names)


def _matches(name: str, target: str) -> bool:
    # PEFT's own rule for a list of names: the full name or its last components
    return name == target or name.endswith("." + target)


def check_targets(recipe: Recipe, model: torch.nn.Module) -> list[str]:
    """The target modules for `model`; RecipeError naming `lora.target_modules` (or
    `lora.modules_to_save`) for a name that matches no module, or no layer PEFT can adapt."""
    targets = list(recipe.lora.target_modules) or default_targets(model)
    modules = [(n, m) for n, m in model.named_modules() if n]
    family = _model_type(model) or "this model"
    for t in targets:
        hits = [m for n, m in modules if _matches(n, t)]
        if not hits:
            leaves = sorted({n.rsplit(".", 1)[-1] for n, m in modules if _adaptable(m)})
            raise RecipeError(
                "lora.target_modules",
                f"'{t}' matches no module of the {family} model; its linear and embedding layers are named "
                f"{', '.join(leaves[:12])}: use some of those, or leave lora.target_modules empty for "
                "the family's attention and MLP projections",
            )
        if not any(_adaptable(m) for m in hits):
            raise RecipeError(
                "lora.target_modules",
                f"'{t}' names a {type(hits[0]).__name__}, not a linear or embedding layer: name the "
                "projections inside it (e.g. q_proj), or leave lora.target_modules empty",
            )
    for t in recipe.lora.modules_to_save:
        if not any(_matches(n, t) for n, _ in modules):
            raise RecipeError(
                "lora.modules_to_save",
                f"'{t}' matches no module of the {family} model: e.g. embed_tokens or lm_head",
            )
    return targets


def peft_config(recipe: Recipe, model: torch.nn.Module) -> Any:
    """PEFT's LoraConfig for `recipe.lora` on `model` (target modules checked)."""
    from peft import LoraConfig, TaskType

    lo = recipe.lora
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lo.rank,
        lora_alpha=lo.alpha,
        lora_dropout=lo.dropout,
        target_modules=check_targets(recipe, model),
        modules_to_save=list(lo.modules_to_save) or None,
        fan_in_fan_out=_model_type(model) in FAN_IN_FAN_OUT,
        base_model_name_or_path=recipe.model.name_or_path,
    )


def apply_lora(model: torch.nn.Module, recipe: Recipe, *, seed: int) -> torch.nn.Module:
    """`model` wrapped in a `peft.PeftModel` with fresh adapters (the same on every rank: seeded).
    The engine's module is then this PeftModel: `engine.module.disable_adapter()` runs the base."""
    from peft import get_peft_model

    config = peft_config(recipe, model)
    torch.manual_seed(seed + 1)  # the adapters' init, identical on every rank
    # adapters in the model's dtype, like every other trained weight: DeepSpeed keeps their fp32
    # masters (PEFT's default upcast would mix dtypes inside ZeRO's flat 16-bit groups)
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=False)
    if recipe.model.activation_checkpointing not in (False, "none", None):
        # the frozen embeddings' output needs grad for checkpointed blocks to backpropagate
        peft_model.enable_input_require_grads()
    return peft_model


def quantization_config(recipe: Recipe) -> Any:
    """QLoRA's 4-bit base: bitsandbytes NF4/FP4 with storage and compute in the model dtype
    (PEFT's ZeRO-3 QLoRA recipe: storage = model dtype lets ZeRO-3 partition the packed weights)."""
    from launcher.runtime.model import TORCH_DTYPES

    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    dtype = TORCH_DTYPES[recipe.model.dtype]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=recipe.lora.quant_type,
        bnb_4bit_use_double_quant=recipe.lora.double_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
    )


def require_bitsandbytes() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(
            "train.method=qlora needs bitsandbytes, which is not installed: pip install 'launcher[qlora]' "
            "(NVIDIA GPUs only), or use train.method=lora"
        ) from None


def meta_model(recipe: Recipe, config: Any = None) -> torch.nn.Module:
    """The recipe's model on the meta device (no memory, no weights read), for checking names.
    `config`: the resolved transformers config; default: the recipe's inline `model.config`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if config is None:
        overrides = dict(recipe.model.config or {})
        model_type = overrides.pop("model_type")
        config = AutoConfig.for_model(model_type, **overrides)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
