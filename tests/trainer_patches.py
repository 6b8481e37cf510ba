"""Changes made inside spawned training ranks by tests (`train_spawn.train_ranks(patch=...)`)."""

from __future__ import annotations

import functools
import time
from datetime import timedelta

OVERFLOW_STEPS = (2, 3)
"""Steps whose gradients `fp16_overflow` makes infinite (grad_accum 1: one loss call per step)."""


class _InfGrad:
    """Identity forward, infinite gradient backward."""

    @staticmethod
    def apply(x):
        import torch

        class Fn(torch.autograd.Function):
            @staticmethod
            def forward(ctx, t):
                return t.view_as(t)

            @staticmethod
            def backward(ctx, g):
                return g * float("inf")

        return Fn.apply(x)


def fp16_overflow() -> None:
    """fp16 on this CPU (DeepSpeed refuses it where oneDNN lacks fp16 kernels; the tiny model
    runs anyway), and infinite gradients at OVERFLOW_STEPS with a finite loss: the overflow a
    too-high loss scale causes, for DeepSpeed's own FP16 optimizer to detect and skip."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.engine import DeepSpeedEngine

    get_accelerator().is_fp16_supported = lambda: True
    real, calls = DeepSpeedEngine.backward, [0]

    def backward(self, loss, *args, **kwargs):
        calls[0] += 1
        return real(self, _InfGrad.apply(loss) if calls[0] in OVERFLOW_STEPS else loss, *args, **kwargs)

    DeepSpeedEngine.backward = backward


COLLECTIVE_TIMEOUT_S = 20
EXPORT_DELAY_S = 30


def slow_export() -> None:
    """Collectives time out after COLLECTIVE_TIMEOUT_S, and the end-of-run export takes longer
    than that, as a 70B model's export does against the default timeout."""
    import deepspeed

    import launcher.checkpoint.export as export

    deepspeed.init_distributed = functools.partial(deepspeed.init_distributed,
                                                   timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    real = export.export_checkpoint

    def export_checkpoint(*args, **kwargs):
        time.sleep(EXPORT_DELAY_S)
        return real(*args, **kwargs)

    export.export_checkpoint = export_checkpoint
