"""Mixed precision that DeepSpeed's config alone cannot express: the ZeRO-0 bf16 backport and
where a bf16 run's gradient norm lives.

DeepSpeed 0.19.8 picks `BF16_Optimizer` (fp32 master weights, gradients accumulated and
all-reduced in fp32) for bf16 with `data_types.grad_accum_dtype: "fp32"` only under ZeRO-1;
without ZeRO it refuses that pair (`NotImplementedError: unsupported mix of model_dtype=bf16 and
grad_accum_dtype=fp32`) and its only bf16 path, FP16_Optimizer in bf16 mode, sums micro-batch
gradients in bf16. Upstream DeepSpeed returns BF16_Optimizer for that pair whatever the stage;
`install_deepspeed_backports()` restores that branch, and nothing else.
"""

from __future__ import annotations

from typing import Any

_INSTALLED = False


def install_deepspeed_backports() -> None:
    """Let DeepSpeed run bf16 without ZeRO on BF16_Optimizer with fp32 gradient accumulation
    (idempotent; call before `deepspeed.initialize`). Other combinations are untouched."""
    global _INSTALLED
    if _INSTALLED:
        return
    import torch
    from deepspeed.runtime.constants import BFLOAT16
    from deepspeed.runtime.engine import DeepSpeedEngine

    original = DeepSpeedEngine._do_optimizer_sanity_check

    def sanity_check(self: Any, basic_optimizer: Any) -> Any:
        model_dtype, grad_accum_dtype = self.get_data_types()
        if not self.zero_optimization() and (model_dtype, grad_accum_dtype) == (torch.bfloat16, torch.float32):
            return BFLOAT16
        return original(self, basic_optimizer)

    DeepSpeedEngine._do_optimizer_sanity_check = sanity_check
    _INSTALLED = True


def norm_after_step(engine: Any) -> bool:
    """True when the engine's optimizer keeps the gradients in fp32 buffers of its own
    (BF16_Optimizer): `p.grad` then holds only the last micro-batch's bf16 gradient, unreduced,
    and the step's global norm (before clipping) is `engine.get_global_grad_norm()` after
    `engine.step()`."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    return isinstance(getattr(engine, "optimizer", None), BF16_Optimizer)
