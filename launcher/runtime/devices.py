"""What the workers' devices can do, checked by the driver before any worker starts."""

from __future__ import annotations

from launcher.errors import RecipeError
from launcher.recipe.sections import Recipe


def check_dtype(recipe: Recipe) -> None:
    """fp16 training on CPU workers: DeepSpeed refuses it ("Type fp16 is not supported on your
    device") unless oneDNN has fp16 kernels for this CPU; say so before the workers start."""
    if recipe.model.dtype != "fp16" or recipe.resources.gpus_per_node > 0:
        return
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu" and not get_accelerator().is_fp16_supported():
        raise RecipeError(
            "model.dtype",
            "fp16 on CPU workers (resources.gpus_per_node: 0) is not supported by DeepSpeed on this CPU: "
            "use model.dtype=bf16 or fp32, or GPU workers",
        )
