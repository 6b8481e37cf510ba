"""Mixed precision that DeepSpeed's config alone cannot express: the ZeRO-0 bf16 backport and
where a bf16 run's gradient norm lives.

DeepSpeed 0.19.8 picks `BF16_Optimizer` (fp32 master weights, gradients accumulated and
all-reduced in fp32) for bf16 with `data_types.grad_accum_dtype: "fp32"` only under ZeRO-1;
without ZeRO it refuses that pair (`NotImplementedError: unsupported mix of model_dtype=bf16 and
grad_accum_dtype=fp32`) and its only bf16 path, FP16_Optimizer in bf16 mode, sums micro-batch
gradients in bf16. Upstream DeepSpeed returns BF16_Optimizer for that pair whatever the stage;
`install_deepspeed_backports()` restores that branch. It also gives BF16_Optimizer the
`_global_grad_norm` attribute from construction, as DeepSpeed's ZeRO optimizers have it: until its
first step it has none, and a caller that asks `hasattr(engine.optimizer, "_global_grad_norm")`
(DeepSpeed's engine does; so does the trainer) would read the norm from `p.grad` instead, which
under BF16_Optimizer holds only the last micro-batch's bf16 gradient, unreduced.
"""

from __future__ import annotations

from typing import Any

_INSTALLED = False


def install_deepspeed_backports() -> None:
    """Let DeepSpeed run bf16 without ZeRO on BF16_Optimizer with fp32 gradient accumulation, and
    let BF16_Optimizer say from the start that it keeps the gradient norm (idempotent; call before
    `deepspeed.initialize`). Other combinations are untouched."""
    global _INSTALLED
    if _INSTALLED:
        return
    import torch
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.constants import BFLOAT16
    from deepspeed.runtime.engine import DeepSpeedEngine

    original = DeepSpeedEngine._do_optimizer_sanity_check

    def sanity_check(self: Any, basic_optimizer: Any) -> Any:
        model_dtype, grad_accum_dtype = self.get_data_types()
        no_zero = not self.zero_optimization()
        if no_zero and (model_dtype, grad_accum_dtype) == (torch.bfloat16, torch.float32):
            return BFLOAT16
        return original(self, basic_optimizer)

    DeepSpeedEngine._do_optimizer_sanity_check = sanity_check
    if not hasattr(BF16_Optimizer, "_global_grad_norm"):
        BF16_Optimizer._global_grad_norm = None  # set by every step(); None until the first
    _INSTALLED = True


def norm_after_step(engine: Any) -> bool:
    """True when the engine's optimizer computes the step's global gradient norm (before
    clipping) itself: read `engine.get_global_grad_norm()` after `engine.step()`. BF16_Optimizer
    and the ZeRO optimizers do; under BF16_Optimizer `p.grad` holds only the last micro-batch's
    bf16 gradient, unreduced (the sum is in its own fp32 buffers), so it must never be read."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    optimizer = getattr(engine, "optimizer", None)
    return isinstance(optimizer, BF16_Optimizer) or hasattr(optimizer, "_global_grad_norm")
