"""The reference policy of DPO and KTO: the log-probs the policy's are compared with.

- `FrozenCopy` (`preference.reference: copy`): the starting model built a second time from the
  recipe, with the same seed (random init) or the same checkpoint (pretrained), frozen. Under
  ZeRO 0-2 a plain eval-mode module on the worker's device; under ZeRO-3 it is built inside
  `zero.Init` (the trainer's `HfDeepSpeedConfig` is alive) and run through a DeepSpeed engine
  without an optimizer, so it stays partitioned like the policy. Built at the first step, not
  copied from the engine: after a resume the engine holds trained weights, the recipe still
  names the starting ones.
- `AdaptersOff` (`base`, LoRA): the policy itself with its adapters disabled (peft's
  `disable_adapter()`), no second copy.
- `ModuleReference`: a given module (tests, the TRL parity check).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from launcher.recipe.sections import Recipe
from launcher.runtime.preference.logps import forward_logits, sequence_logps


class ModuleReference:
    def __init__(self, module: Any) -> None:
        self.module = module

    def model(self, policy: Any) -> Any:
        return self.module

    def context(self, policy: Any) -> Any:
        return contextlib.nullcontext()

    @torch.no_grad()
    def logps(self, policy: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
              *, average: bool = False) -> torch.Tensor:
        with self.context(policy):
            logits = forward_logits(self.model(policy), input_ids, attention_mask)
        return sequence_logps(logits, labels, average=average)


class AdaptersOff(ModuleReference):
    """The LoRA policy with its adapters disabled: the base model it started from."""

    def __init__(self) -> None:
        super().__init__(None)

    def model(self, policy: Any) -> Any:
        return policy

    def context(self, policy: Any) -> Any:
        module = getattr(policy, "module", policy)  # the engine's PeftModel
        if not hasattr(module, "disable_adapter"):
            from launcher.errors import RecipeError

            raise RecipeError("preference.reference",
                              "reference=base needs a LoRA model (train.method=lora): set preference.reference=copy")
        return module.disable_adapter()


class FrozenCopy(ModuleReference):
    """A frozen second instance of the starting model, built at first use."""

    def __init__(self, recipe: Recipe, world_size: int = 1) -> None:
        super().__init__(None)
        self.recipe, self.world_size = recipe, world_size

    def model(self, policy: Any) -> Any:
        if self.module is None:
            self.module = build_copy(self.recipe, policy, self.world_size)
        return self.module


def _policy_module(policy: Any) -> Any:
    module = getattr(policy, "module", policy)
    return module.get_base_model() if hasattr(module, "get_base_model") else module


def build_copy(recipe: Recipe, policy: Any, world_size: int) -> Any:
    """The starting model again, frozen; the RNG streams are left as they were (a resumed run
    restored them before the first step)."""
    import copy

    from transformers import AutoModelForCausalLM

    from launcher.pretrained import source
    from launcher.runtime.model import TORCH_DTYPES

    cfg = recipe.model
    config = copy.deepcopy(_policy_module(policy).config)
    kwargs = {"dtype": TORCH_DTYPES[cfg.dtype], "attn_implementation": cfg.attn_implementation}
    on_cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = [torch.cuda.current_device()] if on_cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(recipe.train.seed)  # build_model's seed: the same initial weights
        if cfg.name_or_path:
            model = AutoModelForCausalLM.from_pretrained(source(cfg.name_or_path), config=config,
                                                         trust_remote_code=cfg.trust_remote_code, **kwargs)
        else:
            model = AutoModelForCausalLM.from_config(config, **kwargs)
    model.requires_grad_(False)
    model.eval()
    if recipe.parallelism.zero_stage == 3 and hasattr(policy, "module"):
        return _zero3_engine(recipe, model, policy, world_size)
    first = next(_policy_module(policy).parameters())
    return model.to(device=first.device, dtype=first.dtype)


def _zero3_engine(recipe: Recipe, model: Any, policy: Any, world_size: int) -> Any:
    """A DeepSpeed engine without optimizer: ZeRO-3 keeps the copy partitioned and gathers each
    layer for its forward, as for the policy (TRL's prepare_deepspeed does the same)."""
    import deepspeed

    from launcher.runtime.ds_config import build_ds_config

    on_gpu = policy.device.type == "cuda"
    data_parallel = world_size // recipe.parallelism.pipeline_stages
    config = build_ds_config(recipe, data_parallel=data_parallel, on_gpu=on_gpu)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    zero = dict(config.get("zero_optimization", {}))
    zero.pop("offload_optimizer", None)
    config["zero_optimization"] = zero
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def reference_for(recipe: Recipe, world_size: int = 1) -> ModuleReference | None:
    """The recipe's reference policy (None for ORPO, which has none)."""
    if recipe.train.task == "orpo":
        return None
    choice = recipe.preference.reference
    if choice == "auto":
        choice = "base" if recipe.train.method in ("lora", "qlora") else "copy"
    if choice == "base":
        return AdaptersOff()
    return FrozenCopy(recipe, world_size)
