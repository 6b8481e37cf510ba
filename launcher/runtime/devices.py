"""What the workers' devices can do, checked by the driver before any worker starts."""

from __future__ import annotations

from launcher.errors import RecipeError
from launcher.recipe.sections import Recipe


def check_devices(recipe: Recipe) -> None:
    """Everything the driver's preflight checks about the workers' devices and the method's
    needs, after the model's config resolved."""
    check_dtype(recipe)
    check_method(recipe)


def check_method(recipe: Recipe) -> None:
    """LoRA / QLoRA before any worker starts: QLoRA's GPU and bitsandbytes (checks.py refuses
    CPU workers already), and the adapters' target modules against a pretrained model's module
    names (built on the meta device from its config: no weights read)."""
    from launcher.runtime.lora import check_targets, meta_model, require_bitsandbytes, uses_lora

    if not uses_lora(recipe):
        return
    if recipe.train.method == "qlora":
        require_bitsandbytes()
    if recipe.model.name_or_path:
        from launcher.pretrained import load_config

        config = load_config(recipe.model.name_or_path, trust_remote_code=recipe.model.trust_remote_code)
        check_targets(recipe, meta_model(recipe, config))


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
